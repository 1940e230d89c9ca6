//! Reference quantizers: f32 values to the blocks of a format, the inverse of `dequant`. They make test models
//! (`kiln quantize`), so they write exactly the GGUF layouts llama.cpp reads, and they are checked by dequantizing
//! what they write.
//!
//! Q8_0, Q4_0, F16 and F32 round as ggml's reference quantizers do. The ternary formats use BitNet b1.58's
//! absmean rule instead of ggml's absmax one: each block's scale is the mean magnitude of its values, and a
//! value becomes round(clamp(x / scale, -1, 1)). Absmax maps most values of an ordinary weight matrix to zero;
//! absmean keeps a third of them on each side, which is what a ternary-trained model's weights look like. I2_S
//! takes one absmean scale for the whole tensor, as BitNet b1.58 does.

use crate::format::{QuantFormat, QK_K};
use half::f16;

/// Formats `quantize` can write.
pub const TARGETS: [QuantFormat; 9] = [
    QuantFormat::F32,
    QuantFormat::F16,
    QuantFormat::Q8_0,
    QuantFormat::Q4_0,
    QuantFormat::TQ1_0,
    QuantFormat::TQ2_0,
    QuantFormat::I2_S,
    QuantFormat::TL1,
    QuantFormat::TL2,
];

/// Whether `format` can hold rows of `row_len` values (whole blocks) and `quantize` writes it.
pub fn fits(format: QuantFormat, row_len: usize) -> bool {
    TARGETS.contains(&format) && row_len.is_multiple_of(format.block_elems())
}

/// Quantizes `x`, a whole tensor (a whole number of blocks), to `format`'s GGUF bytes.
///
/// Panics when `format` is not in `TARGETS` or `x` is not whole blocks: callers check `fits` first.
pub fn quantize(format: QuantFormat, x: &[f32]) -> Vec<u8> {
    let info = format.info();
    assert!(
        TARGETS.contains(&format) && x.len().is_multiple_of(info.block_elems),
        "cannot quantize {} values to {format}",
        x.len()
    );
    match format {
        QuantFormat::I2_S => return i2_s_tensor(x),
        QuantFormat::TL1 | QuantFormat::TL2 => return tl_tensor(format, x),
        _ => {}
    }
    let block: fn(&[f32], &mut [u8]) = match format {
        QuantFormat::F32 => |x, out| out.copy_from_slice(&x[0].to_le_bytes()),
        QuantFormat::F16 => |x, out| out.copy_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
        QuantFormat::Q8_0 => q8_0_block,
        QuantFormat::Q4_0 => q4_0_block,
        QuantFormat::TQ1_0 => tq1_0_block,
        QuantFormat::TQ2_0 => tq2_0_block,
        other => unreachable!("{other} is not a block-wise quantize target"),
    };
    let mut out = vec![0u8; x.len() / info.block_elems * info.block_bytes];
    for (x, out) in x
        .chunks_exact(info.block_elems)
        .zip(out.chunks_exact_mut(info.block_bytes))
    {
        block(x, out);
    }
    out
}

fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d).
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (q, &v) in out[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

/// `quantize_row_q4_0_ref`: the value of largest magnitude maps to -8, q = min(x / d + 8.5, 15) truncated.
fn q4_0_block(x: &[f32], out: &mut [u8]) {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let code = |v: f32| ((v * id + 8.5) as u8).min(15);
    for j in 0..16 {
        out[2 + j] = code(x[j]) | (code(x[j + 16]) << 4);
    }
}

/// The absmean scale of a block (or tensor) and its ternary digits (0, 1, 2 for -1, 0, +1).
fn ternary(x: &[f32]) -> (f32, Vec<u8>) {
    let scale = x.iter().map(|v| v.abs()).sum::<f32>() / x.len() as f32;
    let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let digits = x
        .iter()
        .map(|&v| ((v * id).round().clamp(-1.0, 1.0) as i8 + 1) as u8)
        .collect();
    (scale, digits)
}

/// TQ2_0: four 2-bit digits per byte; byte m of each 32-byte run holds elements m, m + 32, m + 64, m + 96 of its
/// 128, in bits 1:0, 3:2, 5:4, 7:6. The f16 scale follows the 64 bytes.
fn tq2_0_block(x: &[f32], out: &mut [u8]) {
    let (scale, t) = ternary(x);
    pack_tq2_0_digits(&t, out);
    put_f16(out, QK_K / 4, scale);
}

/// A block's 256 ternary digits into TQ2_0's 64 bytes of codes.
fn pack_tq2_0_digits(t: &[u8], out: &mut [u8]) {
    for (run, bytes) in out[..QK_K / 4].chunks_exact_mut(32).enumerate() {
        for (m, byte) in bytes.iter_mut().enumerate() {
            *byte = (0..4).fold(0, |q, n| q | t[run * 128 + m + n * 32] << (2 * n));
        }
    }
}

/// TQ1_0 blocks rewritten as TQ2_0 blocks of the same values, exactly: the same ternary digits, 2 bits each
/// instead of base 3, and the same f16 scale (66 bytes a block instead of 54).
pub fn tq1_0_to_tq2_0(tq1_0: &[u8]) -> Vec<u8> {
    let (from, to) = (
        QuantFormat::TQ1_0.block_bytes(),
        QuantFormat::TQ2_0.block_bytes(),
    );
    let mut out = vec![0u8; tq1_0.len() / from * to];
    for (block, tq2) in tq1_0.chunks_exact(from).zip(out.chunks_exact_mut(to)) {
        pack_tq2_0_digits(&crate::dequant::tq1_0_digits(block), tq2);
        tq2[QK_K / 4..].copy_from_slice(&block[52..54]);
    }
    out
}

/// TQ1_0: five base-3 digits per byte (the first most significant), stored as the fraction ceil(q * 256 / 243):
/// 32 bytes over elements 0..160 and 16 bytes over 160..240 (digit n of byte m is element `first + m + n * bytes`),
/// then four digits per byte of `qh` over 240..256, shifted up one digit. The f16 scale follows.
fn tq1_0_block(x: &[f32], out: &mut [u8]) {
    let (scale, t) = ternary(x);
    let pack = |digits: [u8; 5]| -> u8 {
        let q = digits.iter().fold(0u16, |q, &d| q * 3 + d as u16);
        (q * 256).div_ceil(243) as u8
    };
    let mut at = 0;
    for (bytes, first) in [(32, 0), (16, 160)] {
        for m in 0..bytes {
            out[at + m] = pack(std::array::from_fn(|n| t[first + m + n * bytes]));
        }
        at += bytes;
    }
    for j in 0..4 {
        out[48 + j] = pack(std::array::from_fn(|n| {
            if n < 4 {
                t[240 + j + n * 4]
            } else {
                0
            }
        }));
    }
    put_f16(out, 52, scale);
}

/// I2_S as bitnet.cpp writes it on x86: per 128 values, byte j holds elements j, j + 32, j + 64, j + 96 in bits
/// 7:6, 5:4, 3:2, 1:0; then the f32 scale, padded to 32 bytes.
fn i2_s_tensor(x: &[f32]) -> Vec<u8> {
    let (scale, t) = ternary(x);
    let mut out = vec![0u8; x.len() / 4 + crate::format::TENSOR_SCALE_TRAILER];
    for (block, digits) in out.chunks_exact_mut(32).zip(t.chunks_exact(128)) {
        for (j, byte) in block.iter_mut().enumerate() {
            *byte = (0..4).fold(0, |q, n| q | digits[j + 32 * n] << (6 - 2 * n));
        }
    }
    out[x.len() / 4..][..4].copy_from_slice(&scale.to_le_bytes());
    out
}

/// TL1 or TL2 in kiln's row blocks (`tl::row_blocks`), with the tensor's absmean scale in the trailer as I2_S
/// keeps it. The GGUF writer tiles the rows into bitnet.cpp's layout.
fn tl_tensor(format: QuantFormat, x: &[f32]) -> Vec<u8> {
    let (scale, digits) = ternary(x);
    let weights: Vec<i8> = digits.iter().map(|&d| d as i8 - 1).collect();
    let mut out = crate::tl::row_blocks(format, &weights);
    let blocks = out.len();
    out.resize(blocks + crate::format::TENSOR_SCALE_TRAILER, 0);
    out[blocks..][..4].copy_from_slice(&scale.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect()
    }

    fn round_trip(format: QuantFormat, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        dequantize(format, &quantize(format, x), &mut y);
        y
    }

    #[test]
    fn q8_0_and_q4_0_round_trip_within_a_step() {
        let x = values(256);
        for (format, steps) in [(QuantFormat::Q8_0, 127.0), (QuantFormat::Q4_0, 8.0)] {
            let y = round_trip(format, &x);
            for (block_x, block_y) in x.chunks(32).zip(y.chunks(32)) {
                let amax = block_x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in block_x.iter().zip(block_y) {
                    assert!((a - b).abs() <= amax / steps * 1.01, "{format}: {a} vs {b}");
                }
            }
        }
    }

    /// TQ1_0 rewritten as TQ2_0 dequantizes to the same values, bit for bit, over every digit and both signs of
    /// scale (a quantized block, and blocks of every digit pattern from the fixtures' bytes).
    #[test]
    fn tq1_0_to_tq2_0_keeps_every_value() {
        let mut tq1 = quantize(QuantFormat::TQ1_0, &values(2 * QK_K));
        let negated: Vec<f32> = values(QK_K).iter().map(|v| -v).collect();
        tq1.extend(quantize(QuantFormat::TQ1_0, &negated));
        // A block whose bytes run through every value 0..=255 (digits past 242 included), scale -0.75.
        let mut all: Vec<u8> = (0..52).map(|i| (i * 5) as u8).collect();
        all.extend(f16::from_f32(-0.75).to_le_bytes());
        tq1.extend(all);
        let tq2 = tq1_0_to_tq2_0(&tq1);
        let n = tq1.len() / QuantFormat::TQ1_0.block_bytes() * QK_K;
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        dequantize(QuantFormat::TQ1_0, &tq1, &mut a);
        dequantize(QuantFormat::TQ2_0, &tq2, &mut b);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ternary_formats_keep_exactly_the_absmean_digits() {
        let x = values(2 * QK_K);
        for format in [QuantFormat::TQ1_0, QuantFormat::TQ2_0] {
            let y = round_trip(format, &x);
            for (block_x, block_y) in x.chunks(QK_K).zip(y.chunks(QK_K)) {
                let (scale, digits) = ternary(block_x);
                let scale = f16::from_f32(scale).to_f32();
                for (d, v) in digits.iter().zip(block_y) {
                    assert_eq!(*v, scale * (*d as f32 - 1.0), "{format}");
                }
                // Absmean leaves both signs populated.
                assert!(digits.contains(&0) && digits.contains(&2), "{format}");
            }
        }
    }

    #[test]
    fn tensor_scaled_formats_keep_the_tensor_absmean_digits() {
        let x = values(3 * 128);
        for format in [QuantFormat::I2_S, QuantFormat::TL1, QuantFormat::TL2] {
            let bytes = quantize(format, &x);
            assert_eq!(bytes.len(), 3 * format.block_bytes() + 32, "{format}");
            let (scale, digits) = ternary(&x);
            let y = round_trip(format, &x);
            for (d, v) in digits.iter().zip(&y) {
                assert_eq!(*v, scale * (*d as f32 - 1.0), "{format}");
            }
        }
    }
}
