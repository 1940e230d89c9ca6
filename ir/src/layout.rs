//! Weight layouts: how a plan stores a weight's blocks for the kernels that read it.
//!
//! GGUF stores each row's blocks one after another with f16 scales inside each block. Kernels prefer:
//! - **interleaved rows**: rows in groups of `interleave`, block by block (block b of rows 4g..4g+4 together), so
//!   one pass over the activations feeds several output rows;
//! - **f32 scales**: each block's f16 fields (scale, minimum) widened to f32, so the hot loop does no
//!   half-precision conversion, and moved either to the block's front (`Scales::F32`: `[f32 per f16 field, in
//!   order][the block's other bytes, in order]`) or, for interleaved rows, to the front of the row group's block
//!   (`Scales::Grouped`: a group block holds field 0 of each row, field 1 of each row, ..., then each row's other
//!   bytes, row by row), where one vector load gives a kernel the group's scales.
//!
//! Every layout is lossless: f16 to f32 is exact, so a repacked block narrows back to the original bytes, and the
//! reference dequantizer reads it through that.

use crate::format::QuantFormat;
use half::f16;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a layout keeps the blocks' f16 fields, and in what precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scales {
    /// As GGUF keeps them: f16, inside each block.
    Gguf,
    /// Widened to f32, at the front of each block.
    F32,
    /// Widened to f32, the row group's gathered at the front of each group block (needs interleaved rows).
    Grouped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub scales: Scales,
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
        match (self.scales, self.interleave) {
            (Scales::Gguf, 1) => f.write_str("gguf"),
            (Scales::F32, 1) => f.write_str("f32s"),
            (Scales::Gguf, n) => write!(f, "x{n}"),
            (Scales::F32, n) => write!(f, "f32s.x{n}"),
            (Scales::Grouped, n) => write!(f, "f32g.x{n}"),
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
        scales: Scales::Gguf,
        interleave: 1,
    };

    /// Bytes of one stored block; in a grouped layout, a group block's share per row.
    pub fn block_bytes(self, format: QuantFormat) -> usize {
        format.block_bytes()
            + match self.scales {
                Scales::F32 | Scales::Grouped => 2 * f16_fields(format).len(),
                Scales::Gguf => 0,
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
        let has_fields = !f16_fields(format).is_empty();
        let scales_ok = match self.scales {
            Scales::Gguf => true,
            Scales::F32 => has_fields,
            Scales::Grouped => has_fields && self.interleave > 1,
        };
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
                self.place(format, r, b, per_row).store(src, &mut out);
            }
        }
        out
    }

    /// Restores the GGUF bytes of row `r`'s block `b` (of `per_row`) from a weight's stored bytes into `dst`.
    pub fn read_block(
        self,
        format: QuantFormat,
        stored: &[u8],
        r: usize,
        b: usize,
        per_row: usize,
        dst: &mut [u8],
    ) {
        self.place(format, r, b, per_row).load(stored, dst);
    }

    /// Where row `r`'s block `b` lies in a stored weight.
    fn place(self, format: QuantFormat, r: usize, b: usize, per_row: usize) -> BlockPlace {
        let fields = f16_fields(format);
        let (group, lane) = (r / self.interleave, r % self.interleave);
        // Where the group's block `b` starts, in blocks: every earlier group block holds `interleave` rows' blocks.
        let group = (group * per_row + b) * self.interleave;
        let stored = self.block_bytes(format);
        let at = (group + lane) * stored;
        let (field_at, field_stride, others_at) = match self.scales {
            Scales::Gguf => (at, 0, at),
            Scales::F32 => (at, 4, at + 4 * fields.len()),
            Scales::Grouped => {
                let group_at = group * stored;
                let front = 4 * fields.len() * self.interleave;
                let others = format.block_bytes() - 2 * fields.len();
                (
                    group_at + 4 * lane,
                    4 * self.interleave,
                    group_at + front + lane * others,
                )
            }
        };
        BlockPlace {
            fields,
            block_bytes: format.block_bytes(),
            field_at,
            field_stride,
            others_at,
            inline: self.scales == Scales::Gguf,
        }
    }
}

/// Where one block's bytes lie in a stored weight: the GGUF block whole at `others_at` (`inline`), or its f16
/// fields widened to f32 (`field_stride` apart from `field_at`) and its other bytes, in order, from `others_at`.
struct BlockPlace {
    fields: &'static [usize],
    block_bytes: usize,
    field_at: usize,
    field_stride: usize,
    others_at: usize,
    inline: bool,
}

impl BlockPlace {
    /// Each f16 field's offset in the GGUF block and in the stored weight (none when inline).
    fn field_pieces(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let widened = if self.inline { &[][..] } else { self.fields };
        (widened.iter().enumerate()).map(|(k, &f)| (f, self.field_at + k * self.field_stride))
    }

    /// Each run of other bytes: `(offset in the GGUF block, offset in the stored weight, length)`.
    fn other_pieces(&self) -> Vec<(usize, usize, usize)> {
        if self.inline {
            return vec![(0, self.others_at, self.block_bytes)];
        }
        let mut at = self.others_at;
        other_bytes(self.fields, self.block_bytes)
            .map(|(start, end)| {
                at += end - start;
                (start, at - (end - start), end - start)
            })
            .collect()
    }

    /// Writes the GGUF block `gguf` into the stored weight `out`.
    fn store(&self, gguf: &[u8], out: &mut [u8]) {
        for (from, to) in self.field_pieces() {
            let value = f16::from_le_bytes([gguf[from], gguf[from + 1]]).to_f32();
            out[to..to + 4].copy_from_slice(&value.to_le_bytes());
        }
        for (from, to, n) in self.other_pieces() {
            out[to..to + n].copy_from_slice(&gguf[from..from + n]);
        }
    }

    /// Restores the GGUF block into `dst` from the stored weight `stored` (exact: the f32 values came from f16).
    fn load(&self, stored: &[u8], dst: &mut [u8]) {
        for (to, from) in self.field_pieces() {
            let value = f32::from_le_bytes(stored[from..from + 4].try_into().expect("4 bytes"));
            dst[to..to + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
        }
        for (to, from, n) in self.other_pieces() {
            dst[to..to + n].copy_from_slice(&stored[from..from + n]);
        }
    }
}

/// The byte ranges of a block outside its f16 fields (which are sorted and 2 bytes each), in order.
fn other_bytes(fields: &[usize], block_bytes: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let starts = std::iter::once(0).chain(fields.iter().map(|f| f + 2));
    let ends = fields.iter().copied().chain(std::iter::once(block_bytes));
    starts.zip(ends).filter(|(s, e)| s < e)
}
