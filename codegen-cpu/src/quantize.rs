//! Activation quantization: rows of f32 (RMS-normalized first when the kernel is a norm prologue) rounded to the
//! block format the weights' dot product reads, with ggml's rounding rules (`kiln_ir::activation`).

use crate::builder::{Kb, Target};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, F32X4, F64, F64X2, I32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, Value};

use kiln_ir::cpu_abi::offsets::quantize as arg;
use kiln_ir::cpu_abi::{ActFormat, FloatRound};

/// One row's source: `x` times `scale * gain` when normalizing.
struct Source {
    x: Value,
    norm: Option<(Value, Value)>,
}

impl Source {
    /// The 4 values at byte `at + 16 i` of the row.
    fn load(&self, kb: &mut Kb, at: Value, i: usize) -> Value {
        let p = kb.b.ins().iadd(self.x, at);
        let v = kb.load(F32X4, p, 16 * i);
        match self.norm {
            None => v,
            Some((scale, gain)) => {
                let g_ptr = kb.b.ins().iadd(gain, at);
                let g = kb.load(F32X4, g_ptr, 16 * i);
                let v = kb.b.ins().fmul(v, scale);
                kb.b.ins().fmul(v, g)
            }
        }
    }
}

pub fn build(func: &mut Function, target: Target, act: ActFormat, k: usize, norm: bool) {
    Kb::build(func, target, |kb| {
        let x = kb.arg(arg::X, I64);
        let x_stride = kb.arg(arg::X_STRIDE, I64);
        let gain = kb.arg(arg::GAIN, I64);
        let out = kb.arg(arg::OUT, I64);
        let out_stride = kb.arg(arg::OUT_STRIDE, I64);
        let rows = kb.arg(arg::ROWS, I64);
        let eps = kb.arg(arg::EPS, F32);
        let zero = kb.i64(0);
        kb.for_range(zero, rows, 1, |kb, row| {
            let row_elems = kb.b.ins().imul(row, x_stride);
            let xr = kb.offset(x, row_elems, 4);
            let outr = kb.b.ins().imul(row, out_stride);
            let outr = kb.b.ins().iadd(out, outr);
            let norm = norm.then(|| {
                let scale = rms_scale(kb, xr, k, eps);
                (kb.b.ins().splat(F32X4, scale), gain)
            });
            let src = Source { x: xr, norm };
            let elems = act.block_elems();
            match act {
                ActFormat::F32 { round } => kb.for_count(k / 4, |kb, i| {
                    let at = kb.b.ins().imul_imm_s(i, 16);
                    let v = src.load(kb, at, 0);
                    let v = round_float(kb, v, round);
                    let dst = kb.offset(outr, i, 16);
                    kb.store(v, dst, 0);
                }),
                ActFormat::I8Row => {
                    let (d, id) = i8_row_scale(kb, &src, k);
                    kb.for_count(k / elems, |kb, blk| {
                        let at = kb.b.ins().imul_imm_s(blk, 4 * elems as i64);
                        let dst = kb.offset(outr, blk, act.block_bytes());
                        quantize_i8_row_block(kb, &src, at, dst, d, id);
                    })
                }
                ActFormat::Q8_0 | ActFormat::Q8K => kb.for_count(k / elems, |kb, blk| {
                    let at = kb.b.ins().imul_imm_s(blk, 4 * elems as i64);
                    let dst = kb.offset(outr, blk, act.block_bytes());
                    if act == ActFormat::Q8_0 {
                        quantize_q8_0(kb, &src, at, dst);
                    } else {
                        quantize_q8_k(kb, &src, at, dst);
                    }
                }),
            }
        });
    });
}

/// `1 / sqrt(mean(x^2) + eps)` over the row, the squares summed in f64 as ggml sums them: each square of an f32
/// is exact in f64, so the result rounds as the reference's does, and so do the activation codes after it. The
/// row is loaded as memory the kernel may write (a stand-alone norm runs in place).
pub(crate) fn rms_scale(kb: &mut Kb, xr: Value, k: usize, eps: Value) -> Value {
    let zero = kb.f64x2(0.0);
    let acc = kb.var(F64X2, zero);
    kb.for_count(k / 2, |kb, i| {
        // Two floats as one 8-byte load, widened to f64x2.
        let p = kb.offset(xr, i, 8);
        let pair = kb.load_written(F64, p, 0);
        let pair = kb.b.ins().scalar_to_vector(F64X2, pair);
        let pair = kb.bitcast(F32X4, pair);
        let v = kb.b.ins().fvpromote_low(pair);
        let a = kb.b.use_var(acc);
        let a = kb.b.ins().fma(v, v, a);
        kb.b.def_var(acc, a);
    });
    let a = kb.b.use_var(acc);
    let (lo, hi) = (kb.b.ins().extractlane(a, 0), kb.b.ins().extractlane(a, 1));
    let sum = kb.b.ins().fadd(lo, hi);
    let k = kb.b.ins().f64const(k as f64);
    let mean = kb.b.ins().fdiv(sum, k);
    let mean = kb.b.ins().fdemote(F32, mean);
    let mean = kb.b.ins().fadd(mean, eps);
    let root = kb.b.ins().sqrt(mean);
    let one = kb.f32(1.0);
    kb.b.ins().fdiv(one, root)
}

