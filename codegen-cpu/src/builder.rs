//! A thin layer over Cranelift's `FunctionBuilder`: counted loops, argument loads and the handful of vector idioms
//! every kernel uses, each written once.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I16, I16X8, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    BlockArg, ConstantData, Endianness, Function, InstBuilder, MemFlagsData, Type, Value,
};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

pub struct Kb<'a> {
    pub b: FunctionBuilder<'a>,
    /// The argument-block pointer.
    pub args: Value,
    byte_dot: ByteDot,
}

/// What kernels are generated for: Cranelift's view of the target, and the instructions that multiply bytes.
#[derive(Clone, Copy)]
pub struct Target {
    pub frontend: TargetFrontendConfig,
    pub byte_dot: ByteDot,
}

/// How the host multiplies unsigned by signed bytes and sums each four products (`Kb::dot_u8i8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteDot {
    /// The widening multiply-add tree, which Cranelift folds into one `vpdpbusd` on hosts with VNNI (and lowers
    /// exactly, if slowly, elsewhere).
    Widening,
    /// x86 without VNNI: `pmaddubsw` then `pmaddwd` by ones. The tree would lower to about nine widening
    /// instructions per 16 bytes there; these are two.
    Pmaddubsw,
}

/// Memory the kernels touch is always valid, so accesses never trap; alignment is not promised (weight blocks
/// of 20 or 24 bytes put vectors anywhere), so Cranelift never folds a load into an instruction that needs it.
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// A kernel's inputs (weights, activations, arguments): memory no kernel writes while it runs. Such loads are
/// pure to Cranelift, so it places each next to its first use instead of in program order, which keeps a
/// weight block's values from all being live at once.
pub fn input() -> MemFlagsData {
    mem().with_readonly().with_can_move()
}

/// Little-endian lane reinterpretation.
fn lanes() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

