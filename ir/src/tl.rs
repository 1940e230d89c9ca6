//! bitnet.cpp's TL1 and TL2 files, and the row blocks kiln holds them in.
//!
//! bitnet.cpp does not store TL1/TL2 weights row by row: its converter (`utils/convert-hf-to-gguf-bitnet.py`)
//! tiles each matrix by three numbers chosen per matrix shape, `BM` (rows per tile), `BK` (columns per tile) and
//! `bm` (rows per SIMD block), so that its generated kernels stream them in order. The numbers are not in the
//! file: bitnet.cpp keeps them in `include/kernel_config.ini`. kiln chooses them with `Tiling::choose`, a pass over
//! the matrix shape, records them in the file it writes (`TILING_KEY`, one `[m, k, BM, BK, bm]` per shape, as the
//! ini file has them), and reads TL files that carry them.
//!
//! Encodings, as bitnet.cpp's converter writes them:
//! - **TL1**: each pair of adjacent weights `(a, b)` of a row is the 4-bit index `3a + b + 4` (0..=8); a byte
//!   holds two indices (high nibble first). Tiles are ordered `(M/BM, K/BK, BM/bm, BK/by, bm/16, by/4)` with
//!   `by = 256 / bm`, and each holds 16 bytes: for rows `r16` in 0..16, the byte of pairs `2q` and `2q + 1`.
//! - **TL2**: for the first `K3 = K - K % BK` columns, each triple `(a, b, c)` is `v = 9a + 3b + c` stored as the
//!   4-bit `|v|` (0..=13) and a sign bit (`v < 0`); `bm` is 32 and a byte holds two triples of one row, 32 rows'
//!   bytes in the row order `0..8, 16..24, 8..16, 24..32`. The sign bits follow all index bytes, 16-bit words of
//!   8 triples of 32 rows. The last `K % BK` columns are TL1 pairs tiled with `BK = 32, bm = 32`. The whole is
//!   zero-padded to bitnet.cpp's size formula (`tensor_file_bytes`).
//!
//! Both end with the f32 tensor scale, padded to 32 bytes, where bitnet.cpp's loader reads it. kiln's row blocks
//! (128 values) are what the kernels decode: see `dequant` for their byte layout.

use crate::format::{QuantFormat, TENSOR_SCALE_TRAILER, TL2_PAIRS, TL2_TRIPLES, TL_BLOCK};
use std::fmt;

/// Metadata key of the tilings a TL file was written with: a flat u32 array of `[m, k, BM, BK, bm]` entries.
pub const TILING_KEY: &str = "kiln.tl.tiling";

/// Tilings by matrix shape `(m, k)`, as a file records them.
pub type Tilings = Vec<((usize, usize), Tiling)>;

/// bitnet.cpp's tiling of one matrix shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Rows per tile (`BM`).
    pub rows: usize,
    /// Columns per tile (`BK`); for TL2 the columns of the three-weight part's tiles.
    pub cols: usize,
    /// Rows per SIMD block (`bm`).
    pub block_rows: usize,
}

impl fmt::Display for Tiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BM {} BK {} bm {}",
            self.rows, self.cols, self.block_rows
        )
    }
}

/// TL2's SIMD block: 32 rows, 6 columns (two triples) per byte row.
const TL2_BM: usize = 32;
const TL2_BY: usize = 6;
/// TL2's two-weight part: tiles of 32 columns, byte rows of 4 columns (two pairs) of 32 rows.
const TL2_TAIL_BK: usize = 32;
const TL2_TAIL_BY: usize = 4;
/// bitnet.cpp sizes every TL2 tensor as if its two-weight part were 256 columns wide.
const TL2_SIZED_TAIL: usize = 256;

