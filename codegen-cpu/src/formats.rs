//! Per-format block dot products: how one stored weight block meets one block of quantized activations.
//!
//! Every integer format reduces to `vpdpbusd`-shaped dot products of unsigned weight codes with signed activation
//! codes, plus a correction for the codes' offset or the block minimum through the activations' group sums:
//! `w = d * code + m` gives `dot = d * dx * sum(code * qx) + m * dx * sum(qx)`.

use crate::builder::{ByteDot, Kb};
use crate::kquants::{shift_bytes, KQuant};
use crate::ternary_row::TernaryRow;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I32X4, I8X16};
use cranelift_codegen::ir::{InstBuilder, Type, Value};
use cranelift_frontend::Variable;
use kiln_ir::cpu_abi::ActFormat;
use kiln_ir::layout::{f16_fields, GroupBlock, Layout, Scales};
use kiln_ir::QuantFormat;

/// A row's running sum, as a vector reduced across its lanes at the end.
#[derive(Clone, Copy)]
pub struct RowAcc {
    pub v: Variable,
}

pub trait BlockDot {
    /// The activation format the weights' dot product reads.
    fn act(&self) -> ActFormat;
    /// Values per block (the activation block holds the same number).
    fn elems(&self) -> usize;
    /// Bytes of one stored weight block.
    fn block_bytes(&self) -> usize;
    /// Values of one activation block, loaded once and shared by every row that meets it.
    fn prepare(&self, kb: &mut Kb, x: Value) -> Vec<Value>;
    /// Values of one weight block (codes unpacked, scales loaded), shared by every token that meets it.
    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value>;
    /// The types of the values `unpack` returns, which a matmul over several tokens keeps in a scratch buffer.
    fn unpacked(&self) -> Vec<Type>;
    /// Adds `dot(w block, x block)` to `acc`, less the `row_term`.
    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc);
    /// A product `weight factor * activation factor` per block that the row sums apart from its vector
    /// accumulator (Q4_1's and Q5_1's minimum: `m * dx * sum(qx)`), as ggml sums it; the matmul keeps it for four
    /// rows in one f32x4, lane by lane.
    fn row_term(&self, _w: &[Value], _x: &[Value]) -> Option<(Value, Value)> {
        None
    }
    /// The type of a row's accumulator: an f32x4 or i32x4 (for formats whose blocks give exact integers,
    /// converted once after the last block) reduced across its lanes at the end; or f32, a row's sum block by
    /// block, which a group of four rows keeps as one f32x4 (lane `r` row `r`) filled by the grouped form.
    fn acc_type(&self) -> Type {
        F32X4
    }
    /// Whether the blocks leave out factors common to the whole row (a whole-tensor weight scale, a per-token
    /// activation scale), which `scale_row` then applies once.
    fn tensor_scaled(&self) -> bool {
        false
    }
    /// The finished product of a `tensor_scaled` format (one row's f32, or four rows' f32x4), given the token's
    /// activation row `x_row` and the pointer to the weight's scale.
    fn scale_row(&self, _kb: &mut Kb, dot: Value, _x_row: Value, _w_scale: Value) -> Value {
        dot
    }
    /// The format's dequantizer, where kiln generates one (embedding lookups).
    fn dequantizer(&self) -> Option<&dyn Dequantize> {
        None
    }
    /// The format's grouped blocks, where it has them: a matmul over several tokens then keeps each block of a
    /// group of four rows as one entry of its scratch buffer.
    fn grouped(&self) -> Option<&dyn Grouped> {
        None
    }
}

