//! The CPU executor's KV cache, paged: positions live in pages of `PAGE` from one pool per layer, and each
//! sequence slot has a page table. A finished sequence's pages go back to the pool for the next one, so memory
//! follows the positions in use rather than slots times the context. Page ids are the same in every layer (a
//! position's page is taken once, by the first layer that writes it); each layer's pool grows to the highest page
//! in use, and a freed page is reused before a new one is touched.
//!
//! Each KV head's pages are one run of memory (`[kv head, page, PAGE, head_dim]`: a region per head, holding its
//! rows page after page), so attention, which reads one KV head's rows, reads a sequence whose pages were taken in
//! order as one run, which the hardware prefetcher follows from page to page. With a page holding every head's
//! rows, a head's 4 KiB runs were 8 KiB apart (SmolLM2), and attention read the cache at half the speed once it
//! came from memory; with every head's row interleaved position by position, it read 256 bytes of every 768.

use crate::engine::ExecError;
use std::collections::HashMap;

/// Positions per page (generated attention walks the pages too).
pub const PAGE: usize = kiln_ir::cpu_abi::KV_PAGE;

pub struct PagedKv {
    /// The most pages that may be in use at once.
    capacity: usize,
    /// Pages given back, reused first.
    free: Vec<u32>,
    /// Pages below this have been handed out at least once.
    touched: u32,
    /// Each slot's pages, in position order.
    tables: Vec<Vec<u32>>,
    layers: HashMap<usize, LayerPages>,
}

/// One layer's keys and values, `[kv head, page, PAGE, head_dim]`: room for `pages` pages in each head's region.
struct LayerPages {
    head_dim: usize,
    kv_heads: usize,
    pages: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl LayerPages {
    /// Values per page of one KV head.
    fn page_len(&self) -> usize {
        PAGE * self.head_dim
    }

    /// Where KV head `kv_head`'s region starts.
    fn head_offset(&self, kv_head: usize) -> usize {
        kv_head * self.pages * self.page_len()
    }

    /// Makes room for page `page` in every head's region: the regions grow to at least double (at most `limit`
    /// pages), so a layer reallocates a logarithmic number of times, and each head's pages move to the start of
    /// its new region.
    fn hold(&mut self, page: usize, limit: usize) {
        if page < self.pages {
            return;
        }
        let pages = (page + 1).max(2 * self.pages).min(limit);
        let (old, new) = (self.pages * self.page_len(), pages * self.page_len());
        for pool in [&mut self.k, &mut self.v] {
            let mut grown = vec![0.0; self.kv_heads * new];
            if old > 0 {
                for (region, head) in grown.chunks_exact_mut(new).zip(pool.chunks_exact(old)) {
                    region[..old].copy_from_slice(head);
                }
            }
            *pool = grown;
        }
        self.pages = pages;
    }
}

impl PagedKv {
    /// A cache for `slots` sequences holding at most `capacity` positions in all (rounded up to whole pages).
    pub fn new(slots: usize, capacity: usize) -> Self {
        PagedKv {
            capacity: capacity.div_ceil(PAGE),
            free: Vec::new(),
            touched: 0,
            tables: vec![Vec::new(); slots],
            layers: HashMap::new(),
        }
    }

    /// (pages in use, the most there may be).
    pub fn pages(&self) -> (usize, usize) {
        (self.touched as usize - self.free.len(), self.capacity)
    }

    /// Writes the keys and values of position `pos` of the sequence in `slot`, at `layer` (every KV head's,
    /// `head_dim` values each, one after another); a position past the slot's pages takes a page from the pool.
    pub fn write(
        &mut self,
        layer: usize,
        slot: usize,
        pos: usize,
        head_dim: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ExecError> {
        while self.tables[slot].len() <= pos / PAGE {
            let page = match self.free.pop() {
                Some(page) => page,
                None if (self.touched as usize) < self.capacity => {
                    self.touched += 1;
                    self.touched - 1
                }
                None => {
                    return Err(ExecError::KvFull {
                        positions: self.capacity * PAGE,
                    })
                }
            };
            self.tables[slot].push(page);
        }
        let page = self.tables[slot][pos / PAGE] as usize;
        let pool = self.layers.entry(layer).or_insert_with(|| LayerPages {
            head_dim,
            kv_heads: k.len() / head_dim,
            pages: 0,
            k: Vec::new(),
            v: Vec::new(),
        });
        pool.hold(page, self.capacity);
        let row = page * pool.page_len() + pos % PAGE * head_dim;
        let heads = k.chunks_exact(head_dim).zip(v.chunks_exact(head_dim));
        for (h, (k, v)) in heads.enumerate() {
            let at = pool.head_offset(h) + row;
            pool.k[at..at + head_dim].copy_from_slice(k);
            pool.v[at..at + head_dim].copy_from_slice(v);
        }
        Ok(())
    }

    /// Gives the slot's pages back to the pool (its sequence has ended).
    pub fn release(&mut self, slot: usize) {
        let table = std::mem::take(&mut self.tables[slot]);
        self.free.extend(table.into_iter().rev());
    }

    /// The keys and values of the sequence in `slot` at `layer`, for attention.
    pub fn sequence(&self, layer: usize, slot: usize) -> SeqKv<'_> {
        SeqKv {
            pool: &self.layers[&layer],
            table: &self.tables[slot],
        }
    }
}

/// One sequence's cached keys and values at one layer, position by position.
pub struct SeqKv<'a> {
    pool: &'a LayerPages,
    table: &'a [u32],
}