impl Tiling {
    /// kiln's tiling for an `m x k` matrix in `format`, or `None` when the shape has none (or kiln's row blocks do
    /// not fit it). Like bitnet.cpp's presets, it takes the largest tiles that fit: SIMD blocks first, then tile
    /// rows, then tile columns.
    pub fn choose(format: QuantFormat, m: usize, k: usize) -> Option<Tiling> {
        let (block_rows, rows, cols): (&[usize], &[usize], &[usize]) = match format {
            QuantFormat::TL1 => (&[32, 16], &[256, 128, 64, 32, 16], &[256, 128, 64, 32, 16]),
            QuantFormat::TL2 => (&[TL2_BM], &[256, 128, 64, 32], &[192, 96, 48, 24]),
            _ => return None,
        };
        let candidates = block_rows.iter().flat_map(|&block_rows| {
            rows.iter().flat_map(move |&rows| {
                cols.iter().map(move |&cols| Tiling {
                    rows,
                    cols,
                    block_rows,
                })
            })
        });
        candidates.into_iter().find(|t| t.fits(format, m, k))
    }

    /// Whether this tiling can lay out an `m x k` matrix in `format` (a recorded tiling is checked before use).
    pub fn fits(self, format: QuantFormat, m: usize, k: usize) -> bool {
        let Tiling {
            rows,
            cols,
            block_rows,
        } = self;
        let tiles_rows =
            rows > 0 && block_rows > 0 && m.is_multiple_of(rows) && rows.is_multiple_of(block_rows);
        tiles_rows
            && k.is_multiple_of(TL_BLOCK)
            && match format {
                QuantFormat::TL1 => {
                    block_rows.is_multiple_of(16)
                        && 256 % block_rows == 0
                        && (256 / block_rows).is_multiple_of(4)
                        && cols > 0
                        && k.is_multiple_of(cols)
                        && cols.is_multiple_of(256 / block_rows)
                }
                QuantFormat::TL2 => {
                    // The three-weight part's tiles hold whole sign words (24 columns); the rest must be TL1 tiles
                    // of 32 columns, at most the 256 bitnet.cpp's size formula allows.
                    let tail = if cols > 0 { k % cols } else { 0 };
                    block_rows == TL2_BM
                        && cols > 0
                        && cols.is_multiple_of(24)
                        && k > tail
                        && tail.is_multiple_of(32)
                        && tail <= TL2_SIZED_TAIL
                }
                _ => false,
            }
    }
}

/// Bytes of an `m x k` TL tensor in a bitnet.cpp file, the scale's 32 bytes included (ggml's `ggml_nbytes`).
pub fn tensor_file_bytes(format: QuantFormat, m: usize, k: usize) -> Option<usize> {
    let codes = match format {
        QuantFormat::TL1 => m.checked_mul(k)? / 4,
        QuantFormat::TL2 => {
            let sized = k.checked_sub(TL2_SIZED_TAIL)?.checked_mul(m)? / 3 * 5 / 8
                + TL2_SIZED_TAIL * m / 2 * 4 / 8;
            sized.div_ceil(32) * 32
        }
        _ => return None,
    };
    codes.checked_add(TENSOR_SCALE_TRAILER)
}

/// The largest pair index (weights `(1, 1)`) and triple magnitude index (`(1, 1, 1)`).
pub const PAIR_INDEX_MAX: u8 = 8;
pub const TRIPLE_INDEX_MAX: u8 = 13;

/// The pair index of weights `(a, b)`: `3a + b + 4`.
fn pair_index(a: i8, b: i8) -> u8 {
    (3 * a + b + 4) as u8
}

/// The weights of pair index `i`.
pub fn pair_weights(i: u8) -> [i8; 2] {
    [(i / 3) as i8 - 1, (i % 3) as i8 - 1]
}

/// A triple's magnitude index `|9a + 3b + c|` and whether it is negative.
fn triple_index(a: i8, b: i8, c: i8) -> (u8, bool) {
    let v = 9 * a + 3 * b + c;
    (v.unsigned_abs(), v < 0)
}

