//! Attention of the query heads that share one KV head (a GQA group, or a single head) over their sequence's
//! cached keys and values: for each head, the scores `q . k_j * scale` of the positions `first..=last`, their
//! softmax, and the weighted sum of the values. Cached positions live in pages of `KV_PAGE`, found through the
//! sequence's page table; each KV head's pages have a region of their own (`AttentionArgs`), so the group's rows
//! are one run of memory per page, and across pages taken in order.
//!
//! The group's heads read each key and value row once between them. Attention streams the cache: 512 positions
//! of a 256-wide head are 512 KiB of keys and as much of values, past this machine's L2, and a call per head
//! read them once per head (four times for Gemma 3's groups of four).
//!
//! The head width is baked in (a multiple of 8). The arithmetic follows the executor's reference attention
//! operation for operation (eight partial sums per score, added in order; each value row added with its
//! normalized weight, multiply then add), so the two differ only in `exp`'s last bits: SmolLM2 amplifies any
//! other rounding difference into its logits (a different summation order alone moves them by 0.15).

use crate::builder::{Kb, Target};
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;
use std::ops::Range;

use kiln_ir::cpu_abi::offsets::attention as arg;
use kiln_ir::cpu_abi::KV_PAGE;

/// Output vectors accumulated per pass of the weighted sum: 8 accumulators leave registers for the loads.
const SUM_VECTORS: usize = 8;

/// Positions per block of the weighted sum: 32 value rows of a 256-wide head are 32 KiB, which stay in cache
/// through the passes of every head of the group.
const VALUE_BLOCK: usize = 32;

/// The most scores computed together, keys times heads: their dot products interleaved, each key's vector loaded
/// once for the tile's heads and each head's for the tile's keys. A tile of `n` heads takes `SCORE_TILE / n` keys
/// (4, 2 or 1: a power of two, which the key loop's remainder needs).
const SCORE_TILE: usize = 4;

/// Vectors of the head per iteration of the score loop: up to 8, even (so a vector's partial sum is the same in
/// every chunk) and dividing the head's vectors (an even count for every supported width).
fn score_chunk(vectors: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&n| vectors.is_multiple_of(n))
        .expect("supported heads have an even number of vectors")
}

/// The group's heads in tiles of at most `SCORE_TILE`, as even as can be (7: 3 and 4). Each tile reads the keys
/// once; all of them in one tile would take more accumulators than there are registers.
fn head_tiles(group: usize) -> Vec<Range<usize>> {
    let tiles = group.div_ceil(SCORE_TILE);
    (0..tiles)
        .map(|t| t * group / tiles..(t + 1) * group / tiles)
        .collect()
}

struct Cache {
    pages: Value,
    page_stride: Value,
    kv_offset: Value,
    head_dim: usize,
}

impl Cache {
    /// The address of position `j`'s head in the pool at `base` (`AttentionArgs`' layout).
    fn row(&self, kb: &mut Kb, base: Value, j: Value) -> Value {
        let page_index = kb.b.ins().ushr_imm_s(j, KV_PAGE.trailing_zeros() as i64);
        let entry = kb.offset(self.pages, page_index, 4);
        let page = kb.b.ins().uload32(crate::builder::input(), entry, 0);
        let page = kb.b.ins().imul(page, self.page_stride);
        let head = kb.b.ins().iadd(page, self.kv_offset);
        let in_page = kb.b.ins().band_imm_s(j, KV_PAGE as i64 - 1);
        let row = kb.b.ins().imul_imm_s(in_page, self.head_dim as i64);
        let at = kb.b.ins().iadd(head, row);
        kb.offset(base, at, 4)
    }
}

/// Whether a head width and group have a generated attention: eight partial sums per score need whole groups of
/// 8.
pub fn supports(head_dim: usize, group: usize) -> bool {
    head_dim.is_multiple_of(8) && group > 0
}

/// The kernel's arguments, and the positions attended.
struct Args {
    q: Value,
    k: Value,
    v: Value,
    cache: Cache,
    first: Value,
    end: Value,
    /// Positions attended: `end - first`, the length of each head's row of scores.
    count: Value,
    out: Value,
    scores: Value,
    scale: Value,
}

