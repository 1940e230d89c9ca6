//! Weight layouts: how a plan stores a weight's blocks for the kernels that read it.
//!
//! GGUF stores each row's blocks one after another with f16 scales inside each block. Kernels prefer:
//! - **f32 scales**: each block's f16 fields (scale, minimum) widened to f32 and moved to the front, so the hot
//!   loop does no half-precision conversion: `[f32 per f16 field, in order][the block's other bytes, in order]`;
//! - **interleaved rows**: rows in groups of `interleave`, block by block (block b of rows 4g..4g+4 together), so
//!   one pass over the activations feeds several output rows.
//!
//! Every layout is lossless: f16 to f32 is exact, so a repacked block narrows back to the original bytes, and the
//! reference dequantizer reads it through that.

use crate::format::QuantFormat;
use half::f16;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub f32_scales: bool,
    /// Rows per interleaved group (1: row after row).
    pub interleave: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::GGUF
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.f32_scales, self.interleave) {
            (false, 1) => f.write_str("gguf"),
            (true, 1) => f.write_str("f32s"),
            (false, n) => write!(f, "x{n}"),
            (true, n) => write!(f, "f32s.x{n}"),
        }
    }
}

/// Byte offsets of the f16 fields (scales, minimums) inside a GGUF block; empty for formats without them.
pub fn f16_fields(format: QuantFormat) -> &'static [usize] {
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q5_0 | QuantFormat::Q8_0 => &[0],
        QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4_K | QuantFormat::Q5_K => &[0, 2],
        QuantFormat::Q2_K => &[80, 82],
        QuantFormat::Q3_K => &[108],
        QuantFormat::Q6_K => &[208],
        QuantFormat::TQ1_0 => &[52],
        QuantFormat::TQ2_0 => &[64],
        // Plain floats have no blocks to repack; Q8_K's scale is f32 already, and the ternary row formats' is the
        // tensor's.
        QuantFormat::F32
        | QuantFormat::F16
        | QuantFormat::BF16
        | QuantFormat::Q8_K
        | QuantFormat::I2_S
        | QuantFormat::TL1
        | QuantFormat::TL2 => &[],
    }
}

/// The largest block of any format (Q8_K), for stack buffers.
pub const MAX_BLOCK_BYTES: usize = 292;

impl Layout {
    pub const GGUF: Layout = Layout {
        f32_scales: false,
        interleave: 1,
    };

    /// Bytes of one stored block.
    pub fn block_bytes(self, format: QuantFormat) -> usize {
        format.block_bytes()
            + if self.f32_scales {
                2 * f16_fields(format).len()
            } else {
                0
            }
    }

    /// Bytes a weight of this format and row-major shape takes in this layout (the format's tensor trailer, which
    /// every layout keeps at the end, included), or `None` when its rows are not whole blocks, the layout does not
    /// fit it, or the size overflows.
    pub fn stored_bytes(self, format: QuantFormat, shape: &[usize]) -> Option<usize> {
        let (inner, outer) = shape.split_last()?;
        if !inner.is_multiple_of(format.block_elems()) || !self.fits(format, shape) {
            return None;
        }
        let blocks = outer
            .iter()
            .try_fold(inner / format.block_elems(), |acc, &d| acc.checked_mul(d))?;
        blocks
            .checked_mul(self.block_bytes(format))?
            .checked_add(format.tensor_trailer_bytes())
    }

    /// Whether `format` and a `[rows, cols]` shape can be stored this way.
    pub fn fits(self, format: QuantFormat, shape: &[usize]) -> bool {
        let scales_ok = !self.f32_scales || !f16_fields(format).is_empty();
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        scales_ok
            && self.interleave >= 1
            && rows.is_multiple_of(self.interleave)
            && (self.interleave == 1 || shape.len() == 2)
    }

    /// Repacks GGUF bytes of a `[rows, cols]` (or 1-D) weight into this layout; a tensor trailer stays last.
    pub fn repack(self, format: QuantFormat, shape: &[usize], gguf: &[u8]) -> Vec<u8> {
        let (src_bytes, dst_bytes) = (format.block_bytes(), self.block_bytes(format));
        let (gguf, trailer) = gguf.split_at(gguf.len() - format.tensor_trailer_bytes());
        let blocks = gguf.len() / src_bytes;
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        let per_row = blocks / rows;
        let mut out = vec![0u8; blocks * dst_bytes + trailer.len()];
        out[blocks * dst_bytes..].copy_from_slice(trailer);
        for r in 0..rows {
            for b in 0..per_row {
                let src = &gguf[(r * per_row + b) * src_bytes..][..src_bytes];
                let at = self.block_index(r, b, per_row) * dst_bytes;
                self.widen(format, src, &mut out[at..at + dst_bytes]);
            }
        }
        out
    }

    /// Index, among stored blocks, of block `b` of row `r` (`per_row` blocks per row).
    pub fn block_index(self, r: usize, b: usize, per_row: usize) -> usize {
        let (group, lane) = (r / self.interleave, r % self.interleave);
        (group * per_row + b) * self.interleave + lane
    }

    fn widen(self, format: QuantFormat, src: &[u8], dst: &mut [u8]) {
        if !self.f32_scales {
            dst.copy_from_slice(src);
            return;
        }
        let fields = f16_fields(format);
        for (k, &f) in fields.iter().enumerate() {
            let value = f16::from_le_bytes([src[f], src[f + 1]]).to_f32();
            dst[4 * k..4 * k + 4].copy_from_slice(&value.to_le_bytes());
        }
        let mut at = 4 * fields.len();
        for (start, end) in other_bytes(fields, src.len()) {
            dst[at..at + end - start].copy_from_slice(&src[start..end]);
            at += end - start;
        }
    }

    /// Restores the GGUF bytes of one stored block into `dst` (exact: the f32 values came from f16).
    pub fn narrow(self, format: QuantFormat, stored: &[u8], dst: &mut [u8]) {
        if !self.f32_scales {
            dst.copy_from_slice(stored);
            return;
        }
        let fields = f16_fields(format);
        for (k, &f) in fields.iter().enumerate() {
            let value = f32::from_le_bytes(stored[4 * k..4 * k + 4].try_into().expect("4 bytes"));
            dst[f..f + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
        }
        let mut at = 4 * fields.len();
        for (start, end) in other_bytes(fields, dst.len()) {
            dst[start..end].copy_from_slice(&stored[at..at + end - start]);
            at += end - start;
        }
    }
}

/// The byte ranges of a block outside its f16 fields (which are sorted and 2 bytes each), in order.
fn other_bytes(fields: &[usize], block_bytes: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let starts = std::iter::once(0).chain(fields.iter().map(|f| f + 2));
    let ends = fields.iter().copied().chain(std::iter::once(block_bytes));
    starts.zip(ends).filter(|(s, e)| s < e)
}
