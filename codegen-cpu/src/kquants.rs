//! The k-quants (Q4_K, Q5_K, Q6_K) and the ternary TQ2_0: super-blocks of 256 values against Q8_K activations.
//! As in ggml, every product stays in integers until the block's float scales:
//! `dot = d * dx * sum_j(sc_j * sum(code * qx)) - dmin * dx * sum_j(mn_j * sum(qx))` (Q4_K, Q5_K),
//! `dot = d * dx * sum_g(sc_g * (sum(code * qx) - 32 * sum(qx)))` (Q6_K) and
//! `dot = d * dx * (sum(code * qx) - sum(qx))` (TQ2_0 and TQ1_0, codes 0..2 for -1..1), with `sum(qx)` taken
//! from the activations' stored group sums.
//!
//! `unpack` decodes a block into its codes as 16 vectors of one byte per value, in the activations' group order
//! (group g holds values 16g..16g+16), followed by what the format's scales need; `accumulate` meets each with
//! its activation codes in one `vpdpbusd` and applies the scales. Decoding (nibbles, fifth or sixth bits, base-3
//! digits, the packed 6-bit scales) is most of the work, so a prompt's matmul decodes each block once into the
//! scratch buffer and every token reads the bytes back (`matmul`); Q4_K, Q5_K and Q6_K keep a group of four rows
//! there transposed (`Grouped`). One token at a time, Cranelift places each decoded vector next to the
//! `vpdpbusd` that reads it.

use crate::builder::Kb;
use crate::formats::{code_values, BlockDot, Dequantize, Grouped, RowAcc};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I32, I32X4, I64, I64X2, I8X16};
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use cranelift_frontend::Variable;
use kiln_ir::cpu_abi::ActFormat;
use kiln_ir::layout::{Layout, Scales};
use kiln_ir::QuantFormat;

/// Bytes of an `f32s` block (the f16 fields widened to f32 and moved to the front).
fn stored_block_bytes(format: QuantFormat) -> usize {
    Layout {
        scales: Scales::F32,
        interleave: 1,
    }
    .block_bytes(format)
}

/// The activation codes `16 * group .. 16 * group + 16` of the Q8_K block at `x`.
fn act_codes(kb: &mut Kb, x: Value, group: usize) -> Value {
    kb.load(I8X16, x, ActFormat::Q8K.codes_at() + 16 * group)
}

/// The activations' 16 group sums as two `i16x8`.
fn act_group_sums(kb: &mut Kb, x: Value) -> [Value; 2] {
    [0, 16].map(|at| kb.load(I16X8, x, ActFormat::SUMS_AT + at))
}

/// `[sum(d[0]), sum(d[1]), sum(d[2]), sum(d[3])]` of four `i32x4` partial sums.
fn lane_totals(kb: &mut Kb, d: &[Value]) -> Value {
    let a = kb.b.ins().iadd_pairwise(d[0], d[1]);
    let b = kb.b.ins().iadd_pairwise(d[2], d[3]);
    kb.b.ins().iadd_pairwise(a, b)
}

/// Each byte of `v` shifted by `bits` (left when positive) and masked: the shift runs on 16-bit lanes, and the
/// mask drops what crossed between bytes.
pub(crate) fn shift_bytes(kb: &mut Kb, v: Value, bits: i64, mask: u8) -> Value {
    let shifted = if bits == 0 {
        v
    } else {
        let wide = kb.bitcast(I16X8, v);
        let wide = if bits > 0 {
            kb.b.ins().ishl_imm_s(wide, bits)
        } else {
            kb.b.ins().ushr_imm_s(wide, -bits)
        };
        kb.bitcast(I8X16, wide)
    };
    let mask = kb.i8x16(mask);
    kb.b.ins().band(shifted, mask)
}

/// `acc += fcvt(ints) * scale` on the row's vector accumulator.
fn add_scaled(kb: &mut Kb, acc: RowAcc, ints: Value, scale: Value) {
    let scale = kb.b.ins().splat(F32X4, scale);
    add_scaled_vec(kb, acc, ints, scale);
}

/// `add_scaled` with a scale per lane.
fn add_scaled_vec(kb: &mut Kb, acc: RowAcc, ints: Value, scale: Value) {
    let f = kb.b.ins().fcvt_from_sint(F32X4, ints);
    let v = kb.b.use_var(acc.v);
    let v = kb.b.ins().fma(f, scale, v);
    kb.b.def_var(acc.v, v);
}

/// Q4_K, Q5_K, Q6_K, TQ2_0 or TQ1_0 against Q8_K activations.
pub struct KQuant {
    format: QuantFormat,
    block_bytes: usize,
}

