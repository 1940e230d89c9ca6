//! Attention of one query head over its sequence's cached keys and values: the scores `q . k_j * scale` of the
//! positions `first..=last`, their softmax, and the weighted sum of the values. Cached positions live in pages of
//! `KV_PAGE`, found through the sequence's page table.
//!
//! The head width is baked in (a multiple of 8). The arithmetic follows the executor's reference attention
//! operation for operation (eight partial sums per score, added in order; each value row added with its
//! normalized weight, multiply then add), so the two differ only in `exp`'s last bits: SmolLM2 amplifies any
//! other rounding difference into its logits (a different summation order alone moves them by 0.15). The
//! weighted sum keeps up to `SUM_VECTORS` output vectors in registers per pass over a block of positions.

use crate::builder::{Kb, Target};
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, Value};
use cranelift_frontend::Variable;

use kiln_ir::cpu_abi::offsets::attention as arg;
use kiln_ir::cpu_abi::KV_PAGE;

/// Output vectors accumulated per pass of the weighted sum: 8 accumulators leave registers for the loads.
const SUM_VECTORS: usize = 8;

/// Positions per block of the weighted sum: 32 value rows of a 256-wide head are 32 KiB, which stay in cache
/// through the block's passes.
const VALUE_BLOCK: usize = 32;

/// Positions scored together (a power of two): their dot products interleaved.
const SCORE_KEYS: usize = 4;

/// Vectors of the head per iteration of the score loop: up to 8, even (so a vector's partial sum is the same in
/// every chunk) and dividing the head's vectors (an even count for every supported width).
fn score_chunk(vectors: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&n| vectors.is_multiple_of(n))
        .expect("supported heads have an even number of vectors")
}

struct Cache {
    pages: Value,
    width: Value,
    kv_offset: Value,
}

impl Cache {
    /// The address of position `j`'s head in the pool at `base`.
    fn row(&self, kb: &mut Kb, base: Value, j: Value) -> Value {
        let page_index = kb.b.ins().ushr_imm_s(j, KV_PAGE.trailing_zeros() as i64);
        let entry = kb.offset(self.pages, page_index, 4);
        let page = kb.b.ins().uload32(crate::builder::input(), entry, 0);
        let in_page = kb.b.ins().band_imm_s(j, KV_PAGE as i64 - 1);
        let slot = kb.b.ins().imul_imm_s(page, KV_PAGE as i64);
        let slot = kb.b.ins().iadd(slot, in_page);
        let at = kb.b.ins().imul(slot, self.width);
        let at = kb.b.ins().iadd(at, self.kv_offset);
        kb.offset(base, at, 4)
    }
}

/// Whether a head width has a generated attention: eight partial sums per score need whole groups of 8.
pub fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8)
}

