//! Rotary position embedding: every head of every row turned pair by pair by the cos/sin table the executor
//! computes for the rows' positions (`RopeArgs`). The arithmetic is the executor's reference rotation operation
//! for operation, `x0 * cos - x1 * sin` and `x0 * sin + x1 * cos` as separate multiplies and adds (no fused
//! multiply-add), so the two agree bit for bit and compiling RoPE changes no logit.
//!
//! The rotated width `dims` (a multiple of 8) and the head width are baked in, so a head is straight-line code:
//! NeoX pairs (i, i + dims/2) are lane-aligned vectors; interleaved pairs (2i, 2i + 1) sit side by side in a
//! vector, which meets its own swap `[x1, x0, ...]` and the table entries duplicated `[c0, c0, c1, c1]`.

use crate::builder::{Kb, Target};
use cranelift_codegen::ir::types::{F32X4, I32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, Value};

use kiln_ir::cpu_abi::offsets::rope as arg;
use kiln_ir::RopeStyle;

/// Whether a rotation has a generated kernel: whole vectors of pairs, within the head.
pub fn supports(head_dim: usize, dims: usize) -> bool {
    dims.is_multiple_of(8) && dims <= head_dim
}

pub fn build(func: &mut Function, target: Target, head_dim: usize, dims: usize, style: RopeStyle) {
    debug_assert!(supports(head_dim, dims), "`generate` refuses other shapes");
    let half = dims / 2;
    Kb::build(func, target, |kb| {
        let x = kb.arg(arg::X, I64);
        let x_stride = kb.arg(arg::X_STRIDE, I64);
        let tokens = kb.arg(arg::TOKENS, I64);
        let heads = kb.arg(arg::HEADS, I64);
        let (cos, sin) = (kb.arg(arg::COS, I64), kb.arg(arg::SIN, I64));
        let zero = kb.i64(0);
        kb.for_range(zero, tokens, 1, |kb, t| {
            let row = kb.b.ins().imul(t, x_stride);
            let row = kb.offset(x, row, 4);
            let table = [cos, sin].map(|base| kb.offset(base, t, 4 * half));
            kb.for_range(zero, heads, 1, |kb, h| {
                let head = kb.offset(row, h, 4 * head_dim);
                match style {
                    RopeStyle::Neox => neox(kb, head, table, half),
                    RopeStyle::Interleaved => interleaved(kb, head, table, half),
                }
            });
        });
    });
}

/// `[x0 * c - x1 * s, x0 * s + x1 * c]`, each product rounded before the sum, as the reference computes it.
fn turn(kb: &mut Kb, x0: Value, x1: Value, c: Value, s: Value) -> [Value; 2] {
    let (x0c, x1s) = (kb.b.ins().fmul(x0, c), kb.b.ins().fmul(x1, s));
    let (x0s, x1c) = (kb.b.ins().fmul(x0, s), kb.b.ins().fmul(x1, c));
    [kb.b.ins().fsub(x0c, x1s), kb.b.ins().fadd(x0s, x1c)]
}

/// Pairs (i, i + half): four pairs per pair of vectors.
fn neox(kb: &mut Kb, head: Value, [cos, sin]: [Value; 2], half: usize) {
    for i in (0..half).step_by(4) {
        let x0 = kb.load_written(F32X4, head, 4 * i);
        let x1 = kb.load_written(F32X4, head, 4 * (half + i));
        let c = kb.load(F32X4, cos, 4 * i);
        let s = kb.load(F32X4, sin, 4 * i);
        let [y0, y1] = turn(kb, x0, x1, c, s);
        kb.store(y0, head, 4 * i);
        kb.store(y1, head, 4 * (half + i));
    }
}

/// Pairs (2i, 2i + 1): two pairs per vector `[a0, b0, a1, b1]`. Lane by lane, `x * [c0, c0, c1, c1]` and the
/// swap `[b0, a0, b1, a1] * [s0, s0, s1, s1]` are the two products of each new value: subtracted in the even
/// lanes (the sign of the second flipped, which is exactly a subtraction), added in the odd ones.
fn interleaved(kb: &mut Kb, head: Value, [cos, sin]: [Value; 2], half: usize) {
    let flip_even = {
        let bits = kb.bytes16(std::array::from_fn(|i| if i % 8 == 3 { 0x80 } else { 0 }));
        kb.bitcast(I32X4, bits)
    };
    for i in (0..half).step_by(4) {
        let c4 = kb.load(F32X4, cos, 4 * i);
        let s4 = kb.load(F32X4, sin, 4 * i);
        for (part, lanes) in [[0, 0, 1, 1], [2, 2, 3, 3]].into_iter().enumerate() {
            let at = 4 * (2 * i + 4 * part);
            let x = kb.load_written(F32X4, head, at);
            let c = kb.shuffle32(c4, c4, lanes);
            let s = kb.shuffle32(s4, s4, lanes);
            let swapped = kb.shuffle32(x, x, [1, 0, 3, 2]);
            let xc = kb.b.ins().fmul(x, c);
            let xs = kb.b.ins().fmul(swapped, s);
            let xs = kb.bitcast(I32X4, xs);
            let xs = kb.b.ins().bxor(xs, flip_even);
            let xs = kb.bitcast(F32X4, xs);
            let y = kb.b.ins().fadd(xc, xs);
            kb.store(y, head, at);
        }
    }
}