/// The weights of magnitude index `i` (0..=13) with `negative` applied.
pub fn triple_weights(i: u8, negative: bool) -> [i8; 3] {
    // Balanced ternary digits of i: i = 9a + 3b + c with every digit in -1..=1.
    let mut v = i as i8;
    let mut digits = [0i8; 3];
    for d in (0..3).rev() {
        let r = ((v + 1).rem_euclid(3)) - 1;
        digits[d] = r;
        v = (v - r) / 3;
    }
    if negative {
        digits.map(|d| -d)
    } else {
        digits
    }
}

fn nibble(byte: u8, high: bool) -> u8 {
    if high {
        byte >> 4
    } else {
        byte & 0x0F
    }
}

fn set_nibble(byte: &mut u8, high: bool, v: u8) {
    *byte |= if high { v << 4 } else { v };
}

/// How a TL2 file splits an `m x k` matrix: `k3` columns of triples (their index bytes, then their sign bytes
/// from `signs`), then `k2` columns of pairs from byte `tail`.
struct TwoParts {
    k3: usize,
    k2: usize,
    signs: usize,
    tail: usize,
}

impl TwoParts {
    fn of(t: Tiling, m: usize, k: usize) -> TwoParts {
        let (k3, k2) = (k - k % t.cols, k % t.cols);
        let signs = m * k3 / (3 * 2);
        TwoParts {
            k3,
            k2,
            signs,
            tail: signs + m * k3 / (3 * 8),
        }
    }
}

/// Where pair `p` of row `r` lies in TL1 tiles of a `k`-column part: (byte, high nibble).
fn tl1_position(t: Tiling, k: usize, r: usize, p: usize) -> (usize, bool) {
    let by = 256 / t.block_rows;
    let (tile_m, rr) = (r / t.rows, r % t.rows);
    let (sub_m, r2) = (rr / t.block_rows, rr % t.block_rows);
    let col = 2 * p;
    let (tile_k, pp) = (col / t.cols, (col % t.cols) / 2);
    let (sub_k, p2) = (pp / (by / 2), pp % (by / 2));
    let index = [
        (tile_m, t.rows),
        (tile_k, k / t.cols),
        (sub_m, t.rows / t.block_rows),
        (sub_k, t.cols / by),
        (r2 / 16, t.block_rows / 16),
        (p2 / 2, by / 4),
        (r2 % 16, 16),
    ];
    (linear(&index), p2 % 2 == 0)
}

/// Where triple `j` of row `r` lies among TL2's index bytes (of a `k3`-column part): (byte, high nibble).
fn tl2_position(t: Tiling, k3: usize, r: usize, j: usize) -> (usize, bool) {
    let (tile_m, rr) = (r / t.rows, r % t.rows);
    let (sub_m, r2) = (rr / TL2_BM, rr % TL2_BM);
    let col = 3 * j;
    let (tile_k, jj) = (col / t.cols, (col % t.cols) / 3);
    let (sub_k, j2) = (jj / 2, jj % 2);
    let index = [
        (tile_m, t.rows),
        (tile_k, k3 / t.cols),
        (sub_m, t.rows / TL2_BM),
        (sub_k, t.cols / TL2_BY),
        (swap_row_groups(r2), TL2_BM),
    ];
    (linear(&index), j2 == 0)
}

/// Where the sign of triple `j` of row `r` lies among TL2's sign bytes: (byte, bit).
fn tl2_sign_position(t: Tiling, k3: usize, r: usize, j: usize) -> (usize, u32) {
    let (tile_m, rr) = (r / t.rows, r % t.rows);
    let (sub_m, r2) = (rr / TL2_BM, rr % TL2_BM);
    let jj = (3 * j % t.cols) / 3;
    let (section, jq) = (jj / 8, jj % 8);
    let unit = linear(&[
        (tile_m, t.rows),
        (3 * j / t.cols, k3 / t.cols),
        (sub_m, t.rows / TL2_BM),
        (section, t.cols / 24),
    ]);
    // 32 rows x 8 triples read as 16 x 16: word (r2 % 2) * 8 + jq, bit 15 - r2 / 2.
    let word = (r2 % 2) * 8 + jq;
    let bit = 15 - r2 / 2;
    (unit * 32 + 2 * word + bit / 8, (bit % 8) as u32)
}

