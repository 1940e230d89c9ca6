//! Random weights of every format and the scalar reference matmul over them: shared by the CPU kernel tests and benches and the CUDA kernel tests (which
//! include this file by path).

use half::f16;
use kiln_ir::activation::ActivationFormat;
use kiln_ir::dequant::dot_f32;
use kiln_ir::layout::f16_fields;
use kiln_ir::weights::WeightView;
use kiln_ir::QuantFormat;
use rand::Rng;

/// Every weight format the code generators have matmuls for.
pub const FORMATS: [QuantFormat; 16] = [
    QuantFormat::Q4_0,
    QuantFormat::Q4_1,
    QuantFormat::Q5_0,
    QuantFormat::Q5_1,
    QuantFormat::Q8_0,
    QuantFormat::Q4_K,
    QuantFormat::Q5_K,
    QuantFormat::Q6_K,
    QuantFormat::TQ2_0,
    QuantFormat::TQ1_0,
    QuantFormat::I2_S,
    QuantFormat::TL1,
    QuantFormat::TL2,
    QuantFormat::F32,
    QuantFormat::F16,
    QuantFormat::BF16,
];

/// Random GGUF bytes for `rows` rows of `k` values: random codes, scales and minimums small and positive-ish.
pub fn random_weight(rng: &mut impl Rng, format: QuantFormat, rows: usize, k: usize) -> Vec<u8> {
    let blocks = rows * k / format.block_elems();
    let mut bytes: Vec<u8> = (0..blocks * format.block_bytes())
        .map(|_| rng.gen())
        .collect();
    if matches!(
        format,
        QuantFormat::F32 | QuantFormat::F16 | QuantFormat::BF16
    ) {
        let values: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        return match format {
            QuantFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            QuantFormat::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
    }
    if format == QuantFormat::I2_S {
        // Codes 0..2 only (3 never occurs in bitnet.cpp's files), then the tensor's scale.
        bytes
            .iter_mut()
            .for_each(|b| *b = (0..4).fold(0, |q, i| q | (rng.gen_range(0..3u8) << (2 * i))));
        bytes.extend(rng.gen_range(0.01f32..0.05).to_le_bytes());
        bytes.extend([0u8; 28]);
        return bytes;
    }
    if matches!(format, QuantFormat::TL1 | QuantFormat::TL2) {
        // Random ternary weights in kiln's row blocks, then the tensor's scale.
        let weights: Vec<i8> = (0..rows * k).map(|_| rng.gen_range(-1..=1)).collect();
        let mut bytes = kiln_ir::tl::row_blocks(format, &weights);
        bytes.extend(rng.gen_range(0.01f32..0.05).to_le_bytes());
        bytes.extend([0u8; 28]);
        return bytes;
    }
    for block in bytes.chunks_exact_mut(format.block_bytes()) {
        for &f in f16_fields(format) {
            let v = f16::from_f32(rng.gen_range(-0.02..0.02));
            block[f..f + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// `dot(dequantize(W[r]), round_trip(x[t]))`: the reference `matmul`.
pub fn reference(w: &WeightView, x: &[f32], k: usize) -> Vec<f32> {
    let n = w.shape[0];
    let mut rounded = x.to_vec();
    let act = ActivationFormat::for_weight(w.format);
    rounded
        .chunks_exact_mut(k)
        .for_each(|row| act.round_trip(row));
    let mut row = vec![0f32; k];
    let mut out = vec![0f32; rounded.len() / k * n];
    for r in 0..n {
        w.dequantize_row(r, &mut row);
        for (t, xt) in rounded.chunks_exact(k).enumerate() {
            out[t * n + r] = dot_f32(&row, xt);
        }
    }
    out
}
