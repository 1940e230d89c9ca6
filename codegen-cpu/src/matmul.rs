//! Matrix products `out[t, r] = epilogue(dot(W[r], x[t]))`, one group of interleaved rows at a time.
//!
//! One token (a decode step): each weight block is unpacked once and meets the token's activations, which are
//! loaded once per block and shared by every row of the group.
//!
//! Several tokens (a prompt, or a batch of sequences): unpacking a block costs far more than its dot product
//! (Q5_0 spreads its fifth bits with a shuffle, a compare and two masks per half; F16 widens every value), so the
//! group's blocks are first unpacked into a scratch buffer on the stack, then every token's pass reads them back
//! with plain loads. The buffer holds the group's whole rows (at most `SCRATCH_BYTES`, which stays in L1), so each
//! token still finishes its dot products in one pass and the epilogue needs no partial sums. Formats with
//! `Grouped` blocks keep each block of a group of four rows as one entry: Block32 with the rows' scalars gathered
//! into vectors, the k-quants with the rows' codes transposed so that their sub-block sums come out one row per
//! lane (no horizontal adds, and no activation vector held across the four rows, which spilled).
//! (Tiling tokens without the buffer, unpacking each block once per tile of tokens, measured slower on SmolLM2's
//! prefill, 157 vs 206 tok/s at 512 tokens: the tile's accumulators and activations overflow the registers.)

use crate::builder::{Kb, Target};
use crate::formats::{BlockDot, Grouped, RowAcc};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, StackSlotData, StackSlotKind, Type, Value};

use cranelift_frontend::Variable;
use kiln_ir::cpu_abi::offsets::matmul as arg;
use kiln_ir::cpu_abi::Epilogue;
use kiln_ir::layout::Layout;

/// The largest scratch buffer of unpacked weights (both tensors of a gated product): a row group of Qwen2.5's
/// Q5_0 `ffn_down` (K = 4864) takes 29 KiB. Larger groups take the one-token path for every token.
const SCRATCH_BYTES: usize = 32 * 1024;

/// Tokens from which a call unpacks into the scratch buffer: with two, each block is unpacked once instead of
/// twice, for the cost of storing and reloading it.
const SCRATCH_MIN_TOKENS: i64 = 2;

struct Shape<'d> {
    dot: &'d dyn BlockDot,
    /// The format's grouped blocks, when the group is four rows.
    grouped: Option<&'d dyn Grouped>,
    rows: usize,
    blocks: usize,
    /// Bytes of activations per weight block.
    act_bytes: usize,
}

/// The kernel's arguments, loaded once.
struct Args {
    x: Value,
    x_stride: Value,
    out: Value,
    out_stride: Value,
    extra: Value,
    extra_stride: Value,
}

/// One weight tensor of the product (a gated product has two), at the current row group.
#[derive(Clone, Copy)]
struct Tensor {
    /// The group's first block.
    group: Value,
    /// The tensor's whole-tensor scale, for formats that have one.
    scale: Option<Value>,
}

/// Where the token loop finds a weight block's unpacked values.
#[derive(Clone, Copy)]
enum Source<'s> {
    /// Unpacked from the stored weights at each use.
    Stored,
    /// Reloaded from the tensor's region of the scratch buffer.
    Scratch { at: Value, layout: &'s Scratch },
}

