//! Reference dequantizers: scalar, one function per format, written to be obviously correct.
//!
//! Each follows ggml's block layout and performs the same f32 operations in the same order as the `gguf`
//! Python package's `gguf.quants`, so results match it bit for bit (see `tests/dequant_fixtures.rs`).
//! Fast kernels are tested against these, never the other way round.

use crate::format::{QuantFormat, QK_K};
use half::{bf16, f16};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes`, a whole tensor of `format` (whole blocks, then the format's trailer), into `out` (one f32
/// per element).
///
/// Panics when the lengths disagree: callers size both from the format table.
pub fn dequantize(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    let (blocks, trailer) = bytes.split_at(bytes.len() - format.tensor_trailer_bytes());
    dequantize_blocks(format, blocks, out);
    if format.has_tensor_scale() {
        let scale = tensor_scale(trailer);
        out.iter_mut().for_each(|y| *y *= scale);
    }
}

/// The per-tensor scale in the trailer of a format with one (I2_S, TL1, TL2).
pub fn tensor_scale(trailer: &[u8]) -> f32 {
    f32::from_le_bytes(
        trailer[..4]
            .try_into()
            .expect("a tensor-scale trailer holds an f32"),
    )
}

/// Dequantizes whole blocks of `format` into `out`, without any per-tensor scale (the ternary row formats' blocks
/// give their bare weights -1, 0, +1).
pub fn dequantize_blocks(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    let info = format.info();
    assert_eq!(bytes.len() % info.block_bytes, 0, "{format}: partial block");
    assert_eq!(
        bytes.len() / info.block_bytes * info.block_elems,
        out.len(),
        "{format}: length mismatch"
    );
    let block_fn: fn(&[u8], &mut [f32]) = match format {
        QuantFormat::F32 => f32_block,
        QuantFormat::F16 => f16_block,
        QuantFormat::BF16 => bf16_block,
        QuantFormat::Q4_0 => q4_0_block,
        QuantFormat::Q4_1 => q4_1_block,
        QuantFormat::Q5_0 => q5_0_block,
        QuantFormat::Q5_1 => q5_1_block,
        QuantFormat::Q8_0 => q8_0_block,
        QuantFormat::Q2_K => q2_k_block,
        QuantFormat::Q3_K => q3_k_block,
        QuantFormat::Q4_K => q4_k_block,
        QuantFormat::Q5_K => q5_k_block,
        QuantFormat::Q6_K => q6_k_block,
        QuantFormat::Q8_K => q8_k_block,
        QuantFormat::TQ1_0 => tq1_0_block,
        QuantFormat::TQ2_0 => tq2_0_block,
        QuantFormat::I2_S => i2_s_block,
        QuantFormat::TL1 => tl1_block,
        QuantFormat::TL2 => tl2_block,
    };
    for (block, y) in bytes
        .chunks_exact(info.block_bytes)
        .zip(out.chunks_exact_mut(info.block_elems))
    {
        block_fn(block, y);
    }
}

/// f32 dot product with eight partial sums, so the compiler can vectorize it; the summation order is fixed.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

fn f32_block(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn bf16_block(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// Q4_0: f16 scale, 32 4-bit codes (low nibbles are elements 0..16, high nibbles 16..32), offset 8.
fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i8 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i8 - 8) as f32;
    }
}

/// Q4_1: f16 scale and minimum, 32 unsigned 4-bit codes.
fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// The 5-bit codes of Q5_0/Q5_1: low nibbles as in Q4, bit 4 of element i is bit i of the u32 `qh`.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) as u8) << 4;
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
    }
    q
}

fn q5_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *y = d * (q as i8 - 16) as f32;
    }
}

fn q5_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (y, q) in y.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *y = d * q as f32 + m;
    }
}

fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

/// The 2-bit field of element `e` in the k-quant packing used by Q2_K, Q3_K and TQ2_0: each 128-element half
/// reads 32 bytes, four times, at shifts 0, 2, 4, 6.
fn crumb(qs: &[u8], e: usize) -> u8 {
    let (half, shift, lane) = (e / 128, (e % 128) / 32, e % 32);
    (qs[half * 32 + lane] >> (2 * shift)) & 3
}

/// Q2_K: 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit minimum (scaled by d and dmin).
fn q2_k_block(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for (e, y) in y.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *y = dl * crumb(qs, e) as f32 - ml;
    }
}

/// Q3_K: 2-bit codes plus a high bit in `hmask` (set means no offset, clear means -4), 6-bit signed scales.
fn q3_k_block(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((low | high << 4) as i8 - 32) as f32;
    }
    for (e, y) in y.iter_mut().enumerate() {
        let high_bit = (hmask[e % 32] >> (e / 32)) & 1;
        let q = crumb(qs, e) as i8 - (((high_bit ^ 1) << 2) as i8);
        *y = (d * scales[e / 16]) * q as f32;
    }
}

/// The eight 6-bit scales and minimums of Q4_K/Q5_K, packed in 12 bytes.
fn k_scale_min(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (d, m, md) = (&packed[0..4], &packed[4..8], &packed[8..12]);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = d[j] & 0x3F;
        mn[j] = m[j] & 0x3F;
        sc[j + 4] = (md[j] & 0x0F) | ((d[j] >> 2) & 0x30);
        mn[j + 4] = (md[j] >> 4) | ((m[j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// The 4-bit field of element `e` in Q4_K/Q5_K: sub-block pairs share 32 bytes, low nibble first.
fn k_nibble(qs: &[u8], e: usize) -> u8 {
    let (sub, lane) = (e / 32, e % 32);
    (qs[(sub / 2) * 32 + lane] >> (4 * (sub % 2))) & 0x0F
}

fn q4_k_block(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for (e, y) in y.iter_mut().enumerate() {
        let sub = e / 32;
        *y = (d * sc[sub] as f32) * k_nibble(qs, e) as f32 - dmin * mn[sub] as f32;
    }
}

fn q5_k_block(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = k_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (e, y) in y.iter_mut().enumerate() {
        let sub = e / 32;
        let q = k_nibble(qs, e) | ((qh[e % 32] >> sub) & 1) << 4;
        *y = (d * sc[sub] as f32) * q as f32 - dmin * mn[sub] as f32;
    }
}

/// Q6_K: low 4 bits in `ql` (64-byte runs, low nibble first), high 2 bits in `qh` (as `crumb`), offset 32,
/// 16 signed 8-bit scales.
fn q6_k_block(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (e, y) in y.iter_mut().enumerate() {
        let (half, nibble, lane) = (e / 128, (e % 128) / 64, e % 64);
        let low = (ql[half * 64 + lane] >> (4 * nibble)) & 0x0F;
        let q = (low | crumb(qh, e) << 4) as i8 - 32;
        *y = (d * scales[e / 16] as i8 as f32) * q as f32;
    }
}

/// Q8_K: f32 scale, 256 signed bytes (the block sums that follow serve dot products only).
fn q8_k_block(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *y = d * q as i8 as f32;
    }
}

/// TQ1_0: five ternary digits per byte as a base-3 fixed-point fraction (x * 256 / 243), then four per byte
/// in `qh`.
fn tq1_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 52);
    for (y, t) in y.iter_mut().zip(tq1_0_digits(b)) {
        *y = d * (t as i8 - 1) as f32;
    }
}

/// A TQ1_0 block's 256 ternary digits (0, 1, 2 for -1, 0, +1), in element order. Digit k of byte v is the top
/// bits of `v * 3^k` (mod 256) times 3.
pub fn tq1_0_digits(b: &[u8]) -> [u8; 256] {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let (qs, qh) = (&b[0..48], &b[48..52]);
    let digit = |v: u8, k: usize| ((v.wrapping_mul(POW3[k]) as u16 * 3) >> 8) as u8;
    let mut digits = [0u8; 256];
    let mut e = 0;
    for (bytes, runs) in [(&qs[0..32], 5), (&qs[32..48], 5), (qh, 4)] {
        for k in 0..runs {
            for &v in bytes {
                digits[e] = digit(v, k);
                e += 1;
            }
        }
    }
    digits
}

/// TQ2_0: 2-bit codes 0, 1, 2 for -1, 0, +1 in the k-quant crumb packing, one f16 scale.
fn tq2_0_block(b: &[u8], y: &mut [f32]) {
    let qs = &b[0..64];
    let d = f16_at(b, 64);
    for (e, y) in y.iter_mut().enumerate() {
        *y = d * (crumb(qs, e) as i8 - 1) as f32;
    }
}

/// I2_S (bitnet.cpp, x86): byte j of a 32-byte block holds elements j, j + 32, j + 64, j + 96 in bits 7:6, 5:4,
/// 3:2, 1:0; codes 0, 1, 2 mean -1, 0, +1. The tensor's scale is applied by `dequantize`.
fn i2_s_block(b: &[u8], y: &mut [f32]) {
    for (e, y) in y.iter_mut().enumerate() {
        let code = (b[e % 32] >> (6 - 2 * (e / 32))) & 3;
        *y = (code as i8 - 1) as f32;
    }
}

/// TL1 in kiln's row blocks (`tl::row_blocks`): 64 pair indices `3a + b + 4`.
fn tl1_block(b: &[u8], y: &mut [f32]) {
    tl_block(QuantFormat::TL1, b, y)
}

/// TL2 in kiln's row blocks (`tl::row_blocks`): 32 triples (magnitude index and sign bit) and 16 pairs.
fn tl2_block(b: &[u8], y: &mut [f32]) {
    tl_block(QuantFormat::TL2, b, y)
}

fn tl_block(format: QuantFormat, b: &[u8], y: &mut [f32]) {
    for (y, w) in y.iter_mut().zip(crate::tl::decode_row_block(format, b)) {
        *y = w as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i2_s_follows_bitnet_cpp_packing() {
        // Written out by hand from the published layout: byte 0 = 0b10_01_00_10 holds elements 0, 32, 64, 96 as
        // codes 2, 1, 0, 2 (+1, 0, -1, +1); byte 5 = 0b00_00_00_01 holds elements 5, 37, 69, 101 as -1, -1, -1, 0.
        let mut tensor = vec![0x55u8; 32]; // every other element 0
        tensor[0] = 0b10_01_00_10;
        tensor[5] = 0b00_00_00_01;
        tensor.extend(0.25f32.to_le_bytes());
        tensor.extend([0u8; 28]);
        let mut y = vec![9f32; 128];
        dequantize(QuantFormat::I2_S, &tensor, &mut y);
        assert_eq!((y[0], y[32], y[64], y[96]), (0.25, 0.0, -0.25, 0.25));
        assert_eq!((y[5], y[37], y[69], y[101]), (-0.25, -0.25, -0.25, 0.0));
        assert_eq!(y.iter().filter(|&&v| v == 0.0).count(), 128 - 6);
    }

    #[test]
    fn q8_k_is_scale_times_code() {
        let mut block = vec![0u8; QuantFormat::Q8_K.block_bytes()];
        block[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        block[4] = (-3i8) as u8;
        block[5] = 127;
        let mut y = vec![0f32; QK_K];
        dequantize(QuantFormat::Q8_K, &block, &mut y);
        assert_eq!((y[0], y[1], y[2]), (-1.5, 63.5, 0.0));
    }

    #[test]
    fn dot_matches_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.5).collect();
        let plain: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        assert!((dot_f32(&a, &b) as f64 - plain).abs() < 1e-3);
    }
}
