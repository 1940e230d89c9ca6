//! I2_S (bitnet.cpp): 2-bit ternary codes with one scale for the whole tensor, against BitNet's per-token int8
//! activations (`ActFormat::I8Row`). Neither side has a per-block scale, so a row's dot product stays an exact
//! integer until the very end: `dot = w_scale * dx * (sum(code * qx) - sum(qx))` (codes 0, 1, 2 for -1, 0, +1).
//! Per block the integer sum is added to the row's f32 accumulator, which holds it exactly (a row's total stays
//! far below 2^24 for any real width); `scale_row` applies the two scales once.

use crate::builder::Kb;
use crate::formats::{BlockDot, RowAcc};
use crate::kquants::shift_bytes;
use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I8X16};
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use kiln_ir::cpu_abi::ActFormat;
use kiln_ir::format::I2S_BLOCK;

/// A stored block is 32 bytes: byte j holds elements j, j + 32, j + 64, j + 96 in bits 7:6, 5:4, 3:2, 1:0.
pub struct I2s;

impl BlockDot for I2s {
    fn act(&self) -> ActFormat {
        ActFormat::I8Row
    }

    fn elems(&self) -> usize {
        I2S_BLOCK
    }

    fn block_bytes(&self) -> usize {
        I2S_BLOCK / 4
    }

    fn prepare(&self, _kb: &mut Kb, x: Value) -> Vec<Value> {
        vec![x]
    }

    fn unpacked(&self) -> Vec<Type> {
        vec![I8X16; 8]
    }

    /// The block's codes as eight vectors of one byte per value: vector `2n + part` holds elements
    /// `32n + 16part..`, the crumbs at shift `6 - 2n` of bytes `16part..`.
    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        let bytes = [kb.load(I8X16, w, 0), kb.load(I8X16, w, 16)];
        (0..4)
            .flat_map(|n| bytes.map(|b| (n, b)))
            .map(|(n, b)| shift_bytes(kb, b, -(6 - 2 * n as i64), 0x03))
            .collect()
    }

    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc) {
        let x = x[0];
        let mut dot = kb.i32x4(0);
        for (i, &codes) in w.iter().enumerate() {
            let xq = kb.load(I8X16, x, ActFormat::I8Row.codes_at() + 16 * i);
            dot = kb.dot_u8i8(dot, xq, codes);
        }
        // The codes' offset of 1: minus the activations' total, from their eight group sums.
        let sums = kb.load(I16X8, x, ActFormat::SUMS_AT);
        let ones = kb.bytes16(std::array::from_fn(|i| (i % 2 == 0) as u8));
        let ones = kb.bitcast(I16X8, ones);
        let total = kb.dot_i16(sums, ones);
        let sum = kb.b.ins().isub(dot, total);
        let sum = kb.b.ins().fcvt_from_sint(F32X4, sum);
        let v = kb.b.use_var(acc.v);
        let v = kb.b.ins().fadd(v, sum);
        kb.b.def_var(acc.v, v);
    }

    fn tensor_scaled(&self) -> bool {
        true
    }

    fn scale_row(&self, kb: &mut Kb, dot: Value, x_row: Value, w_scale: Value) -> Value {
        let ty = kb.b.func.dfg.value_type(dot);
        let load = |kb: &mut Kb, p: Value| {
            let s = kb.load(F32, p, 0);
            if ty.is_vector() {
                kb.b.ins().splat(ty, s)
            } else {
                s
            }
        };
        let dx = load(kb, x_row);
        let scale = load(kb, w_scale);
        let dot = kb.b.ins().fmul(dot, dx);
        kb.b.ins().fmul(dot, scale)
    }
}