/// A block of a group of four interleaved rows kept as one entry, laid out so that a token meets the four rows
/// with fewer instructions than row by row:
/// - Block32 keeps each row's code vectors and gathers the rows' scalars (the scale, the minimum) into one f32x4
///   each: a token scales the four rows with one multiply. With a minimum, it takes each row's factor with a lane
///   shuffle and meets the four minimums with one `fma`; with a code offset, it takes the four rows' block totals
///   together, one row per lane, and adds them to the rows' sums with one `fma` (`groups_stored_rows`: a one-token
///   pass groups the rows too).
/// - The k-quants transpose the four rows' codes, so that a 32-bit lane holds one row's four codes of a `vpdpbusd`
///   step and the token's four activation codes are broadcast to all lanes: each sub-block's sums come out with
///   one row per lane, where row by row they needed a horizontal add. Their four accumulators then hold lane-groups
///   across the rows (`across_rows`): accumulator `l`, lane `r` is what row `r`'s accumulator sums in its lane `l`.
///
/// Where a one-token pass does not group the rows, the arithmetic is `BlockDot::accumulate`'s and `row_term`'s,
/// value for value; either way a token gets the same bits whether it meets the group alone (from the stored
/// blocks) or among other tokens (from the scratch buffer).
pub trait Grouped {
    /// The types of the values `group` returns.
    fn types(&self) -> Vec<Type>;
    /// The group's block, from each row's `unpack`ed values.
    fn group(&self, kb: &mut Kb, rows: &[Vec<Value>]) -> Vec<Value>;
    /// Adds the grouped `block`'s products with the activations `x` to the four accumulators, and its row terms
    /// to `terms` (the four rows' f32x4); says whether it has row terms.
    fn accumulate(
        &self,
        kb: &mut Kb,
        block: &[Value],
        x: &[Value],
        accs: &[RowAcc],
        terms: Variable,
    ) -> bool;
    /// Whether the accumulators hold lane-groups across the rows rather than one row each.
    fn across_rows(&self) -> bool {
        false
    }

    /// The group's block read straight from a layout that stores it grouped (`Scales::Grouped`), or `None` where
    /// each row's block is stored whole (and `group` combines the rows' `unpack`ed values).
    fn load_group(&self, _kb: &mut Kb, _group: Value) -> Option<Vec<Value>> {
        None
    }

    /// Whether a one-token pass groups the four rows' unpacked blocks in registers as well: where the grouped form
    /// is how the format sums four rows at all (an `acc_type` of f32), not only a faster layout of the scratch
    /// buffer.
    fn groups_stored_rows(&self) -> bool {
        false
    }
}

/// A stored block's values as f32, computed as the reference dequantizer (`kiln_ir::dequant`) computes them.
pub trait Dequantize {
    /// Row `lane`'s block in the group block at `group` (four rows' blocks where rows are interleaved by four, a
    /// row's own block where they are not) as f32x4 vectors, in order.
    fn dequantize(&self, kb: &mut Kb, group: Value, lane: Value) -> Vec<Value>;
}

/// The generator for `format` stored in `layout`, or `None` where kiln has none (the executor then runs the
/// reference code for that matmul).
pub fn block_dot(format: QuantFormat, layout: Layout) -> Option<Box<dyn BlockDot>> {
    use QuantFormat as F;
    let widened = |d: Box<dyn BlockDot>| (layout.scales == Scales::F32).then_some(d);
    match format {
        F::Q4_0 | F::Q4_1 | F::Q5_0 | F::Q5_1 | F::Q8_0 => {
            let generated = match layout.scales {
                Scales::F32 => true,
                Scales::Grouped | Scales::GroupedF16 => layout.interleave == GROUP,
                Scales::Gguf => false,
            };
            generated.then(|| Box::new(Block32::of(format, layout)) as Box<dyn BlockDot>)
        }
        F::Q4_K | F::Q5_K | F::Q6_K | F::TQ2_0 | F::TQ1_0 => widened(Box::new(KQuant::of(format))),
        F::I2_S | F::TL1 | F::TL2 if layout.scales == Scales::Gguf => {
            Some(Box::new(TernaryRow(format)))
        }
        F::F32 | F::F16 | F::BF16 if layout == Layout::GGUF => Some(Box::new(Float(format))),
        _ => None,
    }
}

/// Rows in a grouped block (`Grouped`), and in a grouped layout's row groups.
const GROUP: usize = 4;

