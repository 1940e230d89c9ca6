//! Activation formats: what a matmul's f32 input is rounded to before the dot product with a weight format.
//!
//! ggml's dot products never multiply quantized weights by f32 activations: each weight format has a companion
//! `vec_dot_type` (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the k-quants and ternary formats, f16
//! for f16; bitnet.cpp's I2_S reads int8 activations with one scale per token). kiln's `matmul` is defined the same way, so the reference executor computes what llama.cpp computes
//! and what kiln's fast kernels compute: `dot(dequantize(w), round_trip(x))`.

use crate::format::{QuantFormat, QK_K};
use half::{bf16, f16};

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationFormat {
    F32,
    F16,
    BF16,
    /// Blocks of 32, one f16 scale `max|x| / 127`.
    Q8_0,
    /// Q8_0 plus a block sum (used by formats with a minimum); the values are the same as Q8_0's.
    Q8_1,
    /// Blocks of 256, one f32 scale from the signed extreme.
    Q8_K,
    /// BitNet b1.58's activation quantization: int8 codes with one f32 scale `max|x| / 127` per token (row).
    I8Row,
}

impl ActivationFormat {
    /// ggml's `vec_dot_type` of a weight format.
    pub fn for_weight(format: QuantFormat) -> Self {
        match format {
            QuantFormat::F32 => ActivationFormat::F32,
            QuantFormat::F16 => ActivationFormat::F16,
            QuantFormat::BF16 => ActivationFormat::BF16,
            QuantFormat::Q4_0 | QuantFormat::Q5_0 | QuantFormat::Q8_0 => ActivationFormat::Q8_0,
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => ActivationFormat::Q8_1,
            QuantFormat::Q2_K
            | QuantFormat::Q3_K
            | QuantFormat::Q4_K
            | QuantFormat::Q5_K
            | QuantFormat::Q6_K
            | QuantFormat::Q8_K
            | QuantFormat::TQ1_0
            | QuantFormat::TQ2_0 => ActivationFormat::Q8_K,
            QuantFormat::I2_S | QuantFormat::TL1 | QuantFormat::TL2 => ActivationFormat::I8Row,
        }
    }

    /// Rounds one row of activations (a whole number of blocks) to this format and back to f32, in place.
    pub fn round_trip(self, x: &mut [f32]) {
        match self {
            ActivationFormat::F32 => {}
            ActivationFormat::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
            ActivationFormat::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            ActivationFormat::Q8_0 | ActivationFormat::Q8_1 => {
                x.chunks_mut(32).for_each(round_trip_q8_0)
            }
            ActivationFormat::Q8_K => x.chunks_mut(QK_K).for_each(round_trip_q8_k),
            ActivationFormat::I8Row => round_trip_i8_row(x),
        }
    }
}

/// bitnet.cpp's per-token int8 quantization: d = max|x| / 127 over the row (kept in f32), q = round(x / d) with
/// ties to even (the SIMD rounding).
fn round_trip_i8_row(x: &mut [f32]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for v in x.iter_mut() {
        *v = (*v * id).round_ties_even() * d;
    }
}

/// `quantize_row_q8_0`: d = max|x| / 127 stored as f16, q = round(x / d) (ties to even, as ggml's SIMD paths).
fn round_trip_q8_0(block: &mut [f32]) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let d16 = f16::from_f32(d).to_f32();
    for v in block.iter_mut() {
        *v = (*v * id).round_ties_even() * d16;
    }
}

/// `quantize_row_q8_K`: the element of largest magnitude maps to -127; q = nearest(-127 x / max), at most 127.
fn round_trip_q8_k(block: &mut [f32]) {
    let mut max = 0f32;
    for &v in block.iter() {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    if max == 0.0 {
        block.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for v in block.iter_mut() {
        *v = (iscale * *v).round_ties_even().min(127.0) * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_keeps_the_extreme_and_rounds_the_rest() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        x[3] = 127.0;
        let original = x.clone();
        ActivationFormat::Q8_0.round_trip(&mut x);
        assert_eq!(x[3], 127.0);
        for (a, b) in x.iter().zip(&original) {
            assert!((a - b).abs() <= 0.5, "{a} vs {b}");
        }
    }

    #[test]
    fn i8_row_shares_one_scale_across_the_row() {
        let mut x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        x[300] = -4.0;
        let original = x.clone();
        ActivationFormat::I8Row.round_trip(&mut x);
        assert_eq!(x[300], -4.0);
        let d = 4.0 / 127.0;
        for (a, b) in x.iter().zip(&original) {
            assert!((a - b).abs() <= d / 2.0 + 1e-6, "{a} vs {b}");
            let code = a / d;
            assert!(
                (code - code.round()).abs() < 1e-3,
                "{a} is not on the row's grid"
            );
        }
    }

    #[test]
    fn q8_k_maps_the_signed_extreme_exactly() {
        let mut x = vec![0.01f32; QK_K];
        x[7] = -3.0;
        ActivationFormat::Q8_K.round_trip(&mut x);
        assert_eq!(x[7], -3.0);
        assert!((x[0] - 0.01).abs() < 3.0 / 127.0);
    }
}