/// Where pair `p` of row `r` lies in TL2's two-weight part (`k2` columns): (byte, high nibble).
fn tl2_tail_position(t: Tiling, k2: usize, r: usize, p: usize) -> (usize, bool) {
    let (tile_m, rr) = (r / t.rows, r % t.rows);
    let (sub_m, r2) = (rr / TL2_BM, rr % TL2_BM);
    let col = 2 * p;
    let (tile_k, pp) = (col / TL2_TAIL_BK, (col % TL2_TAIL_BK) / 2);
    let (sub_k, p2) = (pp / (TL2_TAIL_BY / 2), pp % (TL2_TAIL_BY / 2));
    let index = [
        (tile_m, t.rows),
        (tile_k, k2 / TL2_TAIL_BK),
        (sub_m, t.rows / TL2_BM),
        (sub_k, TL2_TAIL_BK / TL2_TAIL_BY),
        (swap_row_groups(r2), TL2_BM),
    ];
    (linear(&index), p2 == 0)
}

/// bitnet.cpp's TL2 stores a block's 32 rows in the order 0..8, 16..24, 8..16, 24..32 (for AVX2's unpack lanes).
fn swap_row_groups(r2: usize) -> usize {
    [0, 2, 1, 3][r2 / 8] * 8 + r2 % 8
}

/// The linear index of `(i, n)` digits, most significant first (only the extent of the first digit is unused).
fn linear(index: &[(usize, usize)]) -> usize {
    index
        .iter()
        .enumerate()
        .fold(0, |acc, (d, &(i, n))| if d == 0 { i } else { acc * n + i })
}

/// The ternary weights (-1, 0, +1, row-major) of an `m x k` TL tensor's codes as bitnet.cpp tiles them.
pub fn untile(format: QuantFormat, t: Tiling, m: usize, k: usize, file: &[u8]) -> Vec<i8> {
    let mut w = vec![0i8; m * k];
    match format {
        QuantFormat::TL1 => {
            for r in 0..m {
                for p in 0..k / 2 {
                    let (at, high) = tl1_position(t, k, r, p);
                    let [a, b] = pair_weights(nibble(file[at], high));
                    w[r * k + 2 * p..][..2].copy_from_slice(&[a, b]);
                }
            }
        }
        QuantFormat::TL2 => {
            let TwoParts {
                k3,
                k2,
                signs,
                tail,
            } = TwoParts::of(t, m, k);
            for r in 0..m {
                for j in 0..k3 / 3 {
                    let (at, high) = tl2_position(t, k3, r, j);
                    let (sat, bit) = tl2_sign_position(t, k3, r, j);
                    let negative = file[signs + sat] >> bit & 1 == 1;
                    let v = triple_weights(nibble(file[at], high), negative);
                    w[r * k + 3 * j..][..3].copy_from_slice(&v);
                }
                for p in 0..k2 / 2 {
                    let (at, high) = tl2_tail_position(t, k2, r, p);
                    let [a, b] = pair_weights(nibble(file[tail + at], high));
                    w[r * k + k3 + 2 * p..][..2].copy_from_slice(&[a, b]);
                }
            }
        }
        other => unreachable!("{other} is not a TL format"),
    }
    w
}