impl Args {
    fn load(kb: &mut Kb, head_dim: usize) -> Self {
        let first = kb.arg(arg::FIRST, I64);
        let last = kb.arg(arg::LAST, I64);
        let end = kb.b.ins().iadd_imm_s(last, 1);
        Args {
            q: kb.arg(arg::Q, I64),
            k: kb.arg(arg::K, I64),
            v: kb.arg(arg::V, I64),
            cache: Cache {
                pages: kb.arg(arg::PAGES, I64),
                page_stride: kb.arg(arg::PAGE_STRIDE, I64),
                kv_offset: kb.arg(arg::KV_OFFSET, I64),
                head_dim,
            },
            first,
            end,
            count: kb.b.ins().isub(end, first),
            out: kb.arg(arg::OUT, I64),
            scores: kb.arg(arg::SCORES, I64),
            scale: kb.arg(arg::SCALE, F32),
        }
    }

    /// Head `h`'s score of position `j`: each head's scores are a row of `count` in `scores`.
    fn score_at(&self, kb: &mut Kb, h: Value, j: Value) -> Value {
        let row = kb.b.ins().imul(h, self.count);
        let i = kb.b.ins().isub(j, self.first);
        let i = kb.b.ins().iadd(row, i);
        kb.offset(self.scores, i, 4)
    }
}

pub fn build(func: &mut Function, target: Target, head_dim: usize, group: usize) {
    debug_assert!(supports(head_dim, group), "`generate` refuses other shapes");
    Kb::build(func, target, |kb| {
        let a = Args::load(kb, head_dim);
        // Each head's maximum score, then the reciprocal of its softmax total: kept in memory, since Cranelift
        // would recompute a value carried into a loop (a division, for the reciprocal) at every iteration.
        let per_head = kb.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            4 * group as u32,
            2,
        ));
        let per_head = kb.b.ins().stack_addr(I64, per_head, 0);
        score(kb, &a, head_dim, group, per_head);
        softmax(kb, &a, group, per_head);
        weighted_sum(kb, &a, head_dim, group);
    });
}

/// Every head's scores, and each head's maximum stored at `maxes`, `SCORE_TILE` scores at a time: each score is a
/// chain of dependent adds, and Cranelift emits instructions in the order built, so interleaving several lets the
/// CPU overlap them.
fn score(kb: &mut Kb, a: &Args, head_dim: usize, group: usize, maxes: Value) {
    let neg_inf = kb.f32(f32::NEG_INFINITY);
    let neg_inf = kb.b.ins().splat(F32X4, neg_inf);
    // Each tile's running maxima, lane by lane, and the head of each lane that holds a score.
    let mut lane_maxima: Vec<(Variable, Vec<usize>)> = Vec::new();
    for heads in head_tiles(group) {
        let keys = SCORE_TILE / heads.len();
        let whole = kb.b.ins().band_imm_s(a.count, -(keys as i64));
        let tiled_end = kb.b.ins().iadd(a.first, whole);
        let mut tiles = vec![(a.first, tiled_end, keys)];
        if keys > 1 {
            tiles.push((tiled_end, a.end, 1));
        }
        for (start, end, keys) in tiles {
            let tile = ScoreTile {
                keys,
                heads: heads.clone(),
                head_dim,
            };
            let max = kb.var(F32X4, neg_inf);
            kb.for_range(start, end, keys as i64, |kb, j| tile.build(kb, a, j, max));
            lane_maxima.push((max, tile.lane_heads()));
        }
    }
    for h in 0..group {
        let mut max = kb.f32(f32::NEG_INFINITY);
        for (lanes, heads) in &lane_maxima {
            let lanes = kb.b.use_var(*lanes);
            for (lane, _) in heads.iter().enumerate().filter(|&(_, &head)| head == h) {
                let m = kb.b.ins().extractlane(lanes, lane as u8);
                max = kb.b.ins().fmax(max, m);
            }
        }
        kb.store(max, maxes, 4 * h);
    }
}

/// The scores of `keys` consecutive positions for `heads`: lane `key * heads + n` of a tile's scores is
/// head `heads.start + n`'s score of position `j + key`.
struct ScoreTile {
    keys: usize,
    heads: Range<usize>,
    head_dim: usize,
}

impl ScoreTile {
    /// The head of each lane that holds a score.
    fn lane_heads(&self) -> Vec<usize> {
        (0..self.keys).flat_map(|_| self.heads.clone()).collect()
    }