impl<'a> Kb<'a> {
    /// Starts the body of `func` (one pointer parameter) and hands it to `body`.
    pub fn build(func: &mut Function, target: Target, body: impl FnOnce(&mut Kb)) {
        let mut ctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(func, &mut ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let args = b.block_params(entry)[0];
        let mut kb = Kb {
            b,
            args,
            byte_dot: target.byte_dot,
        };
        body(&mut kb);
        kb.b.ins().return_(&[]);
        kb.b.finalize(target.frontend);
    }

    pub fn arg(&mut self, offset: i32, ty: Type) -> Value {
        self.b.ins().load(ty, input(), self.args, offset)
    }

    pub fn load(&mut self, ty: Type, ptr: Value, offset: usize) -> Value {
        self.b.ins().load(ty, input(), ptr, offset as i32)
    }

    /// A load of memory this kernel wrote (not an `input`): it stays after the stores before it.
    pub fn load_written(&mut self, ty: Type, ptr: Value, offset: usize) -> Value {
        self.b.ins().load(ty, mem(), ptr, offset as i32)
    }

    pub fn store(&mut self, value: Value, ptr: Value, offset: usize) {
        self.b.ins().store(mem(), value, ptr, offset as i32);
    }

    pub fn i64(&mut self, v: i64) -> Value {
        self.b.ins().iconst(I64, v)
    }

    pub fn f32(&mut self, v: f32) -> Value {
        self.b.ins().f32const(v)
    }

    pub fn f64x2(&mut self, v: f64) -> Value {
        let s = self.b.ins().f64const(v);
        self.b.ins().splat(cranelift_codegen::ir::types::F64X2, s)
    }

    pub fn f32x4(&mut self, v: f32) -> Value {
        let s = self.f32(v);
        self.b.ins().splat(F32X4, s)
    }

    pub fn i8x16(&mut self, v: u8) -> Value {
        let s = self
            .b
            .ins()
            .iconst(cranelift_codegen::ir::types::I8, v as i64);
        self.b.ins().splat(I8X16, s)
    }

    /// A vector constant of 16 bytes.
    pub fn bytes16(&mut self, bytes: [u8; 16]) -> Value {
        let data = ConstantData::from(bytes.to_vec());
        let handle = self.b.func.dfg.constants.insert(data);
        self.b.ins().vconst(I8X16, handle)
    }

    /// Bytes of `v` picked by `index` (an index with its top bit set gives 0). x86's `pshufb` directly: the
    /// portable `swizzle` adds an instruction per use to zero out-of-range indices, which constant indices
    /// never need.
    pub fn pshufb(&mut self, v: Value, index: Value) -> Value {
        self.b.ins().x86_pshufb(v, index)
    }

    /// An `i16x8` constant.
    pub fn i16x8(&mut self, lanes: [i16; 8]) -> Value {
        let bytes: Vec<u8> = lanes.iter().flat_map(|v| v.to_le_bytes()).collect();
        let v = self.bytes16(bytes.try_into().expect("16 bytes"));
        self.bitcast(I16X8, v)
    }

    pub fn i32x4(&mut self, v: i32) -> Value {
        let s = self.b.ins().iconst(I32, v as i64);
        self.b.ins().splat(I32X4, s)
    }

    /// Four f16 values at `ptr + offset` as an f32x4, exact for every finite value (`f16_bits_to_f32`).
    pub fn load_f16x4(&mut self, ptr: Value, offset: usize) -> Value {
        let bits = self.b.ins().sload16x4(input(), ptr, offset as i32);
        self.f16_bits_to_f32(bits)
    }

    /// The f16 value at `ptr + offset` as an f32 (`f16_bits_to_f32`).
    pub fn load_f16(&mut self, ptr: Value, offset: usize) -> Value {
        let bits = self.b.ins().sload16(I32, input(), ptr, offset as i32);
        self.f16_bits_to_f32(bits)
    }

    /// f16 bits, sign-extended into an i32 (or each lane of an i32x4), as f32: exact for every finite value,
    /// subnormals included. The shift puts the exponent and mantissa in f32's places, the mask keeps the sign and
    /// clears the three bits the sign extension left above the exponent, and the multiply by 2^112 rebiases the
    /// exponent (a subnormal f16 is an f32 subnormal before it, so it comes out exact too). Three instructions
    /// (where x86's F16C, which Cranelift does not emit, takes one) and two vector constants, each a register
    /// for the rest of a loop's iteration: register pressure is why formats with a minimum widen theirs at
    /// compile time instead (`Scales::Grouped`).
    pub fn f16_bits_to_f32(&mut self, bits: Value) -> Value {
        const SIGN_EXPONENT_MANTISSA: i32 = 0x8FFF_FFFF_u32 as i32;
        const REBIAS: f32 = f32::from_bits(0x7780_0000); // 2^112
        let placed = self.b.ins().ishl_imm_s(bits, 13);
        let (placed, scale) = if self.b.func.dfg.value_type(bits).is_vector() {
            let mask = self.i32x4(SIGN_EXPONENT_MANTISSA);
            let placed = self.b.ins().band(placed, mask);
            (self.bitcast(F32X4, placed), self.f32x4(REBIAS))
        } else {
            let placed = self
                .b
                .ins()
                .band_imm_s(placed, i64::from(SIGN_EXPONENT_MANTISSA));
            (self.bitcast(F32, placed), self.f32(REBIAS))
        };
        self.b.ins().fmul(placed, scale)
    }

    /// `base + index * scale` for an i64 index.
    pub fn offset(&mut self, base: Value, index: Value, scale: usize) -> Value {
        let bytes = self.b.ins().imul_imm_s(index, scale as i64);
        self.b.ins().iadd(base, bytes)
    }

    pub fn var(&mut self, ty: Type, init: Value) -> Variable {
        let v = self.b.declare_var(ty);
        self.b.def_var(v, init);
        v
    }

    /// `for i in (start..end).step_by(step) { body(i) }` over i64; loop-carried state goes in `Variable`s.
    pub fn for_range(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: impl FnOnce(&mut Kb, Value),
    ) {
        let header = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        self.b.append_block_param(header, I64);
        self.b.ins().jump(header, &[BlockArg::Value(start)]);
        self.b.switch_to_block(header);
        let i = self.b.block_params(header)[0];
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, i, end);
        self.b.ins().brif(more, inner, &[], exit, &[]);
        self.b.switch_to_block(inner);
        self.b.seal_block(inner);
        body(self, i);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.ins().jump(header, &[BlockArg::Value(next)]);
        self.b.seal_block(header);
        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
    }