/// An `m x k` matrix of ternary weights tiled as bitnet.cpp's converter writes it, padded to
/// `tensor_file_bytes` less the scale trailer (which the caller appends).
pub fn tile(format: QuantFormat, t: Tiling, m: usize, k: usize, w: &[i8]) -> Vec<u8> {
    let bytes =
        tensor_file_bytes(format, m, k).expect("a tiled shape has a size") - TENSOR_SCALE_TRAILER;
    let mut out = vec![0u8; bytes];
    match format {
        QuantFormat::TL1 => {
            for r in 0..m {
                for p in 0..k / 2 {
                    let (at, high) = tl1_position(t, k, r, p);
                    let i = pair_index(w[r * k + 2 * p], w[r * k + 2 * p + 1]);
                    set_nibble(&mut out[at], high, i);
                }
            }
        }
        QuantFormat::TL2 => {
            let TwoParts {
                k3,
                k2,
                signs,
                tail,
            } = TwoParts::of(t, m, k);
            for r in 0..m {
                let row = &w[r * k..][..k];
                for j in 0..k3 / 3 {
                    let (i, negative) = triple_index(row[3 * j], row[3 * j + 1], row[3 * j + 2]);
                    let (at, high) = tl2_position(t, k3, r, j);
                    set_nibble(&mut out[at], high, i);
                    let (sat, bit) = tl2_sign_position(t, k3, r, j);
                    out[signs + sat] |= (negative as u8) << bit;
                }
                for p in 0..k2 / 2 {
                    let (at, high) = tl2_tail_position(t, k2, r, p);
                    let i = pair_index(row[k3 + 2 * p], row[k3 + 2 * p + 1]);
                    set_nibble(&mut out[tail + at], high, i);
                }
            }
        }
        other => unreachable!("{other} is not a TL format"),
    }
    out
}

/// kiln's row blocks of TL weights (`w`, row-major, a whole number of 128-value blocks), without the trailer.
///
/// TL1, 32 bytes: byte `16h + j` holds pair `q = 2h` in its high nibble and `q = 2h + 1` in its low one, pair
/// `q` being elements `(32q + j, 32q + 16 + j)`. TL2, 28 bytes: byte `j` < 16 holds triple `(j, 16 + j, 32 + j)`
/// in its high nibble and `(48 + j, 64 + j, 80 + j)` in its low one, with their signs in bits `j` and `16 + j` of
/// the little-endian u32 at byte 16; byte `20 + j` (j < 8) holds pair `(96 + j, 112 + j)` high and
/// `(104 + j, 120 + j)` low. Each vector of 16 decoded indices then gives whole runs of 16 elements.
pub fn row_blocks(format: QuantFormat, w: &[i8]) -> Vec<u8> {
    let bytes = format.block_bytes();
    let mut out = vec![0u8; w.len() / TL_BLOCK * bytes];
    for (x, block) in w.chunks_exact(TL_BLOCK).zip(out.chunks_exact_mut(bytes)) {
        match format {
            QuantFormat::TL1 => {
                for (at, byte) in block.iter_mut().enumerate() {
                    let (h, j) = (at / 16, at % 16);
                    for (q, high) in [(2 * h, true), (2 * h + 1, false)] {
                        set_nibble(byte, high, pair_index(x[32 * q + j], x[32 * q + 16 + j]));
                    }
                }
            }
            QuantFormat::TL2 => {
                let mut signs = 0u32;
                for (j, byte) in block[..TL2_TRIPLES / 2].iter_mut().enumerate() {
                    for (q, high) in [(0, true), (1, false)] {
                        let e = 48 * q + j;
                        let (i, negative) = triple_index(x[e], x[e + 16], x[e + 32]);
                        set_nibble(byte, high, i);
                        signs |= (negative as u32) << (16 * q + j);
                    }
                }
                block[16..20].copy_from_slice(&signs.to_le_bytes());
                for j in 0..TL2_PAIRS / 2 {
                    for (e, high) in [(96 + j, true), (104 + j, false)] {
                        set_nibble(&mut block[20 + j], high, pair_index(x[e], x[e + 16]));
                    }
                }
            }
            other => unreachable!("{other} is not a TL format"),
        }
    }
    out
}