impl KQuant {
    pub fn of(format: QuantFormat) -> Self {
        KQuant {
            format,
            block_bytes: stored_block_bytes(format),
        }
    }
}

impl BlockDot for KQuant {
    fn act(&self) -> ActFormat {
        ActFormat::Q8K
    }

    fn elems(&self) -> usize {
        256
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// `[x pointer, dx]`: the activation codes are loaded where they are used.
    fn prepare(&self, kb: &mut Kb, x: Value) -> Vec<Value> {
        let dx = kb.load(F32, x, 0);
        vec![x, dx]
    }

    /// The 16 code vectors, then the format's scales: `[scales, minimums, d, dmin]` (Q4_K, Q5_K: the 6-bit fields
    /// as bytes), `[scales, d]` (Q6_K) or `[d]` (the ternaries).
    fn unpacked(&self) -> Vec<Type> {
        let mut types = vec![I8X16; GROUPS];
        types.extend_from_slice(match self.format {
            QuantFormat::Q6_K => &[I8X16, F32][..],
            QuantFormat::TQ2_0 | QuantFormat::TQ1_0 => &[F32][..],
            _ => &[I8X16, I8X16, F32, F32][..],
        });
        types
    }

    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        match self.format {
            QuantFormat::Q6_K => Q6K::decode(kb, w),
            QuantFormat::TQ2_0 => Tq2::decode(kb, w),
            QuantFormat::TQ1_0 => Tq1::decode(kb, w),
            format => ScaleMinK::of(format).decode(kb, w),
        }
    }

    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc) {
        let (codes, scales) = w.split_at(GROUPS);
        let (x, dx) = (x[0], x[1]);
        match self.format {
            QuantFormat::Q6_K => Q6K::accumulate(kb, codes, scales, x, dx, acc),
            QuantFormat::TQ2_0 | QuantFormat::TQ1_0 => {
                ternary_accumulate(kb, codes, scales[0], x, dx, acc)
            }
            _ => ScaleMinK::accumulate(kb, codes, scales, x, dx, acc),
        }
    }

    fn dequantizer(&self) -> Option<&dyn Dequantize> {
        Some(self)
    }

    fn grouped(&self) -> Option<&dyn Grouped> {
        matches!(
            self.format,
            QuantFormat::Q4_K | QuantFormat::Q5_K | QuantFormat::Q6_K
        )
        .then_some(self as _)
    }
}

/// Q4_K, Q5_K and Q6_K over a group of four rows, transposed (`Grouped`). The entry: for each group of 16 codes
/// four code vectors, vector `k` holding codes `4k..4k + 4` of the group of rows 0..4 (one row per 32-bit lane);
/// then the scales across the rows, the rows' minimums or offset factors as i16 pairs, the rows' `d` (and
/// `dmin`):
/// - Q4_K, Q5_K: the 8 sub-block scales as i32x4; for each `l` of 0..4 the pairs `(mn_l, mn_{l+4})`; `d`,
///   `dmin`. Row by row, lane `l` of a row's accumulator gets `sc_l * T_l + sc_{l+4} * T_{l+4}` (`T_j` the
///   sub-block's integer sum) times `d * dx`, then `mn_l * X_l + mn_{l+4} * X_{l+4}` (`X_j` the activations'
///   sub-block sum) times `-dmin * dx`.
/// - Q6_K: the 16 group scales as i32x4; for each `l` the pairs `(sc_{2l}, sc_{2l+1})` and `(sc_{8+2l},
///   sc_{9+2l})`; `d`. Lane `l` gets `sum_k sc_{4k+l} * T_{4k+l} - 32 * (the four groups 2l, 2l+1, 8+2l, 9+2l's
///   scale times activation sum)` times `d * dx`.
///
/// Accumulator `l` gets the same per row, in the row's lane.
impl Grouped for KQuant {
    fn types(&self) -> Vec<Type> {
        let mut types = vec![I8X16; 4 * GROUPS];
        let (scales, pairs, floats) = match self.format {
            QuantFormat::Q6_K => (16, 8, 1),
            _ => (8, 4, 2),
        };
        types.extend(vec![I32X4; scales]);
        types.extend(vec![I16X8; pairs]);
        types.extend(vec![F32X4; floats]);
        types
    }