    /// `if cond { then } else { otherwise }`; values either branch computes reach later code through `Variable`s.
    pub fn if_else(
        &mut self,
        cond: Value,
        then: impl FnOnce(&mut Kb),
        otherwise: impl FnOnce(&mut Kb),
    ) {
        let (yes, no, done) = (
            self.b.create_block(),
            self.b.create_block(),
            self.b.create_block(),
        );
        self.b.ins().brif(cond, yes, &[], no, &[]);
        for (block, body) in [
            (yes, Box::new(then) as Box<dyn FnOnce(&mut Kb)>),
            (no, Box::new(otherwise)),
        ] {
            self.b.switch_to_block(block);
            self.b.seal_block(block);
            body(self);
            self.b.ins().jump(done, &[]);
        }
        self.b.switch_to_block(done);
        self.b.seal_block(done);
    }

    /// `for i in 0..count` with a count known at generation time.
    pub fn for_count(&mut self, count: usize, body: impl FnOnce(&mut Kb, Value)) {
        let (start, end) = (self.i64(0), self.i64(count as i64));
        self.for_range(start, end, 1, body);
    }

    /// `for i in 0..count` over pointers: `body` gets `start + i * stride` of each `(start, stride)` in `walks`,
    /// carried from one iteration to the next by an add. Cranelift hoists nothing out of loops, so an offset
    /// computed from `i` costs a multiply, and reloads the base, every iteration.
    pub fn for_walk(
        &mut self,
        count: usize,
        walks: &[(Value, usize)],
        body: impl FnOnce(&mut Kb, &[Value]),
    ) {
        let (start, end) = (self.i64(0), self.i64(count as i64));
        self.walk_range(start, end, walks, body);
    }

    /// `for_walk` with the body repeated `unroll` times per iteration (`count` a multiple of it), each copy's
    /// pointers a fixed offset from the iteration's: a short body's loop overhead (the pointers' adds and moves,
    /// the compare and branches) is then paid once per `unroll` bodies.
    pub fn for_walk_unrolled(
        &mut self,
        count: usize,
        unroll: usize,
        walks: &[(Value, usize)],
        mut body: impl FnMut(&mut Kb, &[Value]),
    ) {
        debug_assert!(
            count.is_multiple_of(unroll),
            "the unrolled copies cover the count"
        );
        let wide: Vec<(Value, usize)> = walks
            .iter()
            .map(|&(p, stride)| (p, stride * unroll))
            .collect();
        self.for_walk(count / unroll, &wide, |kb, at| {
            for copy in 0..unroll {
                let copy_at: Vec<Value> = at
                    .iter()
                    .zip(walks)
                    .map(|(&p, &(_, stride))| match copy {
                        0 => p,
                        _ => kb.b.ins().iadd_imm_s(p, (copy * stride) as i64),
                    })
                    .collect();
                body(kb, &copy_at);
            }
        });
    }

    /// `for_walk` over a count known only when the kernel runs.
    pub fn for_walk_n(
        &mut self,
        count: Value,
        walks: &[(Value, usize)],
        body: impl FnOnce(&mut Kb, &[Value]),
    ) {
        let start = self.i64(0);
        self.walk_range(start, count, walks, body);
    }

    fn walk_range(
        &mut self,
        start: Value,
        end: Value,
        walks: &[(Value, usize)],
        body: impl FnOnce(&mut Kb, &[Value]),
    ) {
        let vars: Vec<Variable> = walks
            .iter()
            .map(|&(start, _)| self.var(I64, start))
            .collect();
        self.for_range(start, end, 1, |kb, _| {
            let at: Vec<Value> = vars.iter().map(|&v| kb.b.use_var(v)).collect();
            body(kb, &at);
            for ((&var, &p), &(_, stride)) in vars.iter().zip(&at).zip(walks) {
                let next = kb.b.ins().iadd_imm_s(p, stride as i64);
                kb.b.def_var(var, next);
            }
        });
    }