/// The formats with blocks of 32: 4-bit or 8-bit codes, an optional 5th bit, a scale and an optional minimum.
/// Their f16 fields are stored widened to f32, at each block's front (`Scales::F32`) or gathered at the front of
/// four rows' group block (`Scales::Grouped`). Grouped, each field of the four rows is one vector load, where per
/// block it took a load per row and lane inserts (or a load, multiply and broadcast per row), and a group block
/// reads as one grouped entry (`Grouped::load_group`). Grouped, Q5_0's and Q5_1's fifth bits are the group's bit
/// planes: one load, then a shift and a mask per 16 codes, where a row's own 32 bits took a shuffle, a compare and
/// two masks per 16 codes.
struct Block32 {
    /// Whether the format has a minimum (Q4_1, Q5_1), its second f16 field; without one, the offset is a fixed
    /// multiple of `d`.
    min: bool,
    /// The code offset (`w = d * (code - offset)`) for formats without a minimum.
    offset: f32,
    /// Whether codes have a fifth bit (Q5_0, Q5_1).
    fifth_bits: bool,
    /// Byte offset of a row's own 32 fifth bits among its codes (a block's bytes after its f16 fields), where the
    /// layout keeps them with the row.
    qh_at: Option<usize>,
    /// Byte offset of the low 4 bits (or Q8_0's bytes) among a row's codes.
    qs_at: usize,
    /// Q8_0: 32 signed bytes, not 16 bytes of nibbles.
    bytes: bool,
    /// A row's bytes of codes in a block (in a grouped layout, apart from the group's bit planes).
    codes_bytes: usize,
    /// Bytes of a stored block (in a grouped layout, a group block's share per row).
    block_bytes: usize,
    /// Where a grouped layout's group block keeps its parts.
    group: Option<GroupBlock>,
}

impl Block32 {
    fn of(format: QuantFormat, layout: Layout) -> Self {
        let (min, offset, fifth_bits, bytes) = match format {
            QuantFormat::Q4_0 => (false, 8.0, false, false),
            QuantFormat::Q4_1 => (true, 0.0, false, false),
            QuantFormat::Q5_0 => (false, 16.0, true, false),
            QuantFormat::Q5_1 => (true, 0.0, true, false),
            QuantFormat::Q8_0 => (false, 128.0, false, true),
            _ => unreachable!("not a 32-block format"),
        };
        let group = layout.group_block(format);
        // The row's own fifth bits come first among its codes, unless the group keeps them as planes.
        let own_qh = fifth_bits && group.is_none();
        Block32 {
            min,
            offset,
            fifth_bits,
            qh_at: own_qh.then_some(0),
            qs_at: if own_qh { 4 } else { 0 },
            bytes,
            codes_bytes: match group {
                Some(group) => group.others(),
                None => format.block_bytes() - 2 * f16_fields(format).len(),
            },
            block_bytes: layout.block_bytes(format),
            group,
        }
    }

    /// The fields per block (f16 in GGUF, f32 stored): the scale, and the minimum where there is one.
    fn fields(&self) -> usize {
        1 + usize::from(self.min)
    }

    /// Whether the format has a code offset rather than a minimum (Q4_0, Q5_0, Q8_0). Its blocks then sum whole
    /// in integers, offset included, and a row adds each block's total times `d * dx` to one f32, as ggml's scalar
    /// dot product does; four rows take their totals together (`Kb::dot_u8i8_totals4`), where spread over lanes
    /// each row needed its own widening, conversion and `fma`. Formats with a minimum (Q4_1, Q5_1) keep each row's
    /// products spread over four lanes to the end, in the order of llama.cpp's x86 dot product: SmolLM2's greedy
    /// ids are checked against llama.cpp's, and block totals moved a near-tie there.
    fn totals(&self) -> bool {
        !self.min
    }

    /// Q8_0 on `pmaddubsw` hosts: its codes stay the signed bytes GGUF stores. Offset by 128 (as `vpdpbusd` takes
    /// them) they would be past `pmaddubsw`'s exact range, so the weights' signs move onto the activations and their
    /// magnitudes multiply them, and no offset is left to correct.
    fn signed_codes(&self, kb: &Kb) -> bool {
        self.bytes && kb.byte_dot() == ByteDot::Pmaddubsw
    }

    /// A row's two code vectors from its codes at `w + at`, Q8_0's offset by 128 into unsigned bytes (as every other
    /// format's codes are) or left signed.
    fn codes(&self, kb: &mut Kb, w: Value, at: usize, offset_codes: bool) -> [Value; 2] {
        let (mut lo, mut hi) = if self.bytes {
            let a = kb.load(I8X16, w, at + self.qs_at);
            let b = kb.load(I8X16, w, at + self.qs_at + 16);
            if offset_codes {
                let flip = kb.i8x16(0x80);
                (kb.b.ins().bxor(a, flip), kb.b.ins().bxor(b, flip))
            } else {
                (a, b)
            }
        } else {
            let q = kb.load(I8X16, w, at + self.qs_at);
            let mask = kb.i8x16(0x0F);
            (kb.b.ins().band(q, mask), kb.b.ins().ushr_imm_s(q, 4))
        };
        if let Some(qh_at) = self.qh_at {
            // 16 bytes from `qh`, which end within the row's codes (before the last 4).
            let qh = kb.load(I8X16, w, at + qh_at);
            let h0 = Self::high_bits(kb, qh, 0);
            let h1 = Self::high_bits(kb, qh, 2);
            lo = kb.b.ins().bor(lo, h0);
            hi = kb.b.ins().bor(hi, h1);
        }
        [lo, hi]
    }

