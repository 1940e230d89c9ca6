//! The ternary formats with one scale for the whole tensor (I2_S, TL1, TL2) against BitNet's per-token int8
//! activations (`ActFormat::I8Row`). Neither side has a per-block scale, so a row's dot product stays an exact
//! integer until the very end: `dot = w_scale * dx * (sum(code * qx) - sum(qx))` (codes 0, 1, 2 for -1, 0, +1).
//! The row's accumulator is an i32x4, converted to f32 once after the last block (exactly: a row's total stays far
//! below 2^24 for any real width); `scale_row` applies the two scales once.
//!
//! The formats differ only in how a 128-value block becomes eight vectors of 16 codes (vector `v` holding
//! elements `16v..16v + 16`), so the dot product, the activations and the scaling are one. I2_S shifts its 2-bit
//! crumbs out; TL1 and TL2 look their 4-bit indices up in 16-entry tables with `pshufb`, one table per weight of
//! a pair or triple (`kiln_ir::tl` describes the blocks).

use crate::builder::Kb;
use crate::formats::{bit_mask16, BlockDot, RowAcc};
use crate::kquants::{shift_bytes, TERNARY_MAX_CODE};
use cranelift_codegen::ir::types::{F32, I16X8, I32X4, I8X16};
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use kiln_ir::cpu_abi::ActFormat;
use kiln_ir::tl;
use kiln_ir::QuantFormat;

/// The generator for one of I2_S, TL1 and TL2.
pub struct TernaryRow(pub QuantFormat);

/// Vectors of 16 codes per block.
const VECTORS: usize = 8;

impl BlockDot for TernaryRow {
    fn act(&self) -> ActFormat {
        ActFormat::I8Row
    }

    fn elems(&self) -> usize {
        self.0.block_elems()
    }

    fn block_bytes(&self) -> usize {
        self.0.block_bytes()
    }

    fn prepare(&self, _kb: &mut Kb, x: Value) -> Vec<Value> {
        vec![x]
    }

    fn unpacked(&self) -> Vec<Type> {
        vec![I8X16; VECTORS]
    }

    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        match self.0 {
            QuantFormat::I2_S => i2_s_codes(kb, w),
            QuantFormat::TL1 => tl1_codes(kb, w),
            QuantFormat::TL2 => tl2_codes(kb, w),
            other => unreachable!("{other} is not a ternary row format"),
        }
    }

    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc) {
        let x = x[0];
        let pairs: Vec<(Value, Value)> = w
            .iter()
            .enumerate()
            .map(|(i, &codes)| {
                let xq = kb.load(I8X16, x, ActFormat::I8Row.codes_at() + 16 * i);
                (xq, codes)
            })
            .collect();
        let dot = kb.dot_u8i8_total(&pairs, TERNARY_MAX_CODE);
        // The codes' offset of 1: minus the activations' total, from their eight group sums.
        let sums = kb.load(I16X8, x, ActFormat::SUMS_AT);
        let ones = kb.bytes16(std::array::from_fn(|i| (i % 2 == 0) as u8));
        let ones = kb.bitcast(I16X8, ones);
        let total = kb.dot_i16(sums, ones);
        let sum = kb.b.ins().isub(dot, total);
        let v = kb.b.use_var(acc.v);
        let v = kb.b.ins().iadd(v, sum);
        kb.b.def_var(acc.v, v);
    }

    /// Integers: a row's total stays far below 2^24 for any real width, so converting it once is exact.
    fn acc_type(&self) -> Type {
        I32X4
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

/// I2_S: byte j of the 32 holds elements j, j + 32, j + 64, j + 96 in bits 7:6, 5:4, 3:2, 1:0, so vector
/// `2n + part` is the crumbs at shift `6 - 2n` of bytes `16part..`.
fn i2_s_codes(kb: &mut Kb, w: Value) -> Vec<Value> {
    let bytes = [kb.load(I8X16, w, 0), kb.load(I8X16, w, 16)];
    (0..4)
        .flat_map(|n| bytes.map(|b| (n, b)))
        .map(|(n, b)| shift_bytes(kb, b, -(6 - 2 * n as i64), 0x03))
        .collect()
}

/// A 16-entry `pshufb` table: `entry(i)` for each index.
fn table(kb: &mut Kb, entry: impl Fn(u8) -> u8) -> Value {
    kb.bytes16(std::array::from_fn(|i| entry(i as u8)))
}

/// The high and low nibbles of 16 bytes, as two vectors of indices.
fn nibbles(kb: &mut Kb, bytes: Value) -> [Value; 2] {
    [
        shift_bytes(kb, bytes, -4, 0x0F),
        shift_bytes(kb, bytes, 0, 0x0F),
    ]
}

/// The code (`weight + 1`) of weight `n` of an index; indices no block holds read as weight 0.
fn code(weights: Option<impl AsRef<[i8]>>, n: usize) -> u8 {
    weights.map_or(1, |w| (w.as_ref()[n] + 1) as u8)
}

/// The codes of 16 pair indices `3a + b + 4`: `[a + 1 for each, b + 1 for each]`.
fn pair_codes(kb: &mut Kb, index: Value) -> [Value; 2] {
    [0, 1].map(|n| {
        let t = table(kb, |i| {
            code((i <= tl::PAIR_INDEX_MAX).then(|| tl::pair_weights(i)), n)
        });
        kb.pshufb(t, index)
    })
}

/// TL1: byte `16h + j` holds pair `2h` (high nibble) and `2h + 1` (low), pair `q` being elements `32q + j` and
/// `32q + 16 + j`, so pair vector `q` gives code vectors `2q` and `2q + 1`.
fn tl1_codes(kb: &mut Kb, w: Value) -> Vec<Value> {
    let mut codes = Vec::with_capacity(VECTORS);
    for half in 0..2 {
        let bytes = kb.load(I8X16, w, 16 * half);
        for index in nibbles(kb, bytes) {
            codes.extend(pair_codes(kb, index));
        }
    }
    codes
}

/// TL2: byte j < 16 holds triple `(j, 16 + j, 32 + j)` high and `(48 + j, 64 + j, 80 + j)` low, their signs in
/// bits `j` and `16 + j` of the u32 at byte 16; bytes 20..28 hold the pairs of elements 96..128, byte `20 + j` pair
/// `(96 + j, 112 + j)` high and `(104 + j, 120 + j)` low.
fn tl2_codes(kb: &mut Kb, w: Value) -> Vec<Value> {
    let bytes = kb.load(I8X16, w, 0);
    // Bytes 12..28: the signs are its bytes 4..8.
    let signs = kb.load(I8X16, w, 12);
    let two = kb.i8x16(2);
    let mut codes = Vec::with_capacity(VECTORS);
    for (index, at) in nibbles(kb, bytes).into_iter().zip([4, 6]) {
        let negative = bit_mask16(kb, signs, at);
        for n in 0..3 {
            let digits = table(kb, |i| {
                code(
                    (i <= tl::TRIPLE_INDEX_MAX).then(|| tl::triple_weights(i, false)),
                    n,
                )
            });
            let code = kb.pshufb(digits, index);
            // A negative triple's codes mirror around 1: c becomes 2 - c.
            let mirrored = kb.b.ins().isub(two, code);
            codes.push(kb.b.ins().bitselect(negative, mirrored, code));
        }
    }
    // The pair bytes are the top 8 lanes of a load at 12, which stays inside the block.
    let tail = kb.load(I8X16, w, 12);
    let [high, low] = nibbles(kb, tail);
    let pairs = kb.shuffle32(high, low, [2, 3, 6, 7]);
    codes.extend(pair_codes(kb, pairs));
    codes
}