pub fn build(
    func: &mut Function,
    target: Target,
    dot: &dyn BlockDot,
    layout: Layout,
    k: usize,
    epilogue: Epilogue,
) {
    let act = dot.act();
    let shape = Shape {
        dot,
        grouped: dot.grouped().filter(|_| layout.interleave == 4),
        rows: layout.interleave,
        blocks: k / dot.elems(),
        act_bytes: dot.elems() / act.block_elems() * act.block_bytes(),
    };
    let tensors = if matches!(epilogue, Epilogue::Gated(_)) {
        2
    } else {
        1
    };
    let scratch = Some(Scratch::new(&shape, tensors)).filter(|s| s.bytes <= SCRATCH_BYTES);
    Kb::build(func, target, |kb| {
        let a = Args {
            x: kb.arg(arg::X, I64),
            x_stride: kb.arg(arg::X_STRIDE, I64),
            out: kb.arg(arg::OUT, I64),
            out_stride: kb.arg(arg::OUT_STRIDE, I64),
            extra: kb.arg(arg::EXTRA, I64),
            extra_stride: kb.arg(arg::EXTRA_STRIDE, I64),
        };
        let weights = [arg::W, arg::W2].map(|at| kb.arg(at, I64));
        let scales =
            [arg::W_SCALE, arg::W2_SCALE].map(|at| dot.tensor_scaled().then(|| kb.arg(at, I64)));
        let row_begin = kb.arg(arg::ROW_BEGIN, I64);
        let row_end = kb.arg(arg::ROW_END, I64);
        let tokens = kb.arg(arg::TOKENS, I64);
        let scratch = scratch.as_ref().map(|s| (s, s.allocate(kb)));
        // Row r's group starts at r * blocks * block_bytes: a group of R rows holds R rows' worth of blocks.
        let row_bytes = shape.blocks * dot.block_bytes();
        kb.for_range(row_begin, row_end, shape.rows as i64, |kb, row| {
            let group: Vec<Tensor> = (0..tensors)
                .map(|i| Tensor {
                    group: kb.offset(weights[i], row, row_bytes),
                    scale: scales[i],
                })
                .collect();
            let each_token = |kb: &mut Kb, sources: &[Source]| {
                token_loop(kb, &shape, &a, epilogue, row, tokens, &group, sources)
            };
            match scratch {
                Some((scratch, buffer)) => {
                    let many = kb.b.ins().icmp_imm_s(
                        IntCC::SignedGreaterThanOrEqual,
                        tokens,
                        SCRATCH_MIN_TOKENS,
                    );
                    kb.if_else(
                        many,
                        |kb| {
                            let sources = scratch.fill(kb, &shape, &group, buffer);
                            each_token(kb, &sources)
                        },
                        |kb| each_token(kb, &vec![Source::Stored; tensors]),
                    );
                }
                None => each_token(kb, &vec![Source::Stored; tensors]),
            }
        });
    });
}

/// The scratch buffer's layout: per tensor, per block, an entry per row of the group (its unpacked values in order)
/// or one entry (the group's block, `Grouped`); an entry's values each at its own offset (vectors first, then
/// scalars, so the vectors sit at multiples of 16), the entry padded to 16 bytes so the vectors stay aligned.
struct Scratch {
    /// Each value's type and offset in an entry.
    fields: Vec<(Type, usize)>,
    /// Bytes of one entry.
    entry: usize,
    /// Entries per block.
    per_block: usize,
    /// Bytes of one tensor's region.
    region: usize,
    bytes: usize,
}

impl Scratch {
    fn new(shape: &Shape, tensors: usize) -> Self {
        let (types, per_block) = match shape.grouped {
            Some(grouped) => (grouped.types(), 1),
            None => (shape.dot.unpacked(), shape.rows),
        };
        let mut order: Vec<usize> = (0..types.len()).collect();
        order.sort_by_key(|&i| !types[i].is_vector());
        let mut fields = vec![(types[0], 0); types.len()];
        let mut at = 0;
        for i in order {
            fields[i] = (types[i], at);
            at += types[i].bytes() as usize;
        }
        let entry = at.next_multiple_of(16);
        let region = entry * per_block * shape.blocks;
        Scratch {
            fields,
            entry,
            per_block,
            region,
            bytes: region * tensors,
        }
    }