    fn group(&self, kb: &mut Kb, rows: &[Vec<Value>]) -> Vec<Value> {
        let mut entry: Vec<Value> = (0..GROUPS)
            .flat_map(|group| kb.transpose32(std::array::from_fn(|r| rows[r][group])))
            .collect();
        let q6 = self.format == QuantFormat::Q6_K;
        // The rows' scales as i16x8, by half (Q6_K's 16 signed, in two; the others' 8 unsigned, in one).
        let halves: Vec<[Value; 4]> = match q6 {
            true => vec![
                std::array::from_fn(|r| kb.b.ins().swiden_low(rows[r][GROUPS])),
                std::array::from_fn(|r| kb.b.ins().swiden_high(rows[r][GROUPS])),
            ],
            false => vec![std::array::from_fn(|r| {
                kb.b.ins().uwiden_low(rows[r][GROUPS])
            })],
        };
        for half in &halves {
            for high in [false, true] {
                let lanes = half.map(|v| match (q6, high) {
                    (true, false) => kb.b.ins().swiden_low(v),
                    (true, true) => kb.b.ins().swiden_high(v),
                    (false, false) => kb.b.ins().uwiden_low(v),
                    (false, true) => kb.b.ins().uwiden_high(v),
                });
                entry.extend(kb.transpose32(lanes));
            }
        }
        if q6 {
            // An i16x8 of scales already pairs (sc_{2l}, sc_{2l+1}) in 32-bit lane l.
            for &half in &halves {
                entry.extend(kb.transpose32(half));
            }
            entry.push(kb.f32x4_of(std::array::from_fn(|r| rows[r][GROUPS + 1])));
        } else {
            let pairs = std::array::from_fn(|r| {
                let mins = kb.b.ins().uwiden_low(rows[r][GROUPS + 1]);
                interleave_halves16(kb, mins)
            });
            entry.extend(kb.transpose32(pairs));
            for field in [GROUPS + 2, GROUPS + 3] {
                entry.push(kb.f32x4_of(std::array::from_fn(|r| rows[r][field])));
            }
        }
        entry
    }

    fn accumulate(
        &self,
        kb: &mut Kb,
        block: &[Value],
        x: &[Value],
        accs: &[RowAcc],
        _terms: Variable,
    ) -> bool {
        let (codes, rest) = block.split_at(4 * GROUPS);
        let (x, dx) = (x[0], x[1]);
        let (max_code, accumulate): (u8, GroupedAccumulate) = match self.format {
            QuantFormat::Q6_K => (Q6K::MAX_CODE, Q6K::accumulate_grouped),
            _ => (ScaleMinK::MAX_CODE, ScaleMinK::accumulate_grouped),
        };
        let totals = transposed_group_dots(kb, codes, x, max_code);
        let dx = kb.b.ins().splat(F32X4, dx);
        accumulate(kb, &totals, rest, x, dx, accs);
        false
    }

    fn across_rows(&self) -> bool {
        true
    }
}

/// `[v0, v4, v1, v5, v2, v6, v3, v7]` of an i16x8: 32-bit lane `l` holds the pair `(v_l, v_{l+4})`.
fn interleave_halves16(kb: &mut Kb, v: Value) -> Value {
    let mut index = [0u8; 16];
    for l in 0..4 {
        for (n, word) in [l, l + 4].into_iter().enumerate() {
            index[4 * l + 2 * n] = 2 * word as u8;
            index[4 * l + 2 * n + 1] = 2 * word as u8 + 1;
        }
    }
    let index = kb.bytes16(index);
    let bytes = kb.as_bytes(v);
    let picked = kb.pshufb(bytes, index);
    kb.bitcast(I16X8, picked)
}

/// A k-quant's `accumulate_grouped`: `(kb, totals, rest, x, dx, accs)`.
type GroupedAccumulate = fn(&mut Kb, &[Value], &[Value], Value, Value, &[RowAcc]);

/// Each group's `sum(code * qx)` for four rows, one row per lane, from the group's four transposed code vectors,
/// each against four activation codes broadcast.
fn transposed_group_dots(kb: &mut Kb, codes: &[Value], x: Value, max_code: u8) -> Vec<Value> {
    (0..GROUPS)
        .map(|g| {
            let act = act_codes(kb, x, g);
            let pairs: Vec<(Value, Value)> = (0..4u8)
                .map(|k| (kb.shuffle32(act, act, [k; 4]), codes[4 * g + k as usize]))
                .collect();
            kb.dot_u8i8_total(&pairs, max_code)
        })
        .collect()
}