    /// ORs row `lane`'s fifth bits from the group's bit planes (`planes`, as loaded) into its two code vectors.
    fn add_plane_bits(
        &self,
        kb: &mut Kb,
        planes: Value,
        lane: usize,
        codes: [Value; 2],
    ) -> [Value; 2] {
        let (_, bit) =
            (self.group.and_then(|group| group.planes_at(lane))).expect("grouped fifth bits");
        [0, 1].map(|half| {
            let high = plane_bit(kb, planes, bit + half);
            kb.b.ins().bor(codes[usize::from(half)], high)
        })
    }

    /// `add_plane_bits` for a row `lane` known only at run time (an embedding lookup's), from the planes at
    /// `group + at`.
    fn lane_plane_bits(
        &self,
        kb: &mut Kb,
        group: Value,
        at: usize,
        lane: Value,
        codes: [Value; 2],
    ) -> [Value; 2] {
        let planes = kb.load(I16X8, group, at);
        // The row's two planes moved to bits 0 and 1 (`planes_at`: row `lane`'s first plane is bit `2 * lane`).
        let first = kb.b.ins().ishl_imm_s(lane, 1);
        let planes = kb.b.ins().ushr(planes, first);
        let planes = kb.bitcast(I8X16, planes);
        [0, 1].map(|half| {
            let high = plane_bit(kb, planes, half);
            kb.b.ins().bor(codes[usize::from(half)], high)
        })
    }

    /// `unpack`'s values of a block with widened scales at `w`.
    fn unpack_widened(&self, kb: &mut Kb, w: Value, offset_codes: bool) -> Vec<Value> {
        let [lo, hi] = self.codes(kb, w, 4 * self.fields(), offset_codes);
        let mut values = vec![lo, hi];
        values.extend((0..self.fields()).map(|k| kb.load(F32, w, 4 * k)));
        values
    }

    /// One row's two code vectors against the activations' as `dot_u8i8` pairs, and the largest code they hold.
    fn code_pairs(
        &self,
        kb: &mut Kb,
        [lo, hi]: [Value; 2],
        x: &[Value],
    ) -> ([(Value, Value); 2], u8) {
        let (c0, c1) = (x[1], x[2]);
        if self.signed_codes(kb) {
            return ([kb.signed_pair(c0, lo), kb.signed_pair(c1, hi)], 128);
        }
        let max_code = match (self.bytes, self.fifth_bits) {
            (true, _) => u8::MAX,
            (false, true) => 31,
            (false, false) => 15,
        };
        ([(c0, lo), (c1, hi)], max_code)
    }

    /// A `totals` block's integer totals (one row's in every lane, or four rows' one per lane) with the code
    /// offset's correction added, as f32.
    fn corrected(kb: &mut Kb, totals: Value, x: &[Value]) -> Value {
        let totals = match x.get(3) {
            Some(&start) => kb.b.ins().iadd(totals, start),
            None => totals,
        };
        kb.b.ins().fcvt_from_sint(F32X4, totals)
    }

    /// `acc += fcvt(sum(codes * qx)) * ddx` lane by lane for one row's two code vectors of a format with a
    /// minimum; `ddx` is the row's `d * dx` in every lane. `accumulate` and the grouped form share it, so both
    /// compute every row's products the same way.
    fn add_lanes(&self, kb: &mut Kb, codes: [Value; 2], x: &[Value], ddx: Value, acc: RowAcc) {
        let (pairs, max_code) = self.code_pairs(kb, codes, x);
        let isum = kb.dot_u8i8_total(&pairs, max_code);
        let fsum = kb.b.ins().fcvt_from_sint(F32X4, isum);
        let v = kb.b.use_var(acc.v);
        let v = kb.b.ins().fma(fsum, ddx, v);
        kb.b.def_var(acc.v, v);
    }

