//! Stand-alone RMSNorm: each group of `n` values (a head for QK-norms, a whole row for a post-norm) scaled by
//! `1 / sqrt(mean(x^2) + eps)` and the gain, then added to the residual for a post-norm. The scale is the
//! activation quantizer's (`quantize::rms_scale`, squares summed in f64), and each value is `x * scale * gain`
//! (then `residual + ...`) in the executor's order, so the result is the reference's.

use crate::builder::{Kb, Target};
use crate::quantize::rms_scale;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder};

use kiln_ir::cpu_abi::offsets::rms_norm as arg;

/// Whether a group width has a generated norm: whole vectors, and pairs for the f64 sum.
pub fn supports(n: usize) -> bool {
    n.is_multiple_of(4)
}

pub fn build(func: &mut Function, target: Target, n: usize, residual: bool) {
    debug_assert!(supports(n), "`generate` refuses other widths");
    Kb::build(func, target, |kb| {
        let x = kb.arg(arg::X, I64);
        let x_stride = kb.arg(arg::X_STRIDE, I64);
        let out = kb.arg(arg::OUT, I64);
        let out_stride = kb.arg(arg::OUT_STRIDE, I64);
        let res = kb.arg(arg::RESIDUAL, I64);
        let res_stride = kb.arg(arg::RESIDUAL_STRIDE, I64);
        let rows = kb.arg(arg::ROWS, I64);
        let groups = kb.arg(arg::GROUPS, I64);
        let gain = kb.arg(arg::GAIN, I64);
        let eps = kb.arg(arg::EPS, F32);
        let zero = kb.i64(0);
        kb.for_range(zero, rows, 1, |kb, t| {
            let [xr, outr, resr] =
                [(x, x_stride), (out, out_stride), (res, res_stride)].map(|(base, stride)| {
                    let at = kb.b.ins().imul(t, stride);
                    kb.offset(base, at, 4)
                });
            kb.for_range(zero, groups, 1, |kb, g| {
                let [xg, outg, resg] = [xr, outr, resr].map(|base| kb.offset(base, g, 4 * n));
                let scale = rms_scale(kb, xg, n, eps);
                let scale = kb.b.ins().splat(F32X4, scale);
                kb.for_count(n / 4, |kb, i| {
                    let [xi, outi, resi, gi] =
                        [xg, outg, resg, gain].map(|base| kb.offset(base, i, 16));
                    let v = kb.load_written(F32X4, xi, 0);
                    let v = kb.b.ins().fmul(v, scale);
                    let w = kb.load(F32X4, gi, 0);
                    let mut y = kb.b.ins().fmul(v, w);
                    if residual {
                        let r = kb.load_written(F32X4, resi, 0);
                        y = kb.b.ins().fadd(r, y);
                    }
                    kb.store(y, outi, 0);
                });
            });
        });
    });
}
