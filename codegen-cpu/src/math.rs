//! Float math the kernels inline: f16 rounding and `exp` (Cephes' polynomial), with SiLU and GELU on top; `exp`
//! and the activations take an f32 or an f32x4 and compute each lane alike. Inline code instead of libm calls
//! keeps every kernel free of relocations.

use crate::builder::Kb;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, Value};
use kiln_ir::Activation;

impl Kb<'_> {
    /// `x` (>= 0, below 65504) rounded to the nearest f16 value, ties to even, as `f16::from_f32(x).to_f32()`.
    pub fn round_to_f16(&mut self, x: Value) -> Value {
        // Normal range: drop the 13 low mantissa bits, rounding to nearest even on the integer form.
        let bits = self.bitcast(I32, x);
        let odd = self.b.ins().ushr_imm_s(bits, 13);
        let odd = self.b.ins().band_imm_s(odd, 1);
        let bias = self.b.ins().iadd_imm_s(odd, 0xFFF);
        let rounded = self.b.ins().iadd(bits, bias);
        let rounded = self.b.ins().band_imm_s(rounded, !0x1FFF);
        let normal = self.bitcast(F32, rounded);
        // Subnormal f16 values are multiples of 2^-24.
        let scale = self.f32(16_777_216.0);
        let scaled = self.b.ins().fmul(x, scale);
        let steps = self.b.ins().nearest(scaled);
        let unscale = self.f32(1.0 / 16_777_216.0);
        let subnormal = self.b.ins().fmul(steps, unscale);
        let min_normal = self.f32(6.103_515_6e-5);
        let is_subnormal = self.b.ins().fcmp(FloatCC::LessThan, x, min_normal);
        self.b.ins().select(is_subnormal, subnormal, normal)
    }

    /// `c` in the type of `like` (an f32 or an f32x4).
    fn constant_like(&mut self, like: Value, c: f32) -> Value {
        if self.b.func.dfg.value_type(like).is_vector() {
            self.f32x4(c)
        } else {
            self.f32(c)
        }
    }

    /// `x` where `y < x`, else `y` (also where either is NaN): one `maxps` on vectors, where the IEEE `fmax`
    /// takes eight instructions to order NaNs and signed zeros.
    pub fn pmax(&mut self, x: Value, y: Value) -> Value {
        let greater = self.b.ins().fcmp(FloatCC::LessThan, y, x);
        self.pick(greater, x, y)
    }

    /// `x` where `x < y`, else `y` (also where either is NaN): one `minps` on vectors.
    pub fn pmin(&mut self, x: Value, y: Value) -> Value {
        let less = self.b.ins().fcmp(FloatCC::LessThan, x, y);
        self.pick(less, x, y)
    }

    /// `x` in the lanes where the comparison `mask` holds, else `y`; in the form Cranelift lowers to `minps` and
    /// `maxps`.
    fn pick(&mut self, mask: Value, x: Value, y: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        if ty.is_vector() {
            let mask = self.bitcast(ty, mask);
            self.b.ins().bitselect(mask, x, y)
        } else {
            self.b.ins().select(mask, x, y)
        }
    }

    /// `e^x` within 2 ulp over the range where the result is a normal f32 (inputs are clamped to it, NaN to its
    /// low end, as `f32::max` clamps).
    pub fn exp(&mut self, x: Value) -> Value {
        let vector = self.b.func.dfg.value_type(x).is_vector();
        let (lo, hi) = (self.constant_like(x, -87.0), self.constant_like(x, 88.0));
        let x = self.pmax(x, lo);
        let x = self.pmin(x, hi);
        let log2e = self.constant_like(x, std::f32::consts::LOG2_E);
        let n = self.b.ins().fmul(x, log2e);
        let n = self.b.ins().nearest(n);
        // r = x - n ln2, with ln2 split in two so the product is exact.
        let (ln2_hi, ln2_lo) = (
            self.constant_like(x, 0.693_359_4),
            self.constant_like(x, -2.121_944_4e-4),
        );
        let r = self.b.ins().fneg(n);
        let r = self.b.ins().fma(r, ln2_hi, x);
        let neg_n = self.b.ins().fneg(n);
        let r = self.b.ins().fma(neg_n, ln2_lo, r);
        let mut p = self.constant_like(x, 1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            let c = self.constant_like(x, c);
            p = self.b.ins().fma(p, r, c);
        }
        let r2 = self.b.ins().fmul(r, r);
        let one = self.constant_like(x, 1.0);
        let r1 = self.b.ins().fadd(r, one);
        let p = self.b.ins().fma(p, r2, r1);
        // 2^n from the exponent bits.
        // `n` is a whole number within the clamp: converted without the saturating forms' checks.
        let (n, float) = if vector {
            (self.b.ins().x86_cvtt2dq(I32X4, n), F32X4)
        } else {
            (self.b.ins().fcvt_to_sint_sat(I32, n), F32)
        };
        let bias = if vector {
            self.i32x4(127)
        } else {
            self.b.ins().iconst(I32, 127)
        };
        let e = self.b.ins().iadd(n, bias);
        let e = self.b.ins().ishl_imm_s(e, 23);
        let pow2 = self.bitcast(float, e);
        self.b.ins().fmul(p, pow2)
    }

    pub fn activation(&mut self, act: Activation, x: Value) -> Value {
        let one = self.constant_like(x, 1.0);
        match act {
            Activation::Silu => {
                let neg = self.b.ins().fneg(x);
                let e = self.exp(neg);
                let denom = self.b.ins().fadd(one, e);
                self.b.ins().fdiv(x, denom)
            }
            Activation::Gelu => {
                // 0.5 x (1 + tanh(z)), tanh(z) = 1 - 2 / (e^(2z) + 1)
                let x3 = self.b.ins().fmul(x, x);
                let x3 = self.b.ins().fmul(x3, x);
                let c = self.constant_like(x, 0.044715);
                let inner = self.b.ins().fma(x3, c, x);
                let two_k = self.constant_like(x, 2.0 * 0.797_884_6);
                let z2 = self.b.ins().fmul(inner, two_k);
                let e = self.exp(z2);
                let denom = self.b.ins().fadd(e, one);
                let two = self.constant_like(x, 2.0);
                let frac = self.b.ins().fdiv(two, denom);
                let tanh = self.b.ins().fsub(one, frac);
                let one_plus = self.b.ins().fadd(one, tanh);
                let half = self.constant_like(x, 0.5);
                let hx = self.b.ins().fmul(half, x);
                self.b.ins().fmul(hx, one_plus)
            }
            Activation::ReluSqr => {
                let zero = self.constant_like(x, 0.0);
                let r = self.b.ins().fmax(x, zero);
                self.b.ins().fmul(r, r)
            }
        }
    }
}