    /// Scores the tile at position `j`: stores each score and takes the lanes' maxima into `max`.
    fn build(&self, kb: &mut Kb, a: &Args, j: Value, max: Variable) {
        let vectors = self.head_dim / 4;
        let chunk = score_chunk(vectors);
        let positions: Vec<Value> = (0..self.keys)
            .map(|n| kb.b.ins().iadd_imm_s(j, n as i64))
            .collect();
        let rows: Vec<Value> = positions.iter().map(|&p| a.cache.row(kb, a.k, p)).collect();
        // Partial sums of elements i mod 8 (`kiln_ir::dequant::dot_f32`), as two vectors per score, carried
        // through a loop over chunks of the head. Unrolled over the whole head, Cranelift elaborated one score's
        // chain at a time: one long chain of dependent adds, with `q` spilled for the next scores.
        let zero = kb.f32x4(0.0);
        let partials: Vec<[Variable; 2]> = self
            .lane_heads()
            .iter()
            .map(|_| [0, 1].map(|_| kb.var(F32X4, zero)))
            .collect();
        let walks: Vec<(Value, usize)> = std::iter::once(a.q)
            .chain(rows.iter().copied())
            .map(|start| (start, 16 * chunk))
            .collect();
        let tile_heads = self.heads.len();
        kb.for_walk(vectors / chunk, &walks, |kb, at| {
            let (q, rows) = (at[0], &at[1..]);
            for i in 0..chunk {
                let ks: Vec<Value> = rows
                    .iter()
                    .map(|&row| kb.load(F32X4, row, 16 * i))
                    .collect();
                for (n, h) in self.heads.clone().enumerate() {
                    let qi = kb.load(F32X4, q, 4 * h * self.head_dim + 16 * i);
                    for (key, &ki) in ks.iter().enumerate() {
                        let partial = partials[key * tile_heads + n][i % 2];
                        let product = kb.b.ins().fmul(qi, ki);
                        let sum = kb.b.use_var(partial);
                        let sum = kb.b.ins().fadd(sum, product);
                        kb.b.def_var(partial, sum);
                    }
                }
            }
        });
        // Each score sums its eight partials in order, from 0: transposed, the four scores' sums are one chain of
        // vector adds (lane by lane the reference's scalar chain) instead of four chains of scalar ones.
        let halves = |kb: &mut Kb, half: usize| -> [Value; 4] {
            std::array::from_fn(|lane| match partials.get(lane) {
                Some(partial) => kb.b.use_var(partial[half]),
                None => zero,
            })
        };
        let (low, high) = (halves(kb, 0), halves(kb, 1));
        let (low, high) = (kb.transpose32(low), kb.transpose32(high));
        let dots = low
            .into_iter()
            .chain(high)
            .fold(zero, |dot, lanes| kb.b.ins().fadd(dot, lanes));
        let scale = kb.b.ins().splat(F32X4, a.scale);
        let scores = kb.b.ins().fmul(dots, scale);
        let m = kb.b.use_var(max);
        let m = kb.pmax(scores, m);
        kb.b.def_var(max, m);
        if self.keys == SCORE_TILE {
            let head = kb.i64(self.heads.start as i64);
            let at = a.score_at(kb, head, j);
            kb.store(scores, at, 0);
            return;
        }
        for (lane, h) in self.lane_heads().into_iter().enumerate() {
            let score = kb.b.ins().extractlane(scores, lane as u8);
            let head = kb.i64(h as i64);
            let at = a.score_at(kb, head, positions[lane / tile_heads]);
            kb.store(score, at, 0);
        }
    }
}