    fn allocate(&self, kb: &mut Kb) -> Value {
        let slot = kb.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            self.bytes as u32,
            4,
        ));
        kb.b.ins().stack_addr(I64, slot, 0)
    }

    /// Unpacks the group's blocks of every tensor into `buffer` and says where each tensor's region is.
    fn fill(&self, kb: &mut Kb, shape: &Shape, group: &[Tensor], buffer: Value) -> Vec<Source<'_>> {
        let block_bytes = shape.dot.block_bytes();
        group
            .iter()
            .enumerate()
            .map(|(i, tensor)| {
                let at = kb.b.ins().iadd_imm_s(buffer, (i * self.region) as i64);
                let walks = [
                    (tensor.group, shape.rows * block_bytes),
                    (at, self.per_block * self.entry),
                ];
                kb.for_walk(shape.blocks, &walks, |kb, at| {
                    let (wb, entries) = (at[0], at[1]);
                    let entry_values = match shape.grouped {
                        Some(grouped) => vec![stored_group(kb, shape, grouped, wb)],
                        None => stored_rows(kb, shape, wb),
                    };
                    for (e, values) in entry_values.iter().enumerate() {
                        debug_assert_eq!(
                            values.len(),
                            self.fields.len(),
                            "the scratch types list the values stored"
                        );
                        for (&v, &(_, offset)) in values.iter().zip(&self.fields) {
                            kb.store(v, entries, e * self.entry + offset);
                        }
                    }
                });
                Source::Scratch { at, layout: self }
            })
            .collect()
    }

    /// The unpacked values of the block entry at `entry`.
    fn reload(&self, kb: &mut Kb, entry: Value) -> Vec<Value> {
        self.fields
            .iter()
            .map(|&(ty, at)| kb.load(ty, entry, at))
            .collect()
    }
}

/// Each row's `unpack`ed values of the stored group block at `block`.
fn stored_rows(kb: &mut Kb, shape: &Shape, block: Value) -> Vec<Vec<Value>> {
    let block_bytes = shape.dot.block_bytes();
    (0..shape.rows)
        .map(|lane| {
            let row = kb.b.ins().iadd_imm_s(block, (lane * block_bytes) as i64);
            shape.dot.unpack(kb, row)
        })
        .collect()
}

/// The grouped form of the stored group block at `block`: read as the layout groups it, or grouped from its rows.
fn stored_group(kb: &mut Kb, shape: &Shape, grouped: &dyn Grouped, block: Value) -> Vec<Value> {
    match grouped.load_group(kb, block) {
        Some(values) => values,
        None => {
            let rows = stored_rows(kb, shape, block);
            grouped.group(kb, &rows)
        }
    }
}

/// For each token: the group's dot products of every tensor, the epilogue, the stores. A group of four rows is
/// one f32x4 from the reduction on, so the epilogue (`exp` included) runs once per group, and its loads and
/// stores move four adjacent outputs at once; other group sizes run it per row. A gated product parks the first
/// tensor's products in the output and reads them back for the epilogue: held in registers through the second
/// tensor's pass, they pushed its accumulators onto the stack.
#[allow(clippy::too_many_arguments)]
fn token_loop(
    kb: &mut Kb,
    shape: &Shape,
    a: &Args,
    epilogue: Epilogue,
    row: Value,
    tokens: Value,
    group: &[Tensor],
    sources: &[Source],
) {
    let zero = kb.i64(0);
    kb.for_range(zero, tokens, 1, |kb, t| {
        let xt = kb.b.ins().imul(t, a.x_stride);
        let xt = kb.b.ins().iadd(a.x, xt);
        let out = kb.b.ins().imul(t, a.out_stride);
        let out = kb.b.ins().iadd(out, row);
        let out = kb.offset(a.out, out, 4);
        let mut dots = group_dots(kb, shape, group[0], sources[0], xt);
        let lanes = shape.rows / dots.len();
        let second = group.get(1).map(|&tensor| {
            for (i, &dot) in dots.iter().enumerate() {
                kb.store(dot, out, 4 * lanes * i);
            }
            let second = group_dots(kb, shape, tensor, sources[1], xt);
            dots = (0..dots.len())
                .map(|i| {
                    let ty = kb.b.func.dfg.value_type(second[i]);
                    kb.load_written(ty, out, 4 * lanes * i)
                })
                .collect();
            second
        });
        for (i, &dot) in dots.iter().enumerate() {
            let r = kb.b.ins().iadd_imm_s(row, (lanes * i) as i64);
            store(kb, a, epilogue, r, t, dot, second.as_ref().map(|d| d[i]));
        }
    });
}