/// f32 lanes rounded to f16 or bf16 precision (nearest, ties to even), for f16/bf16 weights' dot products.
fn round_float(kb: &mut Kb, v: Value, round: FloatRound) -> Value {
    match round {
        FloatRound::None => v,
        FloatRound::F16 => {
            let lanes: Vec<Value> = (0..4)
                .map(|i| {
                    let s = kb.b.ins().extractlane(v, i);
                    let a = kb.b.ins().fabs(s);
                    let r = kb.round_to_f16(a);
                    kb.b.ins().fcopysign(r, s)
                })
                .collect();
            let mut out = kb.b.ins().scalar_to_vector(F32X4, lanes[0]);
            for (i, &l) in lanes.iter().enumerate().skip(1) {
                out = kb.b.ins().insertlane(out, l, i as u8);
            }
            out
        }
        FloatRound::BF16 => {
            let bits = kb.bitcast(I32X4, v);
            let odd = kb.b.ins().ushr_imm_s(bits, 16);
            let one = kb.i32x4(1);
            let odd = kb.b.ins().band(odd, one);
            let bias = kb.i32x4(0x7FFF);
            let bias = kb.b.ins().iadd(odd, bias);
            let r = kb.b.ins().iadd(bits, bias);
            let mask = kb.i32x4(!0xFFFF);
            let r = kb.b.ins().band(r, mask);
            kb.bitcast(F32X4, r)
        }
    }
}

/// Codes of 16 values (4 vectors of i32) narrowed to i8x16, and their sum.
fn pack16(kb: &mut Kb, q: &[Value]) -> (Value, Value) {
    let h0 = kb.b.ins().snarrow(q[0], q[1]);
    let h1 = kb.b.ins().snarrow(q[2], q[3]);
    let codes = kb.b.ins().snarrow(h0, h1);
    let s01 = kb.b.ins().iadd(q[0], q[1]);
    let s23 = kb.b.ins().iadd(q[2], q[3]);
    let s = kb.b.ins().iadd(s01, s23);
    let sum = kb.hsum_i32(s);
    (codes, sum)
}

/// ggml's `quantize_row_q8_0` on one block of 32: `d = max|x| / 127` (stored as f16), `q = round(x / d)`.
fn quantize_q8_0(kb: &mut Kb, src: &Source, at: Value, dst: Value) {
    let v: Vec<Value> = (0..8).map(|i| src.load(kb, at, i)).collect();
    let mut amax = kb.b.ins().fabs(v[0]);
    for &vi in &v[1..] {
        let a = kb.b.ins().fabs(vi);
        amax = kb.b.ins().fmax(amax, a);
    }
    let amax = kb.hmax_f32(amax);
    let c127 = kb.f32(127.0);
    let d = kb.b.ins().fdiv(amax, c127);
    let d = kb.round_to_f16(d);
    let zero = kb.f32(0.0);
    let id = kb.b.ins().fdiv(c127, amax);
    let id = kb.select_if_zero(amax, zero, id);
    let id = kb.b.ins().splat(F32X4, id);
    let q: Vec<Value> = v
        .iter()
        .map(|&vi| {
            let s = kb.b.ins().fmul(vi, id);
            let r = kb.b.ins().nearest(s);
            kb.b.ins().fcvt_to_sint_sat(I32X4, r)
        })
        .collect();
    kb.store(d, dst, 0);
    let sums = [0, 1].map(|half| {
        let (codes, sum) = pack16(kb, &q[4 * half..4 * half + 4]);
        kb.store_i16(sum, dst, ActFormat::SUMS_AT + 2 * half);
        kb.store(codes, dst, ActFormat::Q8_0.codes_at() + 16 * half);
        sum
    });
    // `d * sum(codes)` as a kernel summed it from the two group sums: the same bits.
    let sum = kb.b.ins().iadd(sums[0], sums[1]);
    let sum = kb.b.ins().fcvt_from_sint(F32, sum);
    let scaled = kb.b.ins().fmul(d, sum);
    let at = ActFormat::Q8_0
        .scaled_sum_at()
        .expect("Q8_0 blocks keep d * sum");
    kb.store(scaled, dst, at);
}