impl Dequantize for KQuant {
    /// Group by group from the unpacked codes, each value as `kiln_ir::dequant` computes it: `(d * sc) * q -
    /// dmin * mn` (Q4_K, Q5_K: the scale and minimum of sub-block `g / 2`), `(d * sc) * (q - 32)` (Q6_K: the
    /// signed scale of group `g`) or `d * (q - 1)` (the ternaries).
    fn dequantize(&self, kb: &mut Kb, group: Value, lane: Value) -> Vec<Value> {
        let w = kb.offset(group, lane, self.block_bytes());
        let unpacked = self.unpack(kb, w);
        let (codes, rest) = unpacked.split_at(GROUPS);
        // Byte `lane` of a vector of 6-bit scales or minimums (or Q6_K's signed scales) as an f32.
        let byte = |kb: &mut Kb, v: Value, lane: usize, signed: bool| {
            let b = kb.b.ins().extractlane(v, lane as u8);
            let i = if signed {
                kb.b.ins().sextend(I32, b)
            } else {
                kb.b.ins().uextend(I32, b)
            };
            kb.b.ins().fcvt_from_sint(F32, i)
        };
        let mut values = Vec::with_capacity(4 * GROUPS);
        for (g, &group) in codes.iter().enumerate() {
            let (scale, offset, minimum) = match self.format {
                QuantFormat::Q6_K => {
                    let sc = byte(kb, rest[0], g, true);
                    (kb.b.ins().fmul(rest[1], sc), 32, None)
                }
                QuantFormat::TQ2_0 | QuantFormat::TQ1_0 => (rest[0], 1, None),
                _ => {
                    let sc = byte(kb, rest[0], g / 2, false);
                    let mn = byte(kb, rest[1], g / 2, false);
                    let minimum = kb.b.ins().fmul(rest[3], mn);
                    (kb.b.ins().fmul(rest[2], sc), 0, Some(minimum))
                }
            };
            let scale = kb.b.ins().splat(F32X4, scale);
            let minimum = minimum.map(|m| kb.b.ins().splat(F32X4, m));
            for q in code_values(kb, group, offset) {
                let y = kb.b.ins().fmul(scale, q);
                values.push(match minimum {
                    Some(m) => kb.b.ins().fsub(y, m),
                    None => y,
                });
            }
        }
        values
    }
}

/// The largest ternary digit (-1, 0, +1 stored as 0, 1, 2), the bound `Kb::dot_u8i8_sum` takes.
pub(crate) const TERNARY_MAX_CODE: u8 = 2;

/// Groups of 16 values in a block of 256: the activations' group sums, and one code vector each.
const GROUPS: usize = 16;

/// `sum(code * qx)` over each run of `per` consecutive groups, as `i32x4` partial sums: a run's products
/// accumulate together (`Kb::dot_u8i8_sum`; integer sums, so the grouping changes no result).
fn group_dots(kb: &mut Kb, codes: &[Value], x: Value, per: usize, max_code: u8) -> Vec<Value> {
    codes
        .chunks_exact(per)
        .enumerate()
        .map(|(run, codes)| {
            let pairs: Vec<(Value, Value)> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| (act_codes(kb, x, per * run + i), c))
                .collect();
            kb.dot_u8i8_total(&pairs, max_code)
        })
        .collect()
}

/// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and minimums packed in 12 bytes, 4-bit codes (two
/// sub-blocks per 32 bytes, low nibbles first) and, for Q5_K, a fifth bit per value in `qh` (bit `j` of byte `i`
/// for value `i` of sub-block `j`). Stored: `[d f32][dmin f32][scales 12][qh 32 (Q5_K)][qs 128]`.
struct ScaleMinK {
    qh_at: Option<usize>,
    qs_at: usize,
}

impl ScaleMinK {
    const SCALES_AT: usize = 8;
    /// The largest code (`Kb::dot_u8i8_sum`): Q5_K's five bits, which bound Q4_K's four too.
    const MAX_CODE: u8 = 31;

    fn of(format: QuantFormat) -> Self {
        let qh_at = match format {
            QuantFormat::Q4_K => None,
            QuantFormat::Q5_K => Some(Self::SCALES_AT + 12),
            _ => unreachable!("not a scale-and-minimum k-quant"),
        };
        ScaleMinK {
            qh_at,
            qs_at: qh_at.map_or(Self::SCALES_AT + 12, |at| at + 32),
        }
    }