    /// The 16 bits of bytes `at` and `at + 1` of `qh` spread over 16 bytes: 0x10 where the bit is set, else 0.
    fn high_bits(kb: &mut Kb, qh: Value, at: u8) -> Value {
        let set = bit_mask16(kb, qh, at);
        let high = kb.i8x16(0x10);
        kb.b.ins().band(set, high)
    }
}

/// Bit `bit` (below 8) of every byte of the bit planes `planes` as that byte's 0x10.
fn plane_bit(kb: &mut Kb, planes: Value, bit: u8) -> Value {
    shift_bytes(kb, planes, 4 - i64::from(bit), 0x10)
}

/// The 16 bits of bytes `at` and `at + 1` of the vector `bytes` as 16 byte lanes: 0xFF where the bit is set.
/// The bits come in a vector load that covers them, not a scalar load: broadcasting a scalar costs a move and a
/// broadcast per use, where the `pshufb` that spreads the bits picks them from any byte of a vector.
pub(crate) fn bit_mask16(kb: &mut Kb, bytes: Value, at: u8) -> Value {
    let mut index = [at; 16];
    index[8..].fill(at + 1);
    let index = kb.bytes16(index);
    let spread = kb.pshufb(bytes, index);
    let masks = kb.bytes16(std::array::from_fn(|i| 1 << (i % 8)));
    let bits = kb.b.ins().band(spread, masks);
    kb.b.ins().icmp(IntCC::Equal, bits, masks)
}

impl BlockDot for Block32 {
    fn act(&self) -> ActFormat {
        ActFormat::Q8_0
    }

    fn elems(&self) -> usize {
        32
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// `[dx, codes 0..16, codes 16..32]`, then a fourth value: with a minimum, its factor `dx * sum(qx)` (the
    /// `row_term`); with a code offset (unless `signed_codes`), the correction `-offset * sum(qx)` in every lane.
    fn prepare(&self, kb: &mut Kb, x: Value) -> Vec<Value> {
        let dx = kb.load(F32, x, 0);
        let codes = ActFormat::Q8_0.codes_at();
        let c0 = kb.load(I8X16, x, codes);
        let c1 = kb.load(I8X16, x, codes + 16);
        let mut values = vec![dx, c0, c1];
        if self.signed_codes(kb) {
            return values;
        }
        if !self.min {
            // The two i16 sums (the vector's lane 1) in every lane, each pair multiplied-added by `-offset`.
            let head = kb.load(I32X4, x, 0);
            let sums = kb.shuffle32(head, head, [(ActFormat::SUMS_AT / 4) as u8; 4]);
            let sums = kb.bitcast(I16X8, sums);
            let factor = kb.i16x8([-(self.offset as i16); 8]);
            values.push(kb.dot_i16(sums, factor));
            return values;
        }
        let at = ActFormat::Q8_0
            .scaled_sum_at()
            .expect("Q8_0 blocks keep d * sum");
        values.push(kb.load(F32, x, at));
        values
    }

    fn unpacked(&self) -> Vec<Type> {
        let mut types = vec![I8X16, I8X16, F32];
        types.extend(self.min.then_some(F32));
        types
    }

    /// `[codes 0..16, codes 16..32, d]`, then `m` for formats with a minimum. Grouped scales are read a group
    /// at a time (`load_group`), never row by row: they make the format `groups_stored_rows`.
    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        assert!(
            self.group.is_none(),
            "a row of a grouped block unpacked alone"
        );
        let offset_codes = !self.signed_codes(kb);
        self.unpack_widened(kb, w, offset_codes)
    }

    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc) {
        let ddx = kb.b.ins().fmul(w[2], x[0]);
        if !self.totals() {
            let ddx = kb.b.ins().splat(F32X4, ddx);
            return self.add_lanes(kb, [w[0], w[1]], x, ddx, acc);
        }
        let (pairs, max_code) = self.code_pairs(kb, [w[0], w[1]], x);
        let isum = kb.dot_u8i8_total(&pairs, max_code);
        // The row's four lanes added, the total in every lane (rows not interleaved: a rare layout).
        let halves = kb.b.ins().iadd_pairwise(isum, isum);
        let total = kb.b.ins().iadd_pairwise(halves, halves);
        let total = Self::corrected(kb, total, x);
        let total = kb.b.ins().extractlane(total, 0);
        let v = kb.b.use_var(acc.v);
        let v = kb.b.ins().fma(total, ddx, v);
        kb.b.def_var(acc.v, v);
    }

    fn row_term(&self, w: &[Value], x: &[Value]) -> Option<(Value, Value)> {
        self.min.then(|| (w[3], x[3]))
    }

    fn acc_type(&self) -> Type {
        if self.totals() {
            F32
        } else {
            F32X4
        }
    }

    fn dequantizer(&self) -> Option<&dyn Dequantize> {
        Some(self)
    }

    fn grouped(&self) -> Option<&dyn Grouped> {
        Some(self)
    }
}