/// ggml's `quantize_row_q8_K` on one block of 256: the value of largest magnitude maps to -127,
/// `q = min(round(-127 x / max), 127)`, `d = 1 / (-127 / max)`.
fn quantize_q8_k(kb: &mut Kb, src: &Source, at: Value, dst: Value) {
    let v: Vec<Value> = (0..64).map(|i| src.load(kb, at, i)).collect();
    let (mut hi, mut lo) = (v[0], v[0]);
    for &vi in &v[1..] {
        hi = kb.b.ins().fmax(hi, vi);
        lo = kb.b.ins().fmin(lo, vi);
    }
    let hi = kb.hmax_f32(hi);
    let neg = kb.b.ins().fneg(lo);
    let neg = kb.hmax_f32(neg);
    let lo = kb.b.ins().fneg(neg);
    // The signed extreme (on a tie of magnitudes either sign gives the same values).
    let lo_wins = kb.b.ins().fcmp(FloatCC::GreaterThan, neg, hi);
    let max = kb.b.ins().select(lo_wins, lo, hi);
    let zero = kb.f32(0.0);
    let m127 = kb.f32(-127.0);
    let iscale = kb.b.ins().fdiv(m127, max);
    let iscale = kb.select_if_zero(max, zero, iscale);
    let one = kb.f32(1.0);
    let d = kb.b.ins().fdiv(one, iscale);
    let d = kb.select_if_zero(max, zero, d);
    kb.store(d, dst, 0);
    let iscale = kb.b.ins().splat(F32X4, iscale);
    let c127 = kb.f32x4(127.0);
    for group in 0..16 {
        let q: Vec<Value> = v[4 * group..4 * group + 4]
            .iter()
            .map(|&vi| {
                let s = kb.b.ins().fmul(vi, iscale);
                let r = kb.b.ins().nearest(s);
                let r = kb.b.ins().fmin(r, c127);
                kb.b.ins().fcvt_to_sint_sat(I32X4, r)
            })
            .collect();
        let (codes, sum) = pack16(kb, &q);
        kb.store_i16(sum, dst, ActFormat::SUMS_AT + 2 * group);
        kb.store(codes, dst, ActFormat::Q8K.codes_at() + 16 * group);
    }
}

/// The row's `d = max|x| / 127` and `id = 127 / max|x|` (0 for a zero row), for BitNet's per-token int8.
fn i8_row_scale(kb: &mut Kb, src: &Source, k: usize) -> (Value, Value) {
    let zero_v = kb.f32x4(0.0);
    let amax = kb.var(F32X4, zero_v);
    kb.for_count(k / 4, |kb, i| {
        let at = kb.b.ins().imul_imm_s(i, 16);
        let v = src.load(kb, at, 0);
        let v = kb.b.ins().fabs(v);
        let m = kb.b.use_var(amax);
        let m = kb.b.ins().fmax(m, v);
        kb.b.def_var(amax, m);
    });
    let amax = kb.b.use_var(amax);
    let amax = kb.hmax_f32(amax);
    let c127 = kb.f32(127.0);
    let d = kb.b.ins().fdiv(amax, c127);
    let zero = kb.f32(0.0);
    let id = kb.b.ins().fdiv(c127, amax);
    let id = kb.select_if_zero(amax, zero, id);
    (d, id)
}

/// One block of 128 of a per-token int8 row: `q = round(x * id)`, ties to even; every block stores the row's `d`.
fn quantize_i8_row_block(kb: &mut Kb, src: &Source, at: Value, dst: Value, d: Value, id: Value) {
    let id = kb.b.ins().splat(F32X4, id);
    kb.store(d, dst, 0);
    for group in 0..8 {
        let q: Vec<Value> = (0..4)
            .map(|i| {
                let v = src.load(kb, at, 4 * group + i);
                let s = kb.b.ins().fmul(v, id);
                let r = kb.b.ins().nearest(s);
                kb.b.ins().fcvt_to_sint_sat(I32X4, r)
            })
            .collect();
        let (codes, sum) = pack16(kb, &q);
        kb.store_i16(sum, dst, ActFormat::SUMS_AT + 2 * group);
        kb.store(codes, dst, ActFormat::I8Row.codes_at() + 16 * group);
    }
}