    /// The eight scales and the eight minimums, each as eight bytes in an i64 (ggml's `utmp` shuffle):
    /// scales 0..4 and minimums 0..4 are the low 6 bits of bytes 0..4 and 4..8; scales and minimums 4..8 take
    /// their low 4 bits from bytes 8..12 (low and high nibble) and their top 2 bits from the top of bytes 0..8.
    fn scales_and_mins(kb: &mut Kb, w: Value) -> (Value, Value) {
        let u: Vec<Value> = (0..3)
            .map(|i| kb.load(I32, w, Self::SCALES_AT + 4 * i))
            .collect();
        let low6 = |kb: &mut Kb, v: Value| kb.b.ins().band_imm_s(v, 0x3F3F_3F3F);
        let top2 = |kb: &mut Kb, v: Value| {
            let t = kb.b.ins().ushr_imm_s(v, 6);
            let t = kb.b.ins().band_imm_s(t, 0x0303_0303);
            kb.b.ins().ishl_imm_s(t, 4)
        };
        let (sc_lo, mn_lo) = (low6(kb, u[0]), low6(kb, u[1]));
        let sc_hi = kb.b.ins().band_imm_s(u[2], 0x0F0F_0F0F);
        let t = top2(kb, u[0]);
        let sc_hi = kb.b.ins().bor(sc_hi, t);
        let mn_hi = kb.b.ins().ushr_imm_s(u[2], 4);
        let mn_hi = kb.b.ins().band_imm_s(mn_hi, 0x0F0F_0F0F);
        let t = top2(kb, u[1]);
        let mn_hi = kb.b.ins().bor(mn_hi, t);
        let join = |kb: &mut Kb, lo: Value, hi: Value| {
            let lo = kb.b.ins().uextend(I64, lo);
            let hi = kb.b.ins().uextend(I64, hi);
            let hi = kb.b.ins().ishl_imm_s(hi, 32);
            kb.b.ins().bor(lo, hi)
        };
        (join(kb, sc_lo, sc_hi), join(kb, mn_lo, mn_hi))
    }

    /// Eight bytes packed in an i64 as the low half of an `i8x16`.
    fn bytes_vector(kb: &mut Kb, packed: Value) -> Value {
        let v = kb.b.ins().scalar_to_vector(I64X2, packed);
        kb.bitcast(I8X16, v)
    }

    /// The fifth bits of sub-block `j` from one 16-byte half of `qh`, as 0x10 or 0 per byte.
    fn fifth_bits(kb: &mut Kb, qh: Value, j: usize) -> Value {
        let bit = kb.i8x16(1 << j);
        let set = kb.b.ins().band(qh, bit);
        let set = kb.b.ins().icmp(IntCC::Equal, set, bit);
        let high = kb.i8x16(0x10);
        kb.b.ins().band(set, high)
    }
}

impl ScaleMinK {
    /// Sub-block j's codes are groups 2j and 2j + 1 (its two 16-byte halves).
    fn decode(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        let qh = self
            .qh_at
            .map(|at| [kb.load(I8X16, w, at), kb.load(I8X16, w, at + 16)]);
        let mut out = Vec::with_capacity(GROUPS + 4);
        for pair in 0..4 {
            let packed = [0, 16].map(|at| kb.load(I8X16, w, self.qs_at + 32 * pair + at));
            for nibble in 0..2 {
                let j = 2 * pair + nibble;
                for (half, &p) in packed.iter().enumerate() {
                    let mut codes = shift_bytes(kb, p, -4 * nibble as i64, 0x0F);
                    if let Some(qh) = qh {
                        let fifth = Self::fifth_bits(kb, qh[half], j);
                        codes = kb.b.ins().bor(codes, fifth);
                    }
                    out.push(codes);
                }
            }
        }
        let (scales, mins) = Self::scales_and_mins(kb, w);
        out.push(Self::bytes_vector(kb, scales));
        out.push(Self::bytes_vector(kb, mins));
        out.push(kb.load(F32, w, 0));
        out.push(kb.load(F32, w, 4));
        out
    }

    fn accumulate(kb: &mut Kb, codes: &[Value], rest: &[Value], x: Value, dx: Value, acc: RowAcc) {
        let (scales, mins, d, dmin) = (rest[0], rest[1], rest[2], rest[3]);
        // Sub-block j is groups 2j and 2j + 1.
        let dots = group_dots(kb, codes, x, 2, Self::MAX_CODE);
        let scales = kb.b.ins().uwiden_low(scales);
        let sc_lo = kb.b.ins().uwiden_low(scales);
        let sc_hi = kb.b.ins().uwiden_high(scales);
        let lo = lane_totals(kb, &dots[..4]);
        let hi = lane_totals(kb, &dots[4..]);
        let lo = kb.b.ins().imul(lo, sc_lo);
        let hi = kb.b.ins().imul(hi, sc_hi);
        let sum = kb.b.ins().iadd(lo, hi);
        let ddx = kb.b.ins().fmul(d, dx);
        add_scaled(kb, acc, sum, ddx);

        // Minimums: each meets the sums of its sub-block's two activation groups, as i16 lanes
        // `[m0, m0, m1, m1, ...]` against the group sums in one `pmaddwd` per eight groups.
        let sums = act_group_sums(kb, x);
        let mut total = None;
        for (half, &group_sums) in sums.iter().enumerate() {
            let mut index = [0x80u8; 16];
            for (lane, i) in index.iter_mut().step_by(2).enumerate() {
                *i = (4 * half + lane / 2) as u8;
            }
            let index = kb.bytes16(index);
            let paired = kb.pshufb(mins, index);
            let paired = kb.bitcast(I16X8, paired);
            let part = kb.dot_i16(group_sums, paired);
            total = Some(match total {
                Some(t) => kb.b.ins().iadd(t, part),
                None => part,
            });
        }
        let neg = kb.b.ins().fneg(dmin);
        let scale = kb.b.ins().fmul(neg, dx);
        add_scaled(kb, acc, total.expect("two halves"), scale);
    }

