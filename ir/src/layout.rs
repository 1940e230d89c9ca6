//! Weight layouts: how a plan stores a weight's blocks for the kernels that read it.
//!
//! GGUF stores each row's blocks one after another with f16 scales inside each block. Kernels prefer:
//! - **interleaved rows**: rows in groups of `interleave`, block by block (block b of rows 4g..4g+4 together), so
//!   one pass over the activations feeds several output rows;
//! - **moved scales**: each block's f16 fields (scale, minimum) moved either to the block's front, widened to f32
//!   (`Scales::F32`: `[f32 per f16 field, in order][the block's other bytes, in order]`), or, for interleaved rows,
//!   to the front of the row group's block (a group block holds field 0 of each row, field 1 of each row, ...,
//!   then each row's other bytes, row by row), where one vector load gives a kernel the group's scales: widened to
//!   f32 (`Scales::Grouped`), so the hot loop does no half-precision conversion, or kept f16
//!   (`Scales::GroupedF16`), GGUF's own bytes, which the kernel widens. Grouped, the fifth bits of Q5_0 and Q5_1
//!   leave the rows too: the group's are bit planes after the fields (`GroupBlock`), so that one vector load and a
//!   shift per 16 codes spread them, where each row's 32 bits took a shuffle, a compare and two masks.
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
    /// Kept f16, gathered as `Grouped` gathers them: a block takes GGUF's bytes (Q4_1 20 rather than 24, Q8_0 34
    /// rather than 36), which a one-token kernel streams from memory, for a widening per group block.
    GroupedF16,
}

impl Scales {
    /// Whether the row group's fields are gathered at the front of each group block.
    pub fn grouped(self) -> bool {
        matches!(self, Scales::Grouped | Scales::GroupedF16)
    }

    /// Bytes of one stored field: 2 where it stays f16, else 4.
    pub fn field_bytes(self) -> usize {
        match self {
            Scales::Gguf | Scales::GroupedF16 => 2,
            Scales::F32 | Scales::Grouped => 4,
        }
    }
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
            (Scales::GroupedF16, n) => write!(f, "f16g.x{n}"),
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

/// Whether every f16 field of the GGUF blocks `gguf` is finite: what a kernel that widens them in registers
/// (`Scales::GroupedF16`) needs, its conversion being exact for finite values only.
pub fn fields_finite(format: QuantFormat, gguf: &[u8]) -> bool {
    let fields = f16_fields(format);
    let blocks = gguf[..gguf.len().saturating_sub(format.tensor_trailer_bytes())]
        .chunks_exact(format.block_bytes());
    blocks.into_iter().all(|block| {
        fields.iter().all(|&at| {
            let exponent = u16::from_le_bytes([block[at], block[at + 1]]) & 0x7C00;
            exponent != 0x7C00
        })
    })
}

/// Byte offset of the 32 fifth bits (`qh`) inside a GGUF block, for the formats that have them: right after the
/// f16 fields.
pub fn high_bits(format: QuantFormat) -> Option<usize> {
    match format {
        QuantFormat::Q5_0 => Some(2),
        QuantFormat::Q5_1 => Some(4),
        _ => None,
    }
}

/// Rows whose fifth bits share one 16-byte vector of bit planes in a grouped layout: two planes per row, one per
/// half of its 32 codes.
pub const PLANE_ROWS: usize = 4;

/// Where a grouped layout's group block keeps each part, in bytes from the block's start: first each f16 field of
/// every row, f16 or widened as the layout keeps fields (field `k` of row `lane` at `field_at(k, lane)`); then, for
/// formats with fifth bits, the rows' bit planes, 16 bytes per `PLANE_ROWS` rows, where bit `2 * (lane % 4)` of
/// byte `i` is row `lane`'s fifth bit of code `i` and the next bit that of code `16 + i`; then each row's other
/// bytes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupBlock {
    interleave: usize,
    fields: usize,
    field_bytes: usize,
    planes: bool,
    others: usize,
}

impl GroupBlock {
    /// Where field `k` of row `lane` lies.
    pub fn field_at(&self, k: usize, lane: usize) -> usize {
        self.field_bytes * (k * self.interleave + lane)
    }

    /// Bytes of one stored field: 2 (f16) or 4 (f32).
    pub fn field_bytes(&self) -> usize {
        self.field_bytes
    }

    /// Where row `lane`'s bit planes lie and its first plane's bit, for formats with fifth bits.
    pub fn planes_at(&self, lane: usize) -> Option<(usize, u8)> {
        self.planes.then(|| {
            let vector = self.field_at(self.fields, 0) + 16 * (lane / PLANE_ROWS);
            (vector, 2 * (lane % PLANE_ROWS) as u8)
        })
    }

    /// Where row `lane`'s other bytes start.
    pub fn others_at(&self, lane: usize) -> usize {
        let planes = if self.planes { 4 * self.interleave } else { 0 };
        self.field_at(self.fields, 0) + planes + lane * self.others
    }