/// Each head's scores turned into normalized softmax weights, in place: `exp(s - max)` four positions at a time
/// (each lane computes what the scalar `exp` does), their total summed position by position, then each weight
/// times the total's reciprocal. Reads each head's maximum from `per_head`, and leaves the reciprocal there.
fn softmax(kb: &mut Kb, a: &Args, group: usize, per_head: Value) {
    let whole = kb.b.ins().band_imm_s(a.count, !3);
    let zero = kb.i64(0);
    let heads = kb.i64(group as i64);
    kb.for_range(zero, heads, 1, |kb, h| {
        let row = a.score_at(kb, h, a.first);
        let slot = kb.offset(per_head, h, 4);
        // Applies `f` to the `lanes` scores from index `i` (one f32x4, or one f32) and stores the result.
        let each = |kb: &mut Kb, f: &dyn Fn(&mut Kb, Value, Value) -> Value| {
            for (start, end, lanes) in [(zero, whole, 4), (whole, a.count, 1)] {
                kb.for_range(start, end, lanes, |kb, i| {
                    let at = kb.offset(row, i, 4);
                    let ty = if lanes == 4 { F32X4 } else { F32 };
                    let s = kb.load_written(ty, at, 0);
                    let own = kb.load_written(F32, slot, 0);
                    let own = match lanes {
                        4 => kb.b.ins().splat(F32X4, own),
                        _ => own,
                    };
                    let result = f(kb, s, own);
                    kb.store(result, at, 0);
                });
            }
        };
        let zero = kb.f32(0.0);
        let total = kb.var(F32, zero);
        each(kb, &|kb, s, max| {
            let s = kb.b.ins().fsub(s, max);
            let e = kb.exp(s);
            let mut t = kb.b.use_var(total);
            let lanes = kb.b.func.dfg.value_type(e).lane_count() as u8;
            for lane in 0..lanes {
                let e = match lanes {
                    1 => e,
                    _ => kb.b.ins().extractlane(e, lane),
                };
                t = kb.b.ins().fadd(t, e);
            }
            kb.b.def_var(total, t);
            e
        });
        let total = kb.b.use_var(total);
        let one = kb.f32(1.0);
        let inv = kb.b.ins().fdiv(one, total);
        kb.store(inv, slot, 0);
        each(kb, &|kb, p, inv| kb.b.ins().fmul(p, inv));
    });
}

/// Each head's weighted sum of values: `VALUE_BLOCK` positions at a time, their value rows looked up in the page
/// table once for all heads and passes; within a block, each head's outputs `SUM_VECTORS` at a time, parked in
/// `out` from one block to the next. Each output still sums the positions in order.
fn weighted_sum(kb: &mut Kb, a: &Args, head_dim: usize, group: usize) {
    let vectors = head_dim / 4;
    let head_bytes = 4 * head_dim;
    let zero = kb.f32x4(0.0);
    kb.for_walk(group, &[(a.out, head_bytes)], |kb, at| {
        for i in 0..vectors {
            kb.store(zero, at[0], 16 * i);
        }
    });
    let table = kb.b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        8 * VALUE_BLOCK as u32,
        3,
    ));
    kb.for_range(a.first, a.end, VALUE_BLOCK as i64, |kb, block| {
        let block_end = kb.b.ins().iadd_imm_s(block, VALUE_BLOCK as i64);
        let block_end = kb.b.ins().umin(block_end, a.end);
        let positions = kb.b.ins().isub(block_end, block);
        let rows = kb.b.ins().stack_addr(I64, table, 0);
        kb.for_range(block, block_end, 1, |kb, j| {
            let row = a.cache.row(kb, a.v, j);
            let i = kb.b.ins().isub(j, block);
            let at = kb.offset(rows, i, 8);
            kb.store(row, at, 0);
        });
        let zero = kb.i64(0);
        let heads = kb.i64(group as i64);
        kb.for_range(zero, heads, 1, |kb, h| {
            let weights = a.score_at(kb, h, block);
            let out = kb.offset(a.out, h, head_bytes);
            for pass in (0..vectors).step_by(SUM_VECTORS) {
                let width = SUM_VECTORS.min(vectors - pass);
                let accs: Vec<Variable> = (0..width)
                    .map(|i| {
                        let sum = kb.load_written(F32X4, out, 16 * (pass + i));
                        kb.var(F32X4, sum)
                    })
                    .collect();
                kb.for_walk_n(positions, &[(weights, 4), (rows, 8)], |kb, at| {
                    let weight = kb.load_written(F32, at[0], 0);
                    let weight = kb.b.ins().splat(F32X4, weight);
                    let row = kb.load_written(I64, at[1], 0);
                    for (i, &acc) in accs.iter().enumerate() {
                        let vi = kb.load(F32X4, row, 16 * (pass + i));
                        let term = kb.b.ins().fmul(weight, vi);
                        let a = kb.b.use_var(acc);
                        let a = kb.b.ins().fadd(a, term);
                        kb.b.def_var(acc, a);
                    }
                });
                for (i, &acc) in accs.iter().enumerate() {
                    let a = kb.b.use_var(acc);
                    kb.store(a, out, 16 * (pass + i));
                }
            }
        });
    });
}