    /// `accumulate` for four rows transposed (`Grouped`): `totals` are the 16 groups' sums, one row per lane;
    /// `rest` the entry's scales, minimum pairs, `d` and `dmin`; `dx` splatted.
    fn accumulate_grouped(
        kb: &mut Kb,
        totals: &[Value],
        rest: &[Value],
        x: Value,
        dx: Value,
        accs: &[RowAcc],
    ) {
        let (scales, rest) = rest.split_at(8);
        let (min_pairs, rest) = rest.split_at(4);
        // Sub-block j is groups 2j and 2j + 1.
        let totals: Vec<Value> = totals
            .chunks_exact(2)
            .map(|pair| kb.b.ins().iadd(pair[0], pair[1]))
            .collect();
        // The activations' sub-block sums X_0..X_8, paired `(X_l, X_{l+4})` in 32-bit lane l.
        let [lo, hi] = act_group_sums(kb, x);
        let sub_sums = kb.b.ins().iadd_pairwise(lo, hi);
        let x_pairs = interleave_halves16(kb, sub_sums);
        let ddx = kb.b.ins().fmul(rest[0], dx);
        let neg = kb.b.ins().fneg(rest[1]);
        let mdx = kb.b.ins().fmul(neg, dx);
        for (l, &acc) in accs.iter().enumerate() {
            let low = kb.b.ins().imul(totals[l], scales[l]);
            let high = kb.b.ins().imul(totals[l + 4], scales[l + 4]);
            let scaled = kb.b.ins().iadd(low, high);
            add_scaled_vec(kb, acc, scaled, ddx);
            let x_pair = kb.shuffle32(x_pairs, x_pairs, [l as u8; 4]);
            let mins = kb.dot_i16(min_pairs[l], x_pair);
            add_scaled_vec(kb, acc, mins, mdx);
        }
    }
}

/// Q6_K: 16 groups of 16 with signed 8-bit scales, 6-bit codes offset by 32: low 4 bits in `ql` (each half of
/// the block reads 64 bytes twice, low nibbles first), top 2 bits in `qh` (each half reads 32 bytes four times,
/// at shifts 0, 2, 4, 6). Stored: `[d f32][ql 128][qh 64][scales 16]`.
struct Q6K;

impl Q6K {
    const MAX_CODE: u8 = 63;
    const QL_AT: usize = 4;
    const QH_AT: usize = 4 + 128;
    const SCALES_AT: usize = 4 + 128 + 64;

    fn decode(kb: &mut Kb, w: Value) -> Vec<Value> {
        let mut out = Vec::with_capacity(GROUPS + 2);
        for half in 0..2 {
            let ql: Vec<Value> = (0..4)
                .map(|q| kb.load(I8X16, w, Self::QL_AT + 64 * half + 16 * q))
                .collect();
            let qh: Vec<Value> = (0..2)
                .map(|r| kb.load(I8X16, w, Self::QH_AT + 32 * half + 16 * r))
                .collect();
            for gi in 0..8 {
                let low = shift_bytes(kb, ql[gi % 4], -4 * (gi / 4) as i64, 0x0F);
                // The crumb at shift 2 * (gi / 2), moved to bits 4..6.
                let high = shift_bytes(kb, qh[gi % 2], 4 - 2 * (gi / 2) as i64, 0x30);
                out.push(kb.b.ins().bor(low, high));
            }
        }
        out.push(kb.load(I8X16, w, Self::SCALES_AT));
        out.push(kb.load(F32, w, 0));
        out
    }

