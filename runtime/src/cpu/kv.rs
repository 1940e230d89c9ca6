//! The CPU executor's KV cache, paged: positions live in pages of `PAGE` from one pool per layer, and each
//! sequence slot has a page table. A finished sequence's pages go back to the pool for the next one, so memory
//! follows the positions in use rather than slots times the context. Page ids are the same in every layer (a
//! position's page is taken once, by the first layer that writes it); each layer's pool grows to the highest page
//! in use, and a freed page is reused before a new one is touched.

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

/// One layer's keys and values, `[page, PAGE, width]`.
struct LayerPages {
    width: usize,
    k: Vec<f32>,
    v: Vec<f32>,
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

    /// Writes the key and value of position `pos` of the sequence in `slot`, at `layer`; a position past the
    /// slot's pages takes a page from the pool.
    pub fn write(
        &mut self,
        layer: usize,
        slot: usize,
        pos: usize,
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
            width: k.len(),
            k: Vec::new(),
            v: Vec::new(),
        });
        let at = (page * PAGE + pos % PAGE) * pool.width;
        if pool.k.len() < at + pool.width {
            // Grow to whole pages, at least doubling, so a layer reallocates a logarithmic number of times.
            let len = ((page + 1) * PAGE * pool.width).max(2 * pool.k.len());
            pool.k.resize(len, 0.0);
            pool.v.resize(len, 0.0);
        }
        pool.k[at..at + pool.width].copy_from_slice(k);
        pool.v[at..at + pool.width].copy_from_slice(v);
        Ok(())
    }

    /// Gives the slot's pages back to the pool (its sequence has ended).
    pub fn release(&mut self, slot: usize) {
        let table = std::mem::take(&mut self.tables[slot]);
        self.free.extend(table.into_iter().rev());
    }

    /// The keys and values of the sequence in `slot` at `layer`, for attention.
    pub fn sequence(&self, layer: usize, slot: usize) -> SeqKv<'_> {
        let pool = &self.layers[&layer];
        SeqKv {
            width: pool.width,
            table: &self.tables[slot],
            k: &pool.k,
            v: &pool.v,
        }
    }
}

/// One sequence's cached keys and values at one layer, position by position.
pub struct SeqKv<'a> {
    width: usize,
    table: &'a [u32],
    k: &'a [f32],
    v: &'a [f32],
}

impl SeqKv<'_> {
    fn at(&self, pos: usize) -> usize {
        (self.table[pos / PAGE] as usize * PAGE + pos % PAGE) * self.width
    }

    /// The keys of position `pos`, all KV heads (`width` values).
    pub fn key(&self, pos: usize) -> &[f32] {
        &self.k[self.at(pos)..][..self.width]
    }

    pub fn value(&self, pos: usize) -> &[f32] {
        &self.v[self.at(pos)..][..self.width]
    }

    /// The key pool, value pool, page table and width, as generated attention takes them (`AttentionArgs`).
    pub fn raw(&self) -> (*const f32, *const f32, *const u32, usize) {
        (
            self.k.as_ptr(),
            self.v.as_ptr(),
            self.table.as_ptr(),
            self.width,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_lent_per_sequence_and_reused_after_release() {
        let mut kv = PagedKv::new(2, 3 * PAGE);
        let row = |x: f32| vec![x; 4];
        for pos in 0..PAGE + 1 {
            kv.write(0, 0, pos, &row(pos as f32), &row(-(pos as f32)))
                .unwrap();
        }
        kv.write(0, 1, 0, &row(100.0), &row(-100.0)).unwrap();
        assert_eq!(kv.pages(), (3, 3));
        // Every layer uses the slot's pages as they are.
        kv.write(1, 0, PAGE, &row(7.0), &row(7.0)).unwrap();
        let (a, b) = (kv.sequence(0, 0), kv.sequence(0, 1));
        assert_eq!(
            (a.key(PAGE)[0], a.value(3)[0], b.key(0)[0]),
            (PAGE as f32, -3.0, 100.0)
        );
        // Full: a fourth page is refused with the capacity in the error.
        let full = kv.write(0, 1, PAGE, &row(1.0), &row(1.0)).unwrap_err();
        assert!(
            full.to_string().contains(&format!("{}", 3 * PAGE)),
            "{full}"
        );
        // Released pages serve the next sequence in any slot.
        kv.release(0);
        assert_eq!(kv.pages(), (1, 3));
        kv.write(0, 1, PAGE, &row(5.0), &row(5.0)).unwrap();
        assert_eq!(kv.sequence(0, 1).key(PAGE)[0], 5.0);
        assert_eq!(kv.sequence(0, 1).key(0)[0], 100.0);
    }
}