/// Applies the epilogue to the products `acc` of rows `r..` (one, or four as an f32x4) and token `t`, and stores
/// them.
fn store(
    kb: &mut Kb,
    a: &Args,
    epilogue: Epilogue,
    r: Value,
    t: Value,
    acc: Value,
    acc2: Option<Value>,
) {
    let ty = kb.b.func.dfg.value_type(acc);
    let value = match epilogue {
        Epilogue::Store => acc,
        Epilogue::Bias => {
            let b = kb.offset(a.extra, r, 4);
            let b = kb.load(ty, b, 0);
            kb.b.ins().fadd(acc, b)
        }
        Epilogue::Residual => {
            let i = kb.b.ins().imul(t, a.extra_stride);
            let i = kb.b.ins().iadd(i, r);
            let p = kb.offset(a.extra, i, 4);
            let residual = kb.load(ty, p, 0);
            kb.b.ins().fadd(residual, acc)
        }
        Epilogue::Gated(act) => {
            let gate = kb.activation(act, acc);
            kb.b.ins()
                .fmul(gate, acc2.expect("a gated epilogue has two dot products"))
        }
    };
    let i = kb.b.ins().imul(t, a.out_stride);
    let i = kb.b.ins().iadd(i, r);
    let p = kb.offset(a.out, i, 4);
    kb.store(value, p, 0);
}

/// A group's running sums: each row's accumulator, and the `row_term`s: one f32 per row, or for four rows one f32x4
/// (lane by lane the same sums, in a quarter of the registers). Accumulators of f32 (`BlockDot::acc_type`) are
/// kept the same way: for four rows, one f32x4.
struct GroupAcc {
    rows: Vec<RowAcc>,
    terms: Vec<Variable>,
    /// The four accumulators hold lane-groups across the rows (`Grouped::across_rows`), not one row each.
    across_rows: bool,
    /// The accumulators hold the rows' sums themselves (f32 per row), with nothing left to reduce.
    row_sums: bool,
}

impl GroupAcc {
    fn new(kb: &mut Kb, rows: usize, acc_type: Type, across_rows: bool) -> Self {
        let zero = kb.f32x4(0.0);
        let row_sums = acc_type == F32;
        let (acc_type, count) = match acc_type {
            F32 if rows == 4 => (F32X4, 1),
            ty => (ty, rows),
        };
        let start = match acc_type {
            F32X4 => zero,
            F32 => kb.f32(0.0),
            _ => kb.i32x4(0),
        };
        let rows: Vec<RowAcc> = (0..count)
            .map(|_| RowAcc {
                v: kb.var(acc_type, start),
            })
            .collect();
        let terms = match rows.len() {
            4 => vec![kb.var(F32X4, zero)],
            n => {
                let zero = kb.f32(0.0);
                (0..n).map(|_| kb.var(F32, zero)).collect()
            }
        };
        GroupAcc {
            rows,
            terms,
            across_rows,
            row_sums,
        }
    }

    /// Adds the block's row terms, `(weight factor per row, activation factor)`.
    fn add_terms(&self, kb: &mut Kb, weights: &[Value], act: Value) {
        let (factors, act) = match self.terms.len() {
            1 if weights.len() == 4 => {
                let v = kb.f32x4_of([weights[0], weights[1], weights[2], weights[3]]);
                (vec![v], kb.b.ins().splat(F32X4, act))
            }
            _ => (weights.to_vec(), act),
        };
        for (&term, factor) in self.terms.iter().zip(factors) {
            let t = kb.b.use_var(term);
            let t = kb.b.ins().fma(factor, act, t);
            kb.b.def_var(term, t);
        }
    }

    /// The rows' sums (for four rows one f32x4, else one f32 per row), plus the row terms where the format has
    /// them.
    fn finish(&self, kb: &mut Kb, with_terms: bool) -> Vec<Value> {
        let sums: Vec<Value> = self.rows.iter().map(|acc| kb.b.use_var(acc.v)).collect();
        let sums = if self.row_sums {
            sums
        } else {
            self.reduce(kb, sums)
        };
        if !with_terms {
            return sums;
        }
        sums.into_iter()
            .zip(&self.terms)
            .map(|(sum, &term)| {
                let t = kb.b.use_var(term);
                kb.b.ins().fadd(sum, t)
            })
            .collect()
    }