    fn accumulate(kb: &mut Kb, codes: &[Value], rest: &[Value], x: Value, dx: Value, acc: RowAcc) {
        let (scales, d) = (rest[0], rest[1]);
        let dots = group_dots(kb, codes, x, 1, Self::MAX_CODE);
        let scales16 = [
            kb.b.ins().swiden_low(scales),
            kb.b.ins().swiden_high(scales),
        ];
        let mut sum = None;
        for (k, chunk) in dots.chunks_exact(4).enumerate() {
            let totals = lane_totals(kb, chunk);
            let s = scales16[k / 2];
            let sc = if k % 2 == 0 {
                kb.b.ins().swiden_low(s)
            } else {
                kb.b.ins().swiden_high(s)
            };
            let part = kb.b.ins().imul(totals, sc);
            sum = Some(match sum {
                Some(t) => kb.b.ins().iadd(t, part),
                None => part,
            });
        }
        // The offset: 32 * sum_g(sc_g * sum(qx in g)), one `pmaddwd` per eight groups.
        let sums = act_group_sums(kb, x);
        let a = kb.dot_i16(sums[0], scales16[0]);
        let b = kb.dot_i16(sums[1], scales16[1]);
        let offset = kb.b.ins().iadd(a, b);
        let offset = kb.b.ins().ishl_imm_s(offset, 5);
        let sum = kb.b.ins().isub(sum.expect("16 groups"), offset);
        let ddx = kb.b.ins().fmul(d, dx);
        add_scaled(kb, acc, sum, ddx);
    }

    /// `accumulate` for four rows transposed (`Grouped`): `totals` are the 16 groups' sums, one row per lane;
    /// `rest` the entry's scales, scale pairs and `d`; `dx` splatted.
    fn accumulate_grouped(
        kb: &mut Kb,
        totals: &[Value],
        rest: &[Value],
        x: Value,
        dx: Value,
        accs: &[RowAcc],
    ) {
        let (scales, rest) = rest.split_at(16);
        let (pairs, rest) = rest.split_at(8);
        let sums = act_group_sums(kb, x);
        let ddx = kb.b.ins().fmul(rest[0], dx);
        for (l, &acc) in accs.iter().enumerate() {
            let mut scaled = kb.b.ins().imul(totals[l], scales[l]);
            for k in 1..4 {
                let part = kb.b.ins().imul(totals[4 * k + l], scales[4 * k + l]);
                scaled = kb.b.ins().iadd(scaled, part);
            }
            // The offset: 32 * the scale-weighted activation sums of groups 2l, 2l + 1, 8 + 2l and 9 + 2l.
            let halves = [0, 1].map(|h| {
                let act_pair = kb.shuffle32(sums[h], sums[h], [l as u8; 4]);
                kb.dot_i16(pairs[4 * h + l], act_pair)
            });
            let offset = kb.b.ins().iadd(halves[0], halves[1]);
            let offset = kb.b.ins().ishl_imm_s(offset, 5);
            let scaled = kb.b.ins().isub(scaled, offset);
            add_scaled_vec(kb, acc, scaled, ddx);
        }
    }
}

/// TQ2_0: ternary digits as 2-bit codes (0, 1, 2 for -1, 0, +1), each 128-value half of the block reading its
/// 32 bytes four times at shifts 0, 2, 4, 6; one scale. Stored: `[d f32][qs 64]`. The codes meet the activations
/// in `vpdpbusd`; the offset of 1 is the activations' total, from their group sums in two `pmaddwd`.
struct Tq2;

impl Tq2 {
    const QS_AT: usize = 4;

    /// Group `8 * half + 2 * n + part` is bytes `16 * part..` of the half's 32, at shift `2 * n`.
    fn decode(kb: &mut Kb, w: Value) -> Vec<Value> {
        let mut out = Vec::with_capacity(GROUPS + 1);
        for half in 0..2 {
            let bytes = [0, 16].map(|at| kb.load(I8X16, w, Self::QS_AT + 32 * half + at));
            for n in 0..4 {
                for &b in &bytes {
                    out.push(shift_bytes(kb, b, -2 * n as i64, 0x03));
                }
            }
        }
        out.push(kb.load(F32, w, 0));
        out
    }
}

/// A ternary block's result: `d * dx * (dot - sum(qx))`, the total of the activation codes from their 16 group
/// sums in two `pmaddwd`.
fn ternary_accumulate(kb: &mut Kb, codes: &[Value], d: Value, x: Value, dx: Value, acc: RowAcc) {
    let pairs: Vec<(Value, Value)> = codes
        .iter()
        .enumerate()
        .map(|(g, &c)| (act_codes(kb, x, g), c))
        .collect();
    let dot = kb.dot_u8i8_total(&pairs, TERNARY_MAX_CODE);
    let ones = kb.i16x8([1; 8]);
    let sums = act_group_sums(kb, x);
    let a = kb.dot_i16(sums[0], ones);
    let b = kb.dot_i16(sums[1], ones);
    let total = kb.b.ins().iadd(a, b);
    let sum = kb.b.ins().isub(dot, total);
    let ddx = kb.b.ins().fmul(d, dx);
    add_scaled(kb, acc, sum, ddx);
}