impl SeqKv<'_> {
    fn at(&self, pos: usize, kv_head: usize) -> usize {
        self.head_offset(kv_head)
            + self.table[pos / PAGE] as usize * self.pool.page_len()
            + pos % PAGE * self.pool.head_dim
    }

    /// Where KV head `kv_head`'s rows start in the pools.
    pub fn head_offset(&self, kv_head: usize) -> usize {
        self.pool.head_offset(kv_head)
    }

    /// The key of position `pos` for KV head `kv_head` (`head_dim` values).
    pub fn key(&self, pos: usize, kv_head: usize) -> &[f32] {
        &self.pool.k[self.at(pos, kv_head)..][..self.pool.head_dim]
    }

    pub fn value(&self, pos: usize, kv_head: usize) -> &[f32] {
        &self.pool.v[self.at(pos, kv_head)..][..self.pool.head_dim]
    }

    /// The key pool, value pool, page table and page stride (values per page of one KV head), as generated
    /// attention takes them (`AttentionArgs`).
    pub fn raw(&self) -> (*const f32, *const f32, *const u32, usize) {
        (
            self.pool.k.as_ptr(),
            self.pool.v.as_ptr(),
            self.table.as_ptr(),
            self.pool.page_len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_lent_per_sequence_and_reused_after_release() {
        let mut kv = PagedKv::new(2, 3 * PAGE);
        // Two KV heads of 2 values: head h of a row holds x + h.
        let row = |x: f32| vec![x, x, x + 1.0, x + 1.0];
        let write = |kv: &mut PagedKv, layer, slot, pos, x: f32| {
            kv.write(layer, slot, pos, 2, &row(x), &row(-x))
        };
        for pos in 0..PAGE + 1 {
            write(&mut kv, 0, 0, pos, pos as f32).unwrap();
        }
        write(&mut kv, 0, 1, 0, 100.0).unwrap();
        assert_eq!(kv.pages(), (3, 3));
        // Every layer uses the slot's pages as they are.
        write(&mut kv, 1, 0, PAGE, 7.0).unwrap();
        let (a, b) = (kv.sequence(0, 0), kv.sequence(0, 1));
        assert_eq!(
            (a.key(PAGE, 0), a.value(3, 1), b.key(0, 1)),
            (&[PAGE as f32; 2][..], &[-3.0 + 1.0; 2][..], &[101.0; 2][..])
        );
        // Each head's pages are one run: head 1's region, room for the three pages, follows head 0's, and slot 0's
        // pages 0 and 1 lie back to back in it.
        let (k, _, _, page_stride) = a.raw();
        assert_eq!(page_stride, PAGE * 2);
        assert_eq!(a.head_offset(1), 3 * page_stride);
        let pool = unsafe { std::slice::from_raw_parts(k, 2 * a.head_offset(1)) };
        assert_eq!(
            (
                pool[a.head_offset(1) + 2 * 3],
                pool[a.head_offset(1) + 2 * PAGE]
            ),
            (3.0 + 1.0, PAGE as f32 + 1.0),
            "head 1, positions 3 and PAGE"
        );
        // Full: a fourth page is refused with the capacity in the error.
        let full = write(&mut kv, 0, 1, PAGE, 1.0).unwrap_err();
        assert!(
            full.to_string().contains(&format!("{}", 3 * PAGE)),
            "{full}"
        );
        // Released pages serve the next sequence in any slot.
        kv.release(0);
        assert_eq!(kv.pages(), (1, 3));
        write(&mut kv, 0, 1, PAGE, 5.0).unwrap();
        assert_eq!(kv.sequence(0, 1).key(PAGE, 0), &[5.0; 2]);
        assert_eq!(kv.sequence(0, 1).key(0, 0), &[100.0; 2]);
    }
}