impl Grouped for Block32 {
    /// `[codes 0..16, codes 16..32]` of each row, the rows' `d`, then the rows' `m`.
    fn types(&self) -> Vec<Type> {
        let mut types = vec![I8X16; 8];
        types.push(F32X4);
        types.extend(self.min.then_some(F32X4));
        types
    }

    fn groups_stored_rows(&self) -> bool {
        self.totals() || self.group.is_some()
    }

    /// A grouped layout's group block: each row's codes (with its fifth bits from the group's planes), then each
    /// field of the four rows in one load.
    fn load_group(&self, kb: &mut Kb, group: Value) -> Option<Vec<Value>> {
        let block = self.group?;
        let offset_codes = !self.signed_codes(kb);
        let planes = (block.planes_at(0)).map(|(at, _)| kb.load(I8X16, group, at));
        let mut values = Vec::with_capacity(GROUP * 2 + self.fields());
        for lane in 0..GROUP {
            let codes = self.codes(kb, group, block.others_at(lane), offset_codes);
            values.extend(match planes {
                Some(planes) => self.add_plane_bits(kb, planes, lane, codes),
                None => codes,
            });
        }
        for k in 0..self.fields() {
            let at = block.field_at(k, 0);
            values.push(match block.field_bytes() {
                2 => kb.load_f16x4(group, at),
                _ => kb.load(F32X4, group, at),
            });
        }
        Some(values)
    }

    fn group(&self, kb: &mut Kb, rows: &[Vec<Value>]) -> Vec<Value> {
        let codes = rows.iter().flat_map(|w| [w[0], w[1]]);
        let scalars: Vec<Value> = (2..rows[0].len())
            .map(|field| kb.f32x4_of(std::array::from_fn(|r| rows[r][field])))
            .collect();
        codes.chain(scalars).collect()
    }

    fn accumulate(
        &self,
        kb: &mut Kb,
        block: &[Value],
        x: &[Value],
        rows: &[RowAcc],
        terms: Variable,
    ) -> bool {
        let dx = kb.b.ins().splat(F32X4, x[0]);
        let ddx = kb.b.ins().fmul(block[8], dx);
        if self.totals() {
            let pairs: Vec<_> = (0..4)
                .map(|r| self.code_pairs(kb, [block[2 * r], block[2 * r + 1]], x))
                .collect();
            let totals = kb.dot_u8i8_totals4(std::array::from_fn(|r| &pairs[r].0[..]), pairs[0].1);
            let totals = Self::corrected(kb, totals, x);
            let v = kb.b.use_var(rows[0].v);
            let v = kb.b.ins().fma(totals, ddx, v);
            kb.b.def_var(rows[0].v, v);
            return false;
        }
        for (r, &acc) in rows.iter().enumerate() {
            let lane = r as u8;
            let row_ddx = kb.shuffle32(ddx, ddx, [lane; 4]);
            self.add_lanes(kb, [block[2 * r], block[2 * r + 1]], x, row_ddx, acc);
        }
        if !self.min {
            return false;
        }
        let factor = kb.b.ins().splat(F32X4, x[3]);
        let t = kb.b.use_var(terms);
        let t = kb.b.ins().fma(block[9], factor, t);
        kb.b.def_var(terms, t);
        true
    }
}