    /// The rows' sums from their vector accumulators' values: for four rows one f32x4 (each lane summed in the
    /// order `hsum_f32` sums it), else one f32 per row.
    fn reduce(&self, kb: &mut Kb, accs: Vec<Value>) -> Vec<Value> {
        let sums: Vec<Value> = accs
            .into_iter()
            .map(|v| match kb.b.func.dfg.value_type(v) {
                F32X4 => v,
                _ => kb.b.ins().fcvt_from_sint(F32X4, v),
            })
            .collect();
        match sums[..] {
            // Lane-groups across the rows: the same sums as `hsum4_f32` of the rows' accumulators.
            [a, b, c, d] if self.across_rows => {
                let front = kb.b.ins().fadd(a, b);
                let back = kb.b.ins().fadd(c, d);
                vec![kb.b.ins().fadd(front, back)]
            }
            [a, b, c, d] => vec![kb.hsum4_f32([a, b, c, d])],
            _ => sums.into_iter().map(|v| kb.hsum_f32(v)).collect(),
        }
    }
}

/// The dot products of the group's rows of `tensor` with one token's activations at `xt`, as `finish` returns
/// them.
fn group_dots(kb: &mut Kb, shape: &Shape, tensor: Tensor, source: Source, xt: Value) -> Vec<Value> {
    let grouped = shape
        .grouped
        .filter(|grouped| matches!(source, Source::Scratch { .. }) || grouped.groups_stored_rows());
    let across_rows = grouped.is_some_and(|grouped| grouped.across_rows());
    let accs = GroupAcc::new(kb, shape.rows, shape.dot.acc_type(), across_rows);
    let block_bytes = shape.dot.block_bytes();
    let mut has_terms = false;
    // The first block's first row, the bytes from one row's block to the next, and from one block to the next.
    let (base, stride, per_block) = match source {
        Source::Stored => (tensor.group, block_bytes, shape.rows * block_bytes),
        Source::Scratch { at, layout } => (at, layout.entry, layout.per_block * layout.entry),
    };
    let walks = [(xt, shape.act_bytes), (base, per_block)];
    // Blocks of at most 32 values are short bodies (about 45 instructions for Q5_0's four rows), of which the loop's
    // own instructions were a sixth; a k-quant's 256 values are a body long enough to leave whole.
    let unroll = if shape.dot.elems() <= 32 && shape.blocks.is_multiple_of(2) {
        2
    } else {
        1
    };
    kb.for_walk_unrolled(shape.blocks, unroll, &walks, |kb, at| {
        let (xb, block) = (at[0], at[1]);
        let x = shape.dot.prepare(kb, xb);
        let row = |kb: &mut Kb, lane: usize| {
            let p = kb.b.ins().iadd_imm_s(block, (lane * stride) as i64);
            match source {
                Source::Stored => shape.dot.unpack(kb, p),
                Source::Scratch { layout, .. } => layout.reload(kb, p),
            }
        };
        if let Some(grouped) = grouped {
            let values = match source {
                Source::Scratch { layout, .. } => layout.reload(kb, block),
                Source::Stored => stored_group(kb, shape, grouped, block),
            };
            has_terms |= grouped.accumulate(kb, &values, &x, &accs.rows, accs.terms[0]);
            return;
        }
        let mut terms = Vec::new();
        let mut act_term = None;
        for (lane, &acc) in accs.rows.iter().enumerate() {
            let w = row(kb, lane);
            shape.dot.accumulate(kb, &w, &x, acc);
            if let Some((weight, act)) = shape.dot.row_term(&w, &x) {
                terms.push(weight);
                act_term = Some(act);
            }
        }
        if let Some(act) = act_term {
            accs.add_terms(kb, &terms, act);
            has_terms = true;
        }
    });
    let dots = accs.finish(kb, has_terms);
    match tensor.scale {
        Some(scale) => dots
            .into_iter()
            .map(|dot| shape.dot.scale_row(kb, dot, xt, scale))
            .collect(),
        None => dots,
    }
}