    /// Bytes of a row's other bytes.
    pub fn others(&self) -> usize {
        self.others
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
        format.block_bytes() + (self.scales.field_bytes() - 2) * f16_fields(format).len()
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
            Scales::Grouped | Scales::GroupedF16 => {
                let planes_fit =
                    high_bits(format).is_none() || self.interleave.is_multiple_of(PLANE_ROWS);
                has_fields && self.interleave > 1 && planes_fit
            }
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

    /// Where a group block of `format` keeps each part, in a grouped layout.
    pub fn group_block(self, format: QuantFormat) -> Option<GroupBlock> {
        self.scales.grouped().then(|| {
            let fields = f16_fields(format).len();
            let planes = high_bits(format).is_some();
            GroupBlock {
                interleave: self.interleave,
                fields,
                field_bytes: self.scales.field_bytes(),
                planes,
                others: format.block_bytes() - 2 * fields - if planes { 4 } else { 0 },
            }
        })
    }

    /// Where row `r`'s block `b` lies in a stored weight.
    fn place(self, format: QuantFormat, r: usize, b: usize, per_row: usize) -> BlockPlace {
        let fields = f16_fields(format);
        let (group, lane) = (r / self.interleave, r % self.interleave);
        // Where the group's block `b` starts, in blocks: every earlier group block holds `interleave` rows' blocks.
        let group = (group * per_row + b) * self.interleave;
        let stored = self.block_bytes(format);
        let at = (group + lane) * stored;
        let mut place = BlockPlace {
            fields,
            block_bytes: format.block_bytes(),
            field_at: at,
            field_bytes: self.scales.field_bytes(),
            field_stride: 4,
            others_at: at + 4 * fields.len(),
            planes: None,
            inline: false,
        };
        match self.scales {
            Scales::Gguf => {
                place.others_at = at;
                place.inline = true;
            }
            Scales::F32 => {}
            Scales::Grouped | Scales::GroupedF16 => {
                let block = self.group_block(format).expect("a grouped layout");
                let group_at = group * stored;
                place.field_at = group_at + block.field_at(0, lane);
                place.field_stride = block.field_at(1, lane) - block.field_at(0, lane);
                place.others_at = group_at + block.others_at(lane);
                place.planes = (block.planes_at(lane).zip(high_bits(format)))
                    .map(|((planes, bit), qh)| (qh, group_at + planes, bit));
            }
        }
        place
    }
}

/// Where one block's bytes lie in a stored weight: the GGUF block whole at `others_at` (`inline`), or its f16
/// fields, f16 or widened to f32 (`field_stride` apart from `field_at`), its fifth bits in bit planes where
/// `planes` says, and its other bytes, in order, from `others_at`.
struct BlockPlace {
    fields: &'static [usize],
    block_bytes: usize,
    field_at: usize,
    /// 2 where fields stay f16, 4 where they are widened to f32.
    field_bytes: usize,
    field_stride: usize,
    others_at: usize,
    /// The fifth bits' offset in the GGUF block, their planes' offset in the stored weight, and the first plane's
    /// bit (the second half's is the next).
    planes: Option<(usize, usize, u8)>,
    inline: bool,
}

impl BlockPlace {
    /// Each f16 field's offset in the GGUF block and in the stored weight (none when inline).
    fn field_pieces(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let moved = if self.inline { &[][..] } else { self.fields };
        (moved.iter().enumerate()).map(|(k, &f)| (f, self.field_at + k * self.field_stride))
    }

    /// Each run of other bytes: `(offset in the GGUF block, offset in the stored weight, length)`.
    fn other_pieces(&self) -> Vec<(usize, usize, usize)> {
        if self.inline {
            return vec![(0, self.others_at, self.block_bytes)];
        }
        // The fifth bits follow the f16 fields in every format that has both (`high_bits`).
        let moved =
            (self.fields.iter().map(|&f| (f, 2))).chain(self.planes.map(|(qh, _, _)| (qh, 4)));
        let mut at = self.others_at;
        other_bytes(moved, self.block_bytes)
            .map(|(start, end)| {
                at += end - start;
                (start, at - (end - start), end - start)
            })
            .collect()
    }

    /// Writes the GGUF block `gguf` into the stored weight `out`, whose bit planes start cleared.
    fn store(&self, gguf: &[u8], out: &mut [u8]) {
        for (from, to) in self.field_pieces() {
            if self.field_bytes == 2 {
                out[to..to + 2].copy_from_slice(&gguf[from..from + 2]);
            } else {
                let value = f16::from_le_bytes([gguf[from], gguf[from + 1]]).to_f32();
                out[to..to + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        for (from, to, n) in self.other_pieces() {
            out[to..to + n].copy_from_slice(&gguf[from..from + n]);
        }
        if let Some((qh, planes, bit)) = self.planes {
            let bits = u32::from_le_bytes(gguf[qh..qh + 4].try_into().expect("4 bytes"));
            for code in (0..32).filter(|code| bits >> code & 1 == 1) {
                out[planes + code % 16] |= 1 << (bit + (code / 16) as u8);
            }
        }
    }

    /// Restores the GGUF block into `dst` from the stored weight `stored` (exact: the f32 values came from f16).
    fn load(&self, stored: &[u8], dst: &mut [u8]) {
        for (to, from) in self.field_pieces() {
            if self.field_bytes == 2 {
                dst[to..to + 2].copy_from_slice(&stored[from..from + 2]);
            } else {
                let value = f32::from_le_bytes(stored[from..from + 4].try_into().expect("4 bytes"));
                dst[to..to + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
            }
        }
        for (to, from, n) in self.other_pieces() {
            dst[to..to + n].copy_from_slice(&stored[from..from + n]);
        }
        if let Some((qh, planes, bit)) = self.planes {
            let bits = (0..32)
                .filter(|code| stored[planes + code % 16] >> (bit + (code / 16) as u8) & 1 == 1)
                .fold(0u32, |bits, code| bits | 1 << code);
            dst[qh..qh + 4].copy_from_slice(&bits.to_le_bytes());
        }
    }
}

/// The byte ranges of a block outside the `moved` ones (`(start, length)`, sorted), in order.
fn other_bytes(
    moved: impl Iterator<Item = (usize, usize)> + Clone,
    block_bytes: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let starts = std::iter::once(0).chain(moved.clone().map(|(at, n)| at + n));
    let ends = moved.map(|(at, _)| at).chain(std::iter::once(block_bytes));
    starts.zip(ends).filter(|(s, e)| s < e)
}