/// The 128 weights of one TL row block (the inverse of `row_blocks`).
pub fn decode_row_block(format: QuantFormat, block: &[u8]) -> [i8; TL_BLOCK] {
    let mut x = [0i8; TL_BLOCK];
    match format {
        QuantFormat::TL1 => {
            for (at, &byte) in block.iter().enumerate() {
                let (h, j) = (at / 16, at % 16);
                for (q, high) in [(2 * h, true), (2 * h + 1, false)] {
                    let [a, b] = pair_weights(nibble(byte, high));
                    (x[32 * q + j], x[32 * q + 16 + j]) = (a, b);
                }
            }
        }
        QuantFormat::TL2 => {
            let signs = u32::from_le_bytes(block[16..20].try_into().expect("4 sign bytes"));
            for (j, &byte) in block[..TL2_TRIPLES / 2].iter().enumerate() {
                for (q, high) in [(0, true), (1, false)] {
                    let e = 48 * q + j;
                    let negative = signs >> (16 * q + j) & 1 == 1;
                    let [a, b, c] = triple_weights(nibble(byte, high), negative);
                    (x[e], x[e + 16], x[e + 32]) = (a, b, c);
                }
            }
            for j in 0..TL2_PAIRS / 2 {
                for (e, high) in [(96 + j, true), (104 + j, false)] {
                    let [a, b] = pair_weights(nibble(block[20 + j], high));
                    (x[e], x[e + 16]) = (a, b);
                }
            }
        }
        other => unreachable!("{other} is not a TL format"),
    }
    x
}

/// The ternary weights of kiln's row blocks (the inverse of `row_blocks`).
pub fn row_block_weights(format: QuantFormat, blocks: &[u8]) -> Vec<i8> {
    blocks
        .chunks_exact(format.block_bytes())
        .flat_map(|b| decode_row_block(format, b))
        .collect()
}

/// The tilings recorded under `TILING_KEY`, from its flat u32 values; `None` when the count is not a multiple
/// of 5.
pub fn parse_tilings(values: &[u64]) -> Option<Tilings> {
    if !values.len().is_multiple_of(5) {
        return None;
    }
    Some(
        values
            .chunks_exact(5)
            .map(|e| {
                let e: Vec<usize> = e.iter().map(|&v| v as usize).collect();
                (
                    (e[0], e[1]),
                    Tiling {
                        rows: e[2],
                        cols: e[3],
                        block_rows: e[4],
                    },
                )
            })
            .collect(),
    )
}

/// The flat u32 values recording `tilings` under `TILING_KEY`.
pub fn tiling_values(tilings: &[((usize, usize), Tiling)]) -> Vec<u32> {
    tilings
        .iter()
        .flat_map(|&((m, k), t)| [m, k, t.rows, t.cols, t.block_rows].map(|v| v as u32))
        .collect()
}