pub fn build(func: &mut Function, target: Target, head_dim: usize) {
    debug_assert!(supports(head_dim), "`generate` refuses other widths");
    let vectors = head_dim / 4;
    let chunk = score_chunk(vectors);
    Kb::build(func, target, |kb| {
        let q = kb.arg(arg::Q, I64);
        let (k, v) = (kb.arg(arg::K, I64), kb.arg(arg::V, I64));
        let cache = Cache {
            pages: kb.arg(arg::PAGES, I64),
            width: kb.arg(arg::WIDTH, I64),
            kv_offset: kb.arg(arg::KV_OFFSET, I64),
        };
        let first = kb.arg(arg::FIRST, I64);
        let last = kb.arg(arg::LAST, I64);
        let end = kb.b.ins().iadd_imm_s(last, 1);
        let out = kb.arg(arg::OUT, I64);
        let scores = kb.arg(arg::SCORES, I64);
        let scale = kb.arg(arg::SCALE, F32);
        let score_at = |kb: &mut Kb, j: Value| {
            let i = kb.b.ins().isub(j, first);
            kb.offset(scores, i, 4)
        };

        // Scores, and their maximum, `SCORE_KEYS` positions at a time: each score is a chain of dependent adds,
        // and Cranelift emits instructions in the order built, so interleaving several lets the CPU overlap them.
        let neg_inf = kb.f32(f32::NEG_INFINITY);
        let max = kb.var(F32, neg_inf);
        let score_keys = |kb: &mut Kb, j: Value, keys: usize| {
            let positions: Vec<Value> = (0..keys)
                .map(|n| kb.b.ins().iadd_imm_s(j, n as i64))
                .collect();
            let rows: Vec<Value> = positions.iter().map(|&p| cache.row(kb, k, p)).collect();
            // Partial sums of elements i mod 8 (`kiln_ir::dequant::dot_f32`), as two vectors per position, carried
            // through a loop over chunks of the head. Unrolled over the whole head, Cranelift elaborated one
            // position's chain at a time: one long chain of dependent adds, with `q` spilled for the next positions.
            let zero = kb.f32x4(0.0);
            let partials: Vec<[Variable; 2]> = (0..keys)
                .map(|_| [0, 1].map(|_| kb.var(F32X4, zero)))
                .collect();
            let walks: Vec<(Value, usize)> = std::iter::once(q)
                .chain(rows.iter().copied())
                .map(|start| (start, 16 * chunk))
                .collect();
            kb.for_walk(vectors / chunk, &walks, |kb, at| {
                let (q, rows) = (at[0], &at[1..]);
                for i in 0..chunk {
                    let qi = kb.load(F32X4, q, 16 * i);
                    for (partial, &row) in partials.iter().zip(rows) {
                        let ki = kb.load(F32X4, row, 16 * i);
                        let product = kb.b.ins().fmul(qi, ki);
                        let sum = kb.b.use_var(partial[i % 2]);
                        let sum = kb.b.ins().fadd(sum, product);
                        kb.b.def_var(partial[i % 2], sum);
                    }
                }
            });
            for (partial, &position) in partials.into_iter().zip(&positions) {
                let mut dot = kb.f32(0.0);
                for half in partial {
                    let half = kb.b.use_var(half);
                    for lane in 0..4 {
                        let p = kb.b.ins().extractlane(half, lane);
                        dot = kb.b.ins().fadd(dot, p);
                    }
                }
                let score = kb.b.ins().fmul(dot, scale);
                let at = score_at(kb, position);
                kb.store(score, at, 0);
                let m = kb.b.use_var(max);
                let m = kb.b.ins().fmax(m, score);
                kb.b.def_var(max, m);
            }
        };
        let count = kb.b.ins().isub(end, first);
        let whole = kb.b.ins().band_imm_s(count, -(SCORE_KEYS as i64));
        let grouped_end = kb.b.ins().iadd(first, whole);
        kb.for_range(first, grouped_end, SCORE_KEYS as i64, |kb, j| {
            score_keys(kb, j, SCORE_KEYS)
        });
        kb.for_range(grouped_end, end, 1, |kb, j| score_keys(kb, j, 1));

        // Softmax weights, unnormalized, and their sum: `exp` four positions at a time (each lane computes what
        // the scalar `exp` does), the sum still taken position by position; then the last few one by one.
        let max = kb.b.use_var(max);
        let zero = kb.f32(0.0);
        let total = kb.var(F32, zero);
        let whole = kb.b.ins().band_imm_s(count, !3);
        let vector_end = kb.b.ins().iadd(first, whole);
        // The weights of the `lanes` positions from `j`, as one f32x4 or one f32.
        let weights = |kb: &mut Kb, j: Value, lanes: u8| {
            let at = score_at(kb, j);
            let (ty, m) = match lanes {
                1 => (F32, max),
                _ => (F32X4, kb.b.ins().splat(F32X4, max)),
            };
            let s = kb.load_written(ty, at, 0);
            let s = kb.b.ins().fsub(s, m);
            let e = kb.exp(s);
            kb.store(e, at, 0);
            let mut t = kb.b.use_var(total);
            for lane in 0..lanes {
                let e = match lanes {
                    1 => e,
                    _ => kb.b.ins().extractlane(e, lane),
                };
                t = kb.b.ins().fadd(t, e);
            }
            kb.b.def_var(total, t);
        };
        kb.for_range(first, vector_end, 4, |kb, j| weights(kb, j, 4));
        kb.for_range(vector_end, end, 1, |kb, j| weights(kb, j, 1));
        let total = kb.b.use_var(total);
        let one = kb.f32(1.0);
        let inv = kb.b.ins().fdiv(one, total);

        // The weighted sum of values: `VALUE_BLOCK` positions at a time, and within a block `SUM_VECTORS` output
        // vectors per pass, parked in `out` from one block to the next. Each output still sums the positions in
        // order; the blocks keep a block's value rows in cache for all its passes, where passes over the whole
        // sequence streamed every row from memory once per pass (eight times for a 256-wide head).
        let zero = kb.f32x4(0.0);
        for i in 0..vectors {
            kb.store(zero, out, 16 * i);
        }
        kb.for_range(first, end, VALUE_BLOCK as i64, |kb, block| {
            let block_end = kb.b.ins().iadd_imm_s(block, VALUE_BLOCK as i64);
            let block_end = kb.b.ins().umin(block_end, end);
            for pass in (0..vectors).step_by(SUM_VECTORS) {
                let width = SUM_VECTORS.min(vectors - pass);
                let accs: Vec<_> = (0..width)
                    .map(|i| {
                        let sum = kb.load_written(F32X4, out, 16 * (pass + i));
                        kb.var(F32X4, sum)
                    })
                    .collect();
                kb.for_range(block, block_end, 1, |kb, j| {
                    let at = score_at(kb, j);
                    let p = kb.load_written(F32, at, 0);
                    let weight = kb.b.ins().fmul(p, inv);
                    let weight = kb.b.ins().splat(F32X4, weight);
                    let row = cache.row(kb, v, j);
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