impl Dequantize for Block32 {
    /// `d * (code - offset)`, or `d * code + m` (multiply, then add), from the unpacked codes: each code widened
    /// to an i32 lane, the offset taken off in integers, converted exactly.
    fn dequantize(&self, kb: &mut Kb, group: Value, lane: Value) -> Vec<Value> {
        let (codes, fields) = if let Some(block) = self.group {
            let row = kb.offset(group, lane, self.codes_bytes);
            let mut codes = self.codes(kb, row, block.others_at(0), true);
            if let Some((at, _)) = block.planes_at(0) {
                codes = self.lane_plane_bits(kb, group, at, lane, codes);
            }
            let at = kb.offset(group, lane, block.field_bytes());
            let fields: Vec<Value> = (0..self.fields())
                .map(|k| {
                    let field = match block.field_bytes() {
                        2 => kb.load_f16(at, block.field_at(k, 0)),
                        _ => kb.load(F32, at, block.field_at(k, 0)),
                    };
                    kb.b.ins().splat(F32X4, field)
                })
                .collect();
            (codes, fields)
        } else {
            let w = kb.offset(group, lane, self.block_bytes());
            let unpacked = self.unpack_widened(kb, w, true);
            let fields = (unpacked[2..].iter())
                .map(|&f| kb.b.ins().splat(F32X4, f))
                .collect();
            ([unpacked[0], unpacked[1]], fields)
        };
        let (d, m) = (fields[0], fields.get(1).copied());
        let mut values = Vec::with_capacity(8);
        for codes in codes {
            for q in code_values(kb, codes, self.offset as i32) {
                let y = kb.b.ins().fmul(d, q);
                values.push(match m {
                    Some(m) => kb.b.ins().fadd(y, m),
                    None => y,
                });
            }
        }
        values
    }
}

/// 16 unsigned byte codes less `offset`, as four f32x4 in order: each code widened to an i32 lane and the offset
/// taken off in integers, so the conversion is exact.
pub(crate) fn code_values(kb: &mut Kb, codes: Value, offset: i32) -> [Value; 4] {
    let offset = kb.i32x4(offset);
    let halves = [kb.b.ins().uwiden_low(codes), kb.b.ins().uwiden_high(codes)];
    [(0, false), (0, true), (1, false), (1, true)].map(|(h, high)| {
        let wide = if high {
            kb.b.ins().uwiden_high(halves[h])
        } else {
            kb.b.ins().uwiden_low(halves[h])
        };
        let q = kb.b.ins().isub(wide, offset);
        kb.b.ins().fcvt_from_sint(F32X4, q)
    })
}

/// F32, F16 and BF16 weights against f32 activations (already rounded to the weights' precision): 16 values per
/// block, widened to f32 and multiplied-added.
struct Float(QuantFormat);

impl Float {
    /// Weights 4i..4i+4 of the block as f32x4.
    fn load4(&self, kb: &mut Kb, w: Value, i: usize) -> Value {
        match self.0 {
            QuantFormat::F32 => kb.load(F32X4, w, 16 * i),
            QuantFormat::BF16 => {
                let h = kb.b.ins().uload16x4(crate::builder::mem(), w, 8 * i as i32);
                let bits = kb.b.ins().ishl_imm_s(h, 16);
                kb.bitcast(F32X4, bits)
            }
            _ => kb.load_f16x4(w, 8 * i),
        }
    }
}

impl BlockDot for Float {
    fn act(&self) -> ActFormat {
        ActFormat::for_weight(self.0)
    }

    fn elems(&self) -> usize {
        16
    }

    fn block_bytes(&self) -> usize {
        16 * self.0.block_bytes()
    }

    fn prepare(&self, kb: &mut Kb, x: Value) -> Vec<Value> {
        (0..4).map(|i| kb.load(F32X4, x, 16 * i)).collect()
    }

    fn unpacked(&self) -> Vec<Type> {
        vec![F32X4; 4]
    }

    fn unpack(&self, kb: &mut Kb, w: Value) -> Vec<Value> {
        (0..4).map(|i| self.load4(kb, w, i)).collect()
    }

    fn accumulate(&self, kb: &mut Kb, w: &[Value], x: &[Value], acc: RowAcc) {
        let mut v = kb.b.use_var(acc.v);
        for (&wi, &xi) in w.iter().zip(x) {
            v = kb.b.ins().fma(wi, xi, v);
        }
        kb.b.def_var(acc.v, v);
    }

    fn dequantizer(&self) -> Option<&dyn Dequantize> {
        Some(self)
    }
}

impl Dequantize for Float {
    /// The widened values themselves: exact for every finite value.
    fn dequantize(&self, kb: &mut Kb, group: Value, lane: Value) -> Vec<Value> {
        let w = kb.offset(group, lane, self.block_bytes());
        self.unpack(kb, w)
    }
}