    /// `acc + sum of a[i] * b[i]` over each group of 4 bytes, `a` signed and `b` unsigned, every byte of `b` at
    /// most 128: with `pmaddubsw`, whose pair sums saturate at i16, that bound keeps them exact.
    pub fn dot_u8i8(&mut self, acc: Value, a_i8: Value, b_u8: Value) -> Value {
        if self.byte_dot == ByteDot::Pmaddubsw {
            return self.dot_u8i8_sum(acc, &[(a_i8, b_u8)], 128);
        }
        let ins = |kb: &mut Kb, lo: bool| {
            let a = if lo {
                kb.b.ins().swiden_low(a_i8)
            } else {
                kb.b.ins().swiden_high(a_i8)
            };
            let b = if lo {
                kb.b.ins().uwiden_low(b_u8)
            } else {
                kb.b.ins().uwiden_high(b_u8)
            };
            let p = kb.b.ins().imul(a, b);
            let (pl, ph) = (kb.b.ins().swiden_low(p), kb.b.ins().swiden_high(p));
            kb.b.ins().iadd_pairwise(pl, ph)
        };
        let lo = ins(self, true);
        let hi = ins(self, false);
        let sum = self.b.ins().iadd_pairwise(lo, hi);
        self.b.ins().iadd(sum, acc)
    }

    /// The pair `(a', b')` whose `dot_u8i8` is `sum of a[i] * b[i]` for signed bytes `b`, on `pmaddubsw` hosts:
    /// the magnitudes `|b|` (at most 128, unsigned) against `a` negated where `b` is negative, as llama.cpp
    /// multiplies signed bytes. `a` must not hold -128, whose negation wraps.
    pub fn signed_pair(&mut self, a_i8: Value, b_i8: Value) -> (Value, Value) {
        let magnitude = self.b.ins().iabs(b_i8);
        let negated = self.b.ins().ineg(a_i8);
        // `b` is negative exactly where its top bit is set.
        let signed = self.b.ins().blendv(b_i8, negated, a_i8);
        (signed, magnitude)
    }

    pub fn byte_dot(&self) -> ByteDot {
        self.byte_dot
    }

    /// `acc + sum(dot_u8i8(a_i8, b_u8))` over `pairs`, every byte of each `b_u8` at most `max_code` (at most
    /// 128). The sums are integers, so their grouping changes no result, and each host groups them its own way:
    /// - VNNI: each `vpdpbusd` accumulates onto the last; from eight pairs on, in four independent chains summed
    ///   at the end, since a single chain would wait on each one's latency in turn.
    /// - `pmaddubsw`: as many pairs as keep the sums exact are added in i16 before one `pmaddwd`. A lane of
    ///   `pmaddubsw` lies in `[-256 * max_code, 254 * max_code]`, so `128 / max_code` of them fit in i16.
    pub fn dot_u8i8_sum(&mut self, acc: Value, pairs: &[(Value, Value)], max_code: u8) -> Value {
        if self.byte_dot == ByteDot::Pmaddubsw {
            return self.pmaddubsw_sum(Some(acc), pairs, max_code);
        }
        if pairs.len() < 8 {
            return pairs
                .iter()
                .fold(acc, |sum, &(a_i8, b_u8)| self.dot_u8i8(sum, a_i8, b_u8));
        }
        let zero = self.i32x4(0);
        let mut chains = [acc, zero, zero, zero];
        for (i, &(a_i8, b_u8)) in pairs.iter().enumerate() {
            chains[i % 4] = self.dot_u8i8(chains[i % 4], a_i8, b_u8);
        }
        let front = self.b.ins().iadd(chains[0], chains[1]);
        let back = self.b.ins().iadd(chains[2], chains[3]);
        self.b.ins().iadd(front, back)
    }

    /// `dot_u8i8_sum` from nothing. On `pmaddubsw` hosts the first products start the sum: an added zero vector
    /// stays in the code as a `paddd` per call (one per row and block of every matmul that sums this way).
    pub fn dot_u8i8_total(&mut self, pairs: &[(Value, Value)], max_code: u8) -> Value {
        if self.byte_dot == ByteDot::Pmaddubsw {
            return self.pmaddubsw_sum(None, pairs, max_code);
        }
        let zero = self.i32x4(0);
        self.dot_u8i8_sum(zero, pairs, max_code)
    }