/// The tilings in a `kernel_config.ini` that bitnet.cpp's `codegen_tl1.py`/`codegen_tl2.py` write beside the
/// kernels they generate, the only record of how its converter tiled a model's TL tensors: one `[Kernels_N]`
/// section per matrix shape with `M`, `K`, `BM`, `BK` and `bmm` (its `bm`), keys in any case (Python's
/// `ConfigParser` writes them in lower case). The error says what is wrong and on which line.
pub fn parse_kernel_config(text: &str) -> Result<Tilings, String> {
    const KEYS: [&str; 5] = ["m", "k", "bm", "bk", "bmm"];
    let mut sections: Vec<(String, [Option<usize>; 5])> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let at = |reason: String| format!("line {}: {reason}", n + 1);
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push((name.trim().to_string(), [None; 5]));
            continue;
        }
        let (key, value) = line
            .split_once(['=', ':'])
            .ok_or_else(|| at(format!("`{line}` is neither a [section] nor a key = value")))?;
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        let (_, fields) = sections
            .last_mut()
            .ok_or_else(|| at(format!("`{key}` comes before any [Kernels_N] section")))?;
        if let Some(i) = KEYS.iter().position(|&k| k == key) {
            let v = value
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| at(format!("{key} = `{value}` is not a positive integer")))?;
            fields[i] = Some(v);
        }
    }
    if sections.is_empty() {
        return Err("no [Kernels_N] section".into());
    }
    sections
        .into_iter()
        .map(|(name, fields)| match fields {
            [Some(m), Some(k), Some(rows), Some(cols), Some(block_rows)] => Ok((
                (m, k),
                Tiling {
                    rows,
                    cols,
                    block_rows,
                },
            )),
            _ => Err(format!(
                "[{name}] lacks {}",
                KEYS.iter()
                    .zip(fields)
                    .filter(|(_, v)| v.is_none())
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_configs_read_as_bitnet_cpp_writes_them() {
        let ini = "[Kernels_0]\nm = 1536\nk = 4096\nbm = 256\nbk = 128\nbmm = 32\n\n\
                   [Kernels_1]\nM=1536\nK=1536\nBM=128\nBK=64\nbmm=32\n";
        let t = |rows, cols| Tiling {
            rows,
            cols,
            block_rows: 32,
        };
        assert_eq!(
            parse_kernel_config(ini),
            Ok(vec![
                ((1536, 4096), t(256, 128)),
                ((1536, 1536), t(128, 64))
            ])
        );
        assert_eq!(
            parse_kernel_config("[Kernels_0]\nm = 1536\nk = 4096\n"),
            Err("[Kernels_0] lacks bm, bk, bmm".into())
        );
        assert_eq!(
            parse_kernel_config("[Kernels_0]\nm = -3\n"),
            Err("line 2: m = `-3` is not a positive integer".into())
        );
        assert_eq!(
            parse_kernel_config("m = 3\n"),
            Err("line 1: `m` comes before any [Kernels_N] section".into())
        );
        assert_eq!(
            parse_kernel_config(""),
            Err("no [Kernels_N] section".into())
        );
    }

    fn weights(m: usize, k: usize, seed: usize) -> Vec<i8> {
        (0..m * k)
            .map(|i| ((i * 7919 + seed * 104729) % 3) as i8 - 1)
            .collect()
    }

    #[test]
    fn every_index_decodes_to_its_weights() {
        for a in -1..=1 {
            for b in -1..=1 {
                assert_eq!(pair_weights(pair_index(a, b)), [a, b]);
                for c in -1..=1 {
                    let (i, negative) = triple_index(a, b, c);
                    assert!(i <= TRIPLE_INDEX_MAX);
                    assert_eq!(triple_weights(i, negative), [a, b, c]);
                }
            }
        }
    }

    #[test]
    fn tl1_tiles_as_bitnet_cpp_converter_writes_them() {
        // Worked by hand through the converter's reshapes for BM = 32, BK = 16, bm = 16 (by = 16) on a 32 x 32
        // matrix: the first 16-byte unit holds pairs 0 and 1 of rows 0..16; pairs 2, 3 follow; after the 4 units
        // of columns 0..16 come rows 16..32 (the next bm block), and only then columns 16..32.
        let t = Tiling {
            rows: 32,
            cols: 16,
            block_rows: 16,
        };
        assert!(t.fits(QuantFormat::TL1, 32, 128));
        assert_eq!(tl1_position(t, 32, 0, 0), (0, true));
        assert_eq!(tl1_position(t, 32, 0, 1), (0, false));
        assert_eq!(tl1_position(t, 32, 5, 1), (5, false));
        assert_eq!(tl1_position(t, 32, 0, 2), (16, true));
        assert_eq!(tl1_position(t, 32, 3, 7), (48 + 3, false));
        assert_eq!(tl1_position(t, 32, 16, 0), (64, true));
        assert_eq!(tl1_position(t, 32, 0, 8), (128, true));
        assert_eq!(tl1_position(t, 32, 31, 15), (255, false));
    }

    #[test]
    fn tl2_tiles_as_bitnet_cpp_converter_writes_them() {
        // BM = 32, BK = 24 on 32 rows: a byte row holds two triples (6 columns) of 32 rows in the order
        // 0..8, 16..24, 8..16, 24..32; the sign unit of one tile is 16 words, word (r % 2) * 8 + triple, bit
        // 15 - r / 2.
        let t = Tiling {
            rows: 32,
            cols: 24,
            block_rows: 32,
        };
        assert_eq!(tl2_position(t, 24, 0, 0), (0, true));
        assert_eq!(tl2_position(t, 24, 0, 1), (0, false));
        assert_eq!(tl2_position(t, 24, 8, 0), (16, true));
        assert_eq!(tl2_position(t, 24, 16, 0), (8, true));
        assert_eq!(tl2_position(t, 24, 0, 2), (32, true));
        assert_eq!(tl2_sign_position(t, 24, 0, 0), (1, 7));
        assert_eq!(tl2_sign_position(t, 24, 1, 0), (17, 7));
        assert_eq!(tl2_sign_position(t, 24, 2, 3), (6 + 1, 6));
        assert_eq!(tl2_sign_position(t, 24, 31, 7), (2 * 15, 0));
    }

    #[test]
    fn tl_files_and_row_blocks_round_trip() {
        for (format, m, k) in [
            (QuantFormat::TL1, 64, 256),
            (QuantFormat::TL1, 48, 384),
            (QuantFormat::TL2, 64, 640),
            (QuantFormat::TL2, 32, 2560),
            (QuantFormat::TL2, 96, 1536),
        ] {
            let t = Tiling::choose(format, m, k)
                .unwrap_or_else(|| panic!("{format} {m}x{k}: no tiling"));
            assert!(t.fits(format, m, k), "{format} {m}x{k}: {t}");
            let w = weights(m, k, m + k);
            let file = tile(format, t, m, k, &w);
            assert_eq!(untile(format, t, m, k, &file), w, "{format} {m}x{k} {t}");
            let blocks = row_blocks(format, &w);
            assert_eq!(blocks.len(), m * k / TL_BLOCK * format.block_bytes());
            assert_eq!(row_block_weights(format, &blocks), w, "{format} row blocks");
        }
    }

    #[test]
    fn tl2_has_a_two_weight_part_where_the_tiles_leave_columns() {
        // K = 2560 (BitNet b1.58 2B): 96-column tiles leave 64 columns for TL1 pairs; bitnet.cpp's size formula
        // pads the file as if they were 256.
        let t = Tiling::choose(QuantFormat::TL2, 32, 2560).unwrap();
        assert_eq!(2560 % t.cols, 2560 % 192);
        let bytes = tensor_file_bytes(QuantFormat::TL2, 32, 2560).unwrap();
        assert_eq!(
            bytes,
            (2304usize * 32 / 3 * 5 / 8 + 256 * 32 / 4).div_ceil(32) * 32 + 32
        );
        assert_eq!(
            tensor_file_bytes(QuantFormat::TL1, 32, 2560),
            Some(32 * 2560 / 4 + 32)
        );
    }

    #[test]
    fn shapes_without_a_tiling_are_refused() {
        assert_eq!(Tiling::choose(QuantFormat::TL1, 30, 256), None);
        assert_eq!(Tiling::choose(QuantFormat::TL2, 64, 200), None);
        assert_eq!(Tiling::choose(QuantFormat::I2_S, 64, 256), None);
        let bad = Tiling {
            rows: 32,
            cols: 100,
            block_rows: 32,
        };
        assert!(!bad.fits(QuantFormat::TL2, 64, 256));
    }
}
