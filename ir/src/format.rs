//! The table of tensor storage formats: one definition per GGUF type id, with its block geometry.
//!
//! Every other part of kiln (the GGUF reader, the dequantizers, kernel specs) asks this table; no block size
//! or byte count is written down twice.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A tensor storage format, as GGUF numbers it.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuantFormat {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    TQ1_0,
    TQ2_0,
    /// BitNet's I2_S (bitnet.cpp): 2-bit ternary codes, one f32 scale for the whole tensor after its blocks.
    I2_S,
    /// bitnet.cpp's TL1: ternary weights in pairs, one 4-bit index per pair, one f32 scale for the whole tensor.
    /// Files tile it by (BM, BK, bm) (`crate::tl`); kiln holds it in rows of 128-value blocks (`dequant`).
    TL1,
    /// bitnet.cpp's TL2: ternary weights in triples, a 4-bit magnitude index and a sign bit per triple, one f32
    /// scale for the whole tensor. Tiled in files like TL1; kiln's blocks hold 32 triples and 16 pairs.
    TL2,
}

/// One row of the format table.
#[derive(Clone, Copy, Debug)]
pub struct FormatInfo {
    pub format: QuantFormat,
    /// GGUF `ggml_type` id.
    pub gguf_id: u32,
    /// Lower-case name used in the IR text and on the command line.
    pub name: &'static str,
    /// Elements per block.
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

/// Super-block size of the k-quants and ternary formats.
pub const QK_K: usize = 256;

const fn row(
    format: QuantFormat,
    gguf_id: u32,
    name: &'static str,
    block_elems: usize,
    block_bytes: usize,
) -> FormatInfo {
    FormatInfo {
        format,
        gguf_id,
        name,
        block_elems,
        block_bytes,
    }
}

/// The table. Byte counts are those of ggml's `block_*` structs (checked against the `#[repr(C)]` layouts in
/// `dequant`).
pub const FORMATS: [FormatInfo; 19] = [
    row(QuantFormat::F32, 0, "f32", 1, 4),
    row(QuantFormat::F16, 1, "f16", 1, 2),
    row(QuantFormat::Q4_0, 2, "q4_0", 32, 2 + 16),
    row(QuantFormat::Q4_1, 3, "q4_1", 32, 2 + 2 + 16),
    row(QuantFormat::Q5_0, 6, "q5_0", 32, 2 + 4 + 16),
    row(QuantFormat::Q5_1, 7, "q5_1", 32, 2 + 2 + 4 + 16),
    row(QuantFormat::Q8_0, 8, "q8_0", 32, 2 + 32),
    row(
        QuantFormat::Q2_K,
        10,
        "q2_k",
        QK_K,
        QK_K / 16 + QK_K / 4 + 2 + 2,
    ),
    row(
        QuantFormat::Q3_K,
        11,
        "q3_k",
        QK_K,
        QK_K / 8 + QK_K / 4 + 12 + 2,
    ),
    row(QuantFormat::Q4_K, 12, "q4_k", QK_K, 2 + 2 + 12 + QK_K / 2),
    row(
        QuantFormat::Q5_K,
        13,
        "q5_k",
        QK_K,
        2 + 2 + 12 + QK_K / 8 + QK_K / 2,
    ),
    row(
        QuantFormat::Q6_K,
        14,
        "q6_k",
        QK_K,
        QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
    ),
    row(QuantFormat::Q8_K, 15, "q8_k", QK_K, 4 + QK_K + QK_K / 8),
    row(QuantFormat::BF16, 30, "bf16", 1, 2),
    row(
        QuantFormat::TQ1_0,
        34,
        "tq1_0",
        QK_K,
        (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2,
    ),
    row(QuantFormat::TQ2_0, 35, "tq2_0", QK_K, QK_K / 4 + 2),
    // bitnet.cpp's x86 packing: 128 codes in 32 bytes. Upstream ggml once gave id 36 to IQ4_NL_4_4, a
    // repacking that never reached files, so 36 is read as I2_S; its trailer is checked like any tensor size.
    row(QuantFormat::I2_S, 36, "i2_s", I2S_BLOCK, I2S_BLOCK / 4),
    // The TL formats' files are tiled per matrix shape; these are the row blocks kiln reads them into (`tl`).
    // Ids 38 and 39 are taken only with the tiling kiln records (`GgufFile`); upstream's 39 is MXFP4.
    row(QuantFormat::TL1, 38, "tl1", TL_BLOCK, TL_BLOCK / 4),
    row(
        QuantFormat::TL2,
        39,
        "tl2",
        TL_BLOCK,
        TL2_TRIPLES / 2 + TL2_TRIPLES / 8 + TL2_PAIRS / 2,
    ),
];

/// Values per TL1 or TL2 row block.
pub const TL_BLOCK: usize = 128;

/// Triples in a TL2 row block (96 values), followed by `TL2_PAIRS` pairs (the other 32).
pub const TL2_TRIPLES: usize = 32;
pub const TL2_PAIRS: usize = 16;

/// Codes per I2_S block.
pub const I2S_BLOCK: usize = 128;

/// Bytes after an I2_S tensor's blocks: its f32 scale, padded to 32 as bitnet.cpp writes it.
pub const TENSOR_SCALE_TRAILER: usize = 32;

impl QuantFormat {
    pub fn info(self) -> &'static FormatInfo {
        FORMATS
            .iter()
            .find(|f| f.format == self)
            .expect("every format has a table row")
    }

    pub fn from_gguf_id(id: u32) -> Option<Self> {
        FORMATS.iter().find(|f| f.gguf_id == id).map(|f| f.format)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        FORMATS.iter().find(|f| f.name == name).map(|f| f.format)
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn block_elems(self) -> usize {
        self.info().block_elems
    }

    pub fn block_bytes(self) -> usize {
        self.info().block_bytes
    }

    /// Bytes taken by a row of `elems` elements, or `None` when `elems` is not a whole number of blocks or the
    /// byte count overflows.
    pub fn row_bytes(self, elems: usize) -> Option<usize> {
        let info = self.info();
        if !elems.is_multiple_of(info.block_elems) {
            return None;
        }
        (elems / info.block_elems).checked_mul(info.block_bytes)
    }

    /// Bytes a tensor of this format carries after its blocks (the ternary row formats' per-tensor scale; 0 for
    /// the rest).
    pub fn tensor_trailer_bytes(self) -> usize {
        if self.has_tensor_scale() {
            TENSOR_SCALE_TRAILER
        } else {
            0
        }
    }

    /// Whether one f32 scale serves the whole tensor (I2_S, TL1, TL2), kept in the tensor's trailer.
    pub fn has_tensor_scale(self) -> bool {
        matches!(
            self,
            QuantFormat::I2_S | QuantFormat::TL1 | QuantFormat::TL2
        )
    }

    /// Bytes of a whole tensor of this format with `elems` elements in rows of `row_elems`, trailer included, or
    /// `None` when its rows are not whole blocks or the count overflows.
    pub fn tensor_bytes(self, row_elems: usize, elems: usize) -> Option<usize> {
        if row_elems == 0 || !elems.is_multiple_of(row_elems) {
            return None;
        }
        self.row_bytes(row_elems)?
            .checked_mul(elems / row_elems)?
            .checked_add(self.tensor_trailer_bytes())
    }

    /// Whether this is a plain floating-point format (one element per block).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            QuantFormat::F32 | QuantFormat::F16 | QuantFormat::BF16
        )
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of the GGUF type ids kiln knows of but cannot read, for error messages.
pub fn unsupported_gguf_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "Q8_1",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        37 => "I8_S (bitnet.cpp) or an upstream repacking",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i2_s_tensors_carry_their_scale_after_the_codes() {
        // bitnet.cpp: a tensor of n weights takes n / 4 + 32 bytes.
        assert_eq!(
            QuantFormat::I2_S.tensor_bytes(2560, 2560 * 640),
            Some(2560 * 640 / 4 + 32)
        );
        assert_eq!(QuantFormat::Q8_0.tensor_bytes(64, 128), Some(2 * 2 * 34));
        assert_eq!(QuantFormat::I2_S.tensor_bytes(100, 200), None);
    }

    #[test]
    fn table_is_consistent() {
        for (i, a) in FORMATS.iter().enumerate() {
            assert_eq!(QuantFormat::from_gguf_id(a.gguf_id), Some(a.format));
            assert_eq!(QuantFormat::from_name(a.name), Some(a.format));
            for b in &FORMATS[i + 1..] {
                assert_ne!(a.format, b.format);
                assert_ne!(a.gguf_id, b.gguf_id);
            }
        }
    }

    #[test]
    fn byte_sizes_match_ggml() {
        // ggml.c's type_traits sizes, written out independently of the table's arithmetic.
        let expected = [
            (QuantFormat::Q4_0, 18),
            (QuantFormat::Q4_1, 20),
            (QuantFormat::Q5_0, 22),
            (QuantFormat::Q5_1, 24),
            (QuantFormat::Q8_0, 34),
            (QuantFormat::Q2_K, 84),
            (QuantFormat::Q3_K, 110),
            (QuantFormat::Q4_K, 144),
            (QuantFormat::Q5_K, 176),
            (QuantFormat::Q6_K, 210),
            (QuantFormat::Q8_K, 292),
            (QuantFormat::TQ1_0, 54),
            (QuantFormat::TQ2_0, 66),
            (QuantFormat::I2_S, 32),
            // Kiln's row blocks of 128: TL1 64 pair indices; TL2 32 triple indices, 32 sign bits, 16 pair indices.
            (QuantFormat::TL1, 32),
            (QuantFormat::TL2, 28),
        ];
        for (format, bytes) in expected {
            assert_eq!(format.block_bytes(), bytes, "{format}");
        }
    }
}