    /// `dot_u8i8_sum` on `pmaddubsw` hosts, onto `acc` when there is one.
    fn pmaddubsw_sum(
        &mut self,
        acc: Option<Value>,
        pairs: &[(Value, Value)],
        max_code: u8,
    ) -> Value {
        let ones = self.i16x8([1; 8]);
        let per = (128 / max_code.max(1) as usize).max(1);
        let mut sum = acc;
        for chunk in pairs.chunks(per) {
            let mut words = self.b.ins().x86_pmaddubsw(chunk[0].0, chunk[0].1);
            for &(a_i8, b_u8) in &chunk[1..] {
                let more = self.b.ins().x86_pmaddubsw(a_i8, b_u8);
                words = self.b.ins().iadd(words, more);
            }
            let quads = self.dot_i16(words, ones);
            sum = Some(match sum {
                Some(sum) => self.b.ins().iadd(quads, sum),
                None => quads,
            });
        }
        sum.expect("at least one pair")
    }

    /// `[total 0, total 1, total 2, total 3]`: the `dot_u8i8` products of each of four rows' `pairs` summed whole,
    /// one row per i32 lane, every byte of each `b_u8` at most `max_code`. Integer sums, so the grouping changes no
    /// result; each host groups them its own way:
    /// - `pmaddubsw`: each row's products are added in i16, then adjacent rows' sums are paired with `phaddw` while
    ///   a lane stays within `dot_u8i8_sum`'s bound (`128 / max_code` products: Q5 codes once, Q4 codes twice);
    ///   one `pmaddwd` widens each vector left.
    /// - VNNI (and rows past the i16 bound): each row's `dot_u8i8_sum`.
    ///
    /// The i32 vectors left are paired with `phaddd` down to one.
    pub fn dot_u8i8_totals4(&mut self, rows: [&[(Value, Value)]; 4], max_code: u8) -> Value {
        let per_lane = 128 / max_code.max(1) as usize;
        let products = rows[0].len();
        let mut vectors: Vec<Value> = if self.byte_dot == ByteDot::Pmaddubsw && products <= per_lane
        {
            let mut words: Vec<Value> = rows
                .iter()
                .map(|pairs| {
                    let mut sum = self.b.ins().x86_pmaddubsw(pairs[0].0, pairs[0].1);
                    for &(a_i8, b_u8) in &pairs[1..] {
                        let more = self.b.ins().x86_pmaddubsw(a_i8, b_u8);
                        sum = self.b.ins().iadd(sum, more);
                    }
                    sum
                })
                .collect();
            let mut in_lane = products;
            while words.len() > 1 && 2 * in_lane <= per_lane {
                words = self.pairwise(&words);
                in_lane *= 2;
            }
            let ones = self.i16x8([1; 8]);
            words.into_iter().map(|w| self.dot_i16(w, ones)).collect()
        } else {
            rows.iter()
                .map(|pairs| self.dot_u8i8_total(pairs, max_code))
                .collect()
        };
        while vectors.len() > 1 {
            vectors = self.pairwise(&vectors);
        }
        vectors[0]
    }

    /// Each two vectors' adjacent lanes added (`phaddw`/`phaddd`): the first's pairs in the low half, the second's
    /// in the high.
    fn pairwise(&mut self, vectors: &[Value]) -> Vec<Value> {
        vectors
            .chunks(2)
            .map(|pair| self.b.ins().iadd_pairwise(pair[0], pair[1]))
            .collect()
    }

    /// `[a0*b0 + a1*b1, a2*b2 + a3*b3, ...]` of two `i16x8` as `i32x4`: written as the tree Cranelift folds into
    /// one `pmaddwd`.
    pub fn dot_i16(&mut self, a: Value, b: Value) -> Value {
        let (al, bl) = (self.b.ins().swiden_low(a), self.b.ins().swiden_low(b));
        let (ah, bh) = (self.b.ins().swiden_high(a), self.b.ins().swiden_high(b));
        let lo = self.b.ins().imul(al, bl);
        let hi = self.b.ins().imul(ah, bh);
        self.b.ins().iadd_pairwise(lo, hi)
    }

    /// The f32x4 of four f32 scalars, in order.
    pub fn f32x4_of(&mut self, lanes: [Value; 4]) -> Value {
        let mut v = self.b.ins().scalar_to_vector(F32X4, lanes[0]);
        for (lane, &x) in lanes.iter().enumerate().skip(1) {
            v = self.b.ins().insertlane(v, x, lane as u8);
        }
        v
    }

    /// The four lanes of an `f32x4` added.
    pub fn hsum_f32(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fadd(l[0], l[1]);
        let c = self.b.ins().fadd(l[2], l[3]);
        self.b.ins().fadd(a, c)
    }