/// TQ1_0: five base-3 digits per byte stored as the fraction ceil(q * 256 / 243), so digit k of byte v is
/// `t * 3 >> 8` with `t = (v * 3^k) mod 256`: `qs` bytes 0..32 give elements `32 k + m`, bytes 32..48 elements
/// `160 + 16 k + m`, and the four `qh` bytes four digits each for elements `240 + 4 k + j`. Stored:
/// `[d f32][qs 48][qh 4]`. The digits meet the activations in `vpdpbusd` as TQ2_0's codes do.
///
/// The work is all in bytes: `t` for the next digit is `t + t + t` (byte adds wrap mod 256 for free), and the
/// digit is `[t >= 86] + [t >= 171]` (exactly `t * 3 >> 8` for every byte), two compares. x86 compares bytes as
/// signed, so the bytes are kept as `s = t ^ 0x80 = t + 128`, flipped once per vector: tripling keeps that form,
/// `3 * (t + 128) = 3t + 128 + 256`. Widening to 16-bit lanes for `pmullw` and packing back cost half again as
/// many instructions and measured 2.1x TQ2_0's decode.
struct Tq1;

impl Tq1 {
    const QS_AT: usize = 4;
    const QH_AT: usize = 4 + 48;

    /// The bytes `s = t ^ 0x80` of `t`.
    fn flip(kb: &mut Kb, t: Value) -> Value {
        let flip = kb.i8x16(0x80);
        kb.b.ins().bxor(t, flip)
    }

    /// The digit `t * 3 >> 8` of each byte, given as `s = t ^ 0x80`, from two signed compares: each true compare
    /// is -1, so the digit is minus their sum.
    fn digit(kb: &mut Kb, signed: Value) -> Value {
        let [ge86, ge171] = [86u8, 171].map(|bound| {
            let below = kb.i8x16((bound - 1) ^ 0x80);
            kb.b.ins().icmp(IntCC::SignedGreaterThan, signed, below)
        });
        let minus = kb.b.ins().iadd(ge86, ge171);
        let zero = kb.i8x16(0);
        kb.b.ins().isub(zero, minus)
    }

    /// `3 * t` in each byte, mod 256 (or, for `s = t ^ 0x80`, the `s` of `3 * t`).
    fn times3(kb: &mut Kb, t: Value) -> Value {
        let twice = kb.b.ins().iadd(t, t);
        kb.b.ins().iadd(twice, t)
    }

    fn decode(kb: &mut Kb, w: Value) -> Vec<Value> {
        let mut groups = vec![None; GROUPS];
        // qs: (byte offset, act group of digit 0, groups per digit), one vector of 16 bytes each.
        for (at, group0, per_digit) in [(0, 0, 2), (16, 1, 2), (32, 10, 1)] {
            let v = kb.load(I8X16, w, Self::QS_AT + at);
            let mut t = Self::flip(kb, v);
            for k in 0..5 {
                if k > 0 {
                    t = Self::times3(kb, t);
                }
                groups[group0 + per_digit * k] = Some(Self::digit(kb, t));
            }
        }
        // qh: lane 4k + j takes digit k of byte j: the four bytes repeated, then each group of four lanes
        // multiplied by its 3^k (as 3^k additions' worth of `times3`, picked lane by lane).
        let qh = kb.load(I32, w, Self::QH_AT);
        let qh = kb.b.ins().splat(I32X4, qh);
        let qh = kb.bitcast(I8X16, qh);
        let mut t = Self::flip(kb, qh);
        let mut picked = t;
        for k in 1..4 {
            t = Self::times3(kb, t);
            let lanes: [u8; 16] = std::array::from_fn(|i| if i / 4 == k { 0xFF } else { 0 });
            let lanes = kb.bytes16(lanes);
            picked = kb.b.ins().bitselect(lanes, t, picked);
        }
        groups[GROUPS - 1] = Some(Self::digit(kb, picked));
        let mut out: Vec<Value> = groups
            .into_iter()
            .map(|g| g.expect("every group decoded"))
            .collect();
        out.push(kb.load(F32, w, 0));
        out
    }
}