    /// `[hsum_f32(a), hsum_f32(b), hsum_f32(c), hsum_f32(d)]`, each lane summed in the same order, by two rounds
    /// of pairing lanes across vectors.
    pub fn hsum4_f32(&mut self, [a, b, c, d]: [Value; 4]) -> Value {
        let pairs = |kb: &mut Kb, u: Value, v: Value| {
            let even = kb.shuffle32(u, v, [0, 2, 4, 6]);
            let odd = kb.shuffle32(u, v, [1, 3, 5, 7]);
            kb.b.ins().fadd(even, odd)
        };
        // [a0+a1, a2+a3, b0+b1, b2+b3] and likewise for c, d; then the halves of each added.
        let ab = pairs(self, a, b);
        let cd = pairs(self, c, d);
        pairs(self, ab, cd)
    }

    /// The 4x4 transpose of four vectors' 32-bit lanes: lane `i` of result `j` is lane `j` of vector `i`.
    pub fn transpose32(&mut self, [a, b, c, d]: [Value; 4]) -> [Value; 4] {
        let ab_lo = self.shuffle32(a, b, [0, 4, 1, 5]);
        let cd_lo = self.shuffle32(c, d, [0, 4, 1, 5]);
        let ab_hi = self.shuffle32(a, b, [2, 6, 3, 7]);
        let cd_hi = self.shuffle32(c, d, [2, 6, 3, 7]);
        [
            self.shuffle32(ab_lo, cd_lo, [0, 1, 4, 5]),
            self.shuffle32(ab_lo, cd_lo, [2, 3, 6, 7]),
            self.shuffle32(ab_hi, cd_hi, [0, 1, 4, 5]),
            self.shuffle32(ab_hi, cd_hi, [2, 3, 6, 7]),
        ]
    }

    /// 32-bit lanes of `u` (0..4) and `v` (4..8) picked into a vector of `u`'s type.
    pub fn shuffle32(&mut self, u: Value, v: Value, lanes: [u8; 4]) -> Value {
        let mut bytes = [0u8; 16];
        for (i, &lane) in lanes.iter().enumerate() {
            for j in 0..4 {
                bytes[4 * i + j] = 4 * lane + j as u8;
            }
        }
        let mask = self
            .b
            .func
            .dfg
            .immediates
            .push(ConstantData::from(bytes.to_vec()));
        let ty = self.b.func.dfg.value_type(u);
        let (u, v) = (self.as_bytes(u), self.as_bytes(v));
        let picked = self.b.ins().shuffle(u, v, mask);
        match ty {
            I8X16 => picked,
            _ => self.bitcast(ty, picked),
        }
    }

    /// The four lanes of an `i32x4` added.
    pub fn hsum_i32(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().iadd(l[0], l[1]);
        let c = self.b.ins().iadd(l[2], l[3]);
        self.b.ins().iadd(a, c)
    }

    /// The largest lane of an `f32x4`.
    pub fn hmax_f32(&mut self, v: Value) -> Value {
        let l: Vec<Value> = (0..4).map(|i| self.b.ins().extractlane(v, i)).collect();
        let a = self.b.ins().fmax(l[0], l[1]);
        let c = self.b.ins().fmax(l[2], l[3]);
        self.b.ins().fmax(a, c)
    }

    pub fn bitcast(&mut self, ty: Type, v: Value) -> Value {
        self.b.ins().bitcast(ty, lanes(), v)
    }

    /// `v` as an i8x16 (itself if it is one).
    pub fn as_bytes(&mut self, v: Value) -> Value {
        match self.b.func.dfg.value_type(v) {
            I8X16 => v,
            _ => self.bitcast(I8X16, v),
        }
    }

    /// `cond ? a : b` for f32 scalars, where `cond` compares `x` with zero.
    pub fn select_if_zero(&mut self, x: Value, zero_case: Value, other: Value) -> Value {
        let zero = self.f32(0.0);
        let is_zero = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        self.b.ins().select(is_zero, zero_case, other)
    }

    /// An i16 stored from an i32 value.
    pub fn store_i16(&mut self, v: Value, ptr: Value, offset: usize) {
        let narrow = self.b.ins().ireduce(I16, v);
        self.store(narrow, ptr, offset);
    }
}
