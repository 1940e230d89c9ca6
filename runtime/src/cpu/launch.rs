//! One launch of the schedule, prepared at load (weights bound, functions looked up, shapes resolved) and run
//! per step.

use super::code::{KernelFn, NativeCode};
use super::kv::{PagedKv, SeqKv};
use super::ops::{self, AttentionShape, RopeTable, RopeTables};
use super::pool::{split, Claims, Pool};
use crate::engine::ExecError;
use crate::plan::PlanFile;
use crate::reference::kernels as reference;
use kiln_ir::cpu_abi::{
    attention_function, embed_function, node_weights, op_matmuls, rms_norm_function, rope_function,
    ActFormat, AttentionArgs, CpuFunction, EmbedArgs, Epilogue, MatMulArgs, QuantizeArgs,
    RmsNormArgs, RopeArgs,
};
use kiln_ir::schedule::{Launch, Slot};
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::{Dim, NodeId, Op, Operand, RopeStyle};
use std::ops::Range;

/// The arena as one step sees it: `t` tokens laid out, of which this launch covers rows `first..first + rows`.
pub struct Ctx<'s> {
    arena: *mut u8,
    t: usize,
    first: usize,
    pub rows: usize,
    /// A slot held outside the arena, in a buffer of this launch's rows alone (the logits).
    apart: Option<(&'s Slot, *mut u8)>,
}

impl<'s> Ctx<'s> {
    pub fn new(arena: *mut u8, t: usize, first: usize, rows: usize) -> Self {
        Ctx {
            arena,
            t,
            first,
            rows,
            apart: None,
        }
    }

    /// This context with `slot` read and written at `buffer` (which holds `rows` of it) instead of the arena.
    pub fn with_apart(self, slot: &'s Slot, buffer: *mut u8) -> Self {
        Ctx {
            apart: Some((slot, buffer)),
            ..self
        }
    }

    fn region(&self, slot: &Slot) -> (*mut u8, usize) {
        match (slot, self.apart) {
            (
                Slot::Arena {
                    bytes_per_token, ..
                },
                Some((apart, buffer)),
            ) if apart == slot => (buffer, self.rows * bytes_per_token),
            (
                Slot::Arena {
                    offset_per_token,
                    bytes_per_token,
                },
                _,
            ) => {
                let at = self.t * offset_per_token + self.first * bytes_per_token;
                // SAFETY: the memory plan keeps every slot but the one apart inside `t * arena_bytes_per_token`
                // (less that slot's bytes when it ends the arena).
                (unsafe { self.arena.add(at) }, self.rows * bytes_per_token)
            }
            (Slot::Weight(name), _) => unreachable!("weight `{name}` read as an activation"),
        }
    }

    /// A slot's values (f32 or i32: both 4 bytes, and every slot is 4-byte aligned).
    fn slice<T: Arena4>(&self, slot: &Slot) -> &[T] {
        let (p, len) = self.region(slot);
        // SAFETY: slots are 4-byte aligned regions of the arena; values live together never overlap (the
        // schedule verifier checks it), so a launch's inputs and output are disjoint.
        unsafe { std::slice::from_raw_parts(p as *const T, len / 4) }
    }

    #[allow(clippy::mut_from_ref)]
    fn slice_mut<T: Arena4>(&self, slot: &Slot) -> &mut [T] {
        let (p, len) = self.region(slot);
        // SAFETY: as for `slice`; the output slot is written by this launch alone.
        unsafe { std::slice::from_raw_parts_mut(p as *mut T, len / 4) }
    }

    pub fn f32s(&self, slot: &Slot) -> &[f32] {
        self.slice(slot)
    }

    #[allow(clippy::mut_from_ref)]
    pub fn f32s_mut(&self, slot: &Slot) -> &mut [f32] {
        self.slice_mut(slot)
    }

    pub fn i32s(&self, slot: &Slot) -> &[i32] {
        self.slice(slot)
    }

    #[allow(clippy::mut_from_ref)]
    pub fn i32s_mut(&self, slot: &Slot) -> &mut [i32] {
        self.slice_mut(slot)
    }
}

/// The 4-byte plain types the arena holds.
trait Arena4: Copy {}
impl Arena4 for f32 {}
impl Arena4 for i32 {}

/// Buffers reused across launches.
#[derive(Default)]
pub struct Scratch {
    /// Quantized activations of the current launch, per activation format.
    quantized: Vec<(ActFormat, Vec<u8>)>,
    temp: Vec<f32>,
    rope: RopeTables,
}

/// One matmul of a launch.
struct Call<'p> {
    epilogue: Epilogue,
    act: ActFormat,
    w: WeightView<'p>,
    /// Generated functions, when the plan has both.
    kernels: Option<(KernelFn, KernelFn)>,
    interleave: usize,
}

pub struct Step<'p> {
    /// The schedule kernel this launch runs.
    kernel: usize,
    op: Op,
    operands: Vec<Slot>,
    output: Slot,
    weights: Vec<Option<WeightView<'p>>>,
    /// One-dimensional float weights (norm gains, biases) as f32, by operand.
    floats: Vec<Option<Vec<f32>>>,
    /// The result's dims after `tokens`.
    dims: Vec<usize>,
    /// Each value operand's dims after `tokens` (empty for weights).
    operand_dims: Vec<Vec<usize>>,
    norm: bool,
    calls: Vec<Call<'p>>,
    /// The generated attention function, for attention ops, and the query heads one call attends (else the Rust
    /// `ops::attend` runs).
    attend: Option<(KernelFn, usize)>,
    /// The generated RoPE function, for ops that rotate heads (else `RopeTable::apply` runs).
    rotate: Option<KernelFn>,
    /// The generated stand-alone RMSNorm, for norms, post-norms and QK-norms (else the Rust norm runs).
    normalize: Option<KernelFn>,
    /// The generated embedding lookup, for `embed` (else the table's rows are dequantized in Rust).
    look_up: Option<KernelFn>,
}

/// Threads do not share `Step`s mutably; the raw pointers inside argument blocks are plain data.
struct Shared<T>(T);
// SAFETY: see above; each use documents why the threads touch disjoint memory.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// Through a method, so closures capture the whole wrapper rather than its (non-`Sync`) field.
    fn get(&self) -> &T {
        &self.0
    }
}

impl<'p> Step<'p> {
    pub fn prepare(
        plan: &'p PlanFile,
        launch: &Launch,
        code: &NativeCode,
    ) -> Result<Self, ExecError> {
        let graph = &plan.graph;
        let node = graph.node(NodeId::new(launch.node));
        let weights: Vec<Option<WeightView<'p>>> = launch
            .operands
            .iter()
            .map(|slot| match slot {
                Slot::Weight(name) => plan
                    .weight(name)
                    .map(Some)
                    .ok_or_else(|| ExecError::MissingWeight(name.clone())),
                Slot::Arena { .. } => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let floats = weights
            .iter()
            .map(|w| {
                w.as_ref()
                    .filter(|w| w.shape.len() == 1)
                    .map(reference::weight_f32)
            })
            .collect();
        let fixed = |dims: &[Dim]| {
            dims.iter()
                .skip(1)
                .filter_map(|d| d.clone().fixed())
                .collect()
        };
        let operand_dims = node
            .operands
            .iter()
            .map(|operand| match operand {
                Operand::Value(v) => fixed(&graph.node(*v).ty.shape),
                Operand::Weight(_) => Vec::new(),
            })
            .collect();
        let matmul_weights = node_weights(graph, node, |name| {
            plan.weight(name).map(|w| w.layout).unwrap_or_default()
        });
        let mut calls = Vec::new();
        let mut norm = false;
        if let Some(plan_calls) = op_matmuls(&node.op, &matmul_weights) {
            norm = plan_calls.norm;
            for (operand, epilogue) in plan_calls.calls {
                let (Some(mw), Some(w)) = (matmul_weights[operand], weights[operand]) else {
                    continue;
                };
                let quantize = code.get(&CpuFunction::quantize_for(mw, norm));
                let matmul = code.get(&CpuFunction::matmul_for(mw, epilogue));
                calls.push(Call {
                    epilogue,
                    act: ActFormat::for_weight(mw.format),
                    w,
                    kernels: quantize.zip(matmul),
                    interleave: mw.layout.interleave,
                });
            }
        }
        Ok(Step {
            kernel: launch.kernel,
            op: node.op.clone(),
            operands: launch.operands.clone(),
            output: launch.output.clone(),
            weights,
            floats,
            dims: fixed(&node.ty.shape),
            operand_dims,
            norm,
            calls,
            attend: attention_function(graph, node).and_then(|f| grouped_attention(code, f)),
            rotate: rope_function(graph, node).and_then(|f| code.get(&f)),
            normalize: rms_norm_function(node).and_then(|f| code.get(&f)),
            look_up: embed_function(&node.op, &matmul_weights).and_then(|f| code.get(&f)),
        })
    }

    /// An attention op's query, key and value rows (separate, or one fused QKV operand), its shape and its layer.
    fn attention_operands<'a>(&self, ctx: &'a Ctx) -> (Rows<'a>, AttentionShape, usize) {
        match self.op {
            Op::Attention {
                layer,
                scale,
                window,
            } => {
                let shape = AttentionShape {
                    heads: self.dims[0],
                    kv_heads: self.operand_dims[1][0],
                    head_dim: self.dims[1],
                    scale,
                    window,
                };
                let (qw, kvw) = (
                    shape.heads * shape.head_dim,
                    shape.kv_heads * shape.head_dim,
                );
                let rows = Rows {
                    q: ctx.f32s(&self.operands[0]),
                    k: ctx.f32s(&self.operands[1]),
                    v: ctx.f32s(&self.operands[2]),
                    q_stride: qw,
                    kv_stride: kvw,
                    q_at: 0,
                    k_at: 0,
                    v_at: 0,
                };
                (rows, shape, layer)
            }
            Op::AttentionQkv {
                layer,
                scale,
                window,
                heads,
                kv_heads,
            } => {
                let head_dim = self.operand_dims[0][1];
                let shape = AttentionShape {
                    heads,
                    kv_heads,
                    head_dim,
                    scale,
                    window,
                };
                let qkv = ctx.f32s(&self.operands[0]);
                let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
                let stride = qw + 2 * kvw;
                let rows = Rows {
                    q: qkv,
                    k: qkv,
                    v: qkv,
                    q_stride: stride,
                    kv_stride: stride,
                    q_at: 0,
                    k_at: qw,
                    v_at: qw + kvw,
                };
                (rows, shape, layer)
            }
            _ => unreachable!("not an attention op"),
        }
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    pub fn is_fallback(&self) -> bool {
        self.calls.iter().any(|c| c.kernels.is_none())
    }

    /// An f32 operand: a float weight or an activation.
    fn f32_operand<'a>(&'a self, ctx: &'a Ctx, i: usize) -> &'a [f32] {
        match &self.floats[i] {
            Some(values) => values,
            None => ctx.f32s(&self.operands[i]),
        }
    }

    /// Runs the launch on the step's tokens: token `t` is at `positions[t]` of the sequence in cache slot
    /// `slots[t]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ctx: &Ctx,
        positions: &[i32],
        slots: &[usize],
        pool: &Pool,
        kv: &mut PagedKv,
        scratch: &mut Scratch,
    ) -> Result<(), ExecError> {
        let out = ctx.f32s_mut(&self.output);
        match &self.op {
            Op::Input { .. } => unreachable!("inputs have no launch"),
            Op::Embed => {
                let table = self.weights[0].as_ref().expect("embed reads a weight");
                let d = table.row_elems();
                // The step's rows of the id slot (which is sized for the longest step).
                let ids = &ctx.i32s(&self.operands[1])[..out.len() / d];
                if let Some(&id) = ids
                    .iter()
                    .find(|&&id| id < 0 || id as usize >= table.shape[0])
                {
                    return Err(ExecError::BadToken {
                        id: id as u32,
                        vocab: table.shape[0],
                    });
                }
                match self.look_up {
                    Some(f) => {
                        let args = EmbedArgs {
                            table: table.data.as_ptr(),
                            ids: ids.as_ptr(),
                            tokens: ids.len() as u64,
                            out: out.as_mut_ptr(),
                            out_stride: d as u64,
                        };
                        // SAFETY: `f` takes `EmbedArgs`; every id is a row of the table (checked above), and
                        // `out` holds a row per id (`ids` is cut to its rows).
                        unsafe { f(&args as *const EmbedArgs as *const u8) };
                    }
                    None => {
                        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                            table.dequantize_row(id as usize, row);
                        }
                    }
                }
            }
            Op::RmsNorm { eps } => {
                out.copy_from_slice(self.f32_operand(ctx, 0));
                let gain = self.f32_operand(ctx, 1);
                let n = gain.len();
                let rows = out.len() / n;
                self.rms_norm(Groups::in_place(out, (n, rows), (1, n)), gain, *eps, None);
            }
            Op::Add | Op::Mul => {
                let (a, b) = (self.f32_operand(ctx, 0), self.f32_operand(ctx, 1));
                let add = matches!(self.op, Op::Add);
                for (o_row, a_row) in out.chunks_exact_mut(b.len()).zip(a.chunks_exact(b.len())) {
                    for ((o, &x), &y) in o_row.iter_mut().zip(a_row).zip(b) {
                        *o = if add { x + y } else { x * y };
                    }
                }
            }
            Op::Scale { factor } => {
                for (o, &x) in out.iter_mut().zip(self.f32_operand(ctx, 0)) {
                    *o = x * factor;
                }
            }
            Op::Activation(act) => {
                let f = reference::activation(*act);
                for (o, &x) in out.iter_mut().zip(self.f32_operand(ctx, 0)) {
                    *o = f(x);
                }
            }
            Op::Reshape => out.copy_from_slice(self.f32_operand(ctx, 0)),
            Op::Rope(rope) => {
                out.copy_from_slice(self.f32_operand(ctx, 0));
                let (heads, head_dim) = (self.dims[0], self.dims[1]);
                let table = scratch.rope.get(rope, positions);
                self.rope_heads(
                    out,
                    (heads * head_dim, heads, head_dim),
                    rope.style,
                    (table, 0),
                );
            }
            Op::Attention { .. } | Op::AttentionQkv { .. } => {
                let (rows, shape, layer) = self.attention_operands(ctx);
                attention(
                    &rows,
                    positions,
                    slots,
                    kv,
                    layer,
                    &shape,
                    self.attend,
                    pool,
                    out,
                )?;
            }
            Op::NormMatMul { .. }
            | Op::MatMul
            | Op::QkvRope { .. }
            | Op::GatedFfn { .. }
            | Op::MatMulResidual { .. } => self.run_matmuls(ctx, positions, pool, scratch, out),
        }
        Ok(())
    }
}

/// Where one launch's matmul writes: `out[t * stride + col + r]`, with the epilogue's extra operand.
struct Target {
    out: *mut f32,
    stride: usize,
    extra: *const f32,
    extra_stride: usize,
}

impl<'p> Step<'p> {
    fn eps(&self) -> f32 {
        match self.op {
            Op::NormMatMul { eps } | Op::QkvRope { eps, .. } | Op::GatedFfn { eps, .. } => eps,
            _ => 0.0,
        }
    }

    /// The matmul family: quantize the input once per activation format, run each call on the pool, then the
    /// op's own finishing work (RoPE, QK-norm, post-norm, an unfused gate).
    fn run_matmuls(
        &self,
        ctx: &Ctx,
        positions: &[i32],
        pool: &Pool,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let x = self.f32_operand(ctx, 0);
        let rows = ctx.rows;
        let k = x.len() / rows;
        let gain = if self.norm {
            Some(self.f32_operand(ctx, 1))
        } else {
            None
        };
        scratch
            .quantized
            .iter_mut()
            .for_each(|(_, buf)| buf.clear());
        let n_out = out.len() / rows;
        let mut temp = std::mem::take(&mut scratch.temp);
        for (ci, call) in self.calls.iter().enumerate() {
            let n = call.w.shape[0];
            let target = self.target(ci, ctx, out, n_out, n, &mut temp);
            let w2 = match call.epilogue {
                Epilogue::Gated(_) => self.weights[3],
                _ => None,
            };
            match call.kernels {
                Some((quantize, matmul)) => {
                    let xq = quantized(
                        scratch,
                        call.act,
                        quantize,
                        x,
                        gain,
                        self.eps(),
                        rows,
                        k,
                        pool,
                    );
                    let args = MatMulArgs {
                        w: call.w.data.as_ptr(),
                        w2: w2.map_or(std::ptr::null(), |w| w.data.as_ptr()),
                        x: xq.as_ptr(),
                        x_stride: call.act.row_bytes(k) as u64,
                        out: target.out,
                        out_stride: target.stride as u64,
                        extra: target.extra,
                        extra_stride: target.extra_stride as u64,
                        row_begin: 0,
                        row_end: 0,
                        tokens: rows as u64,
                        w_scale: call.w.tensor_scale_ptr(),
                        w2_scale: w2.map_or(std::ptr::null(), |w| w.tensor_scale_ptr()),
                    };
                    let args = Shared(args);
                    let interleave = call.interleave;
                    let per_thread = if rows > 1 { PIECES_PER_THREAD } else { 1 };
                    pool.run_pieces(n, interleave, per_thread, &|begin, end| {
                        if begin < end {
                            let mut a = *args.get();
                            a.row_begin = begin as u64;
                            a.row_end = end as u64;
                            // SAFETY: `a` points at live buffers sized for `rows` tokens and `n` rows; pieces
                            // write disjoint rows.
                            unsafe { matmul(&a as *const MatMulArgs as *const u8) };
                        }
                    });
                }
                None => reference_call(call, w2, x, gain, self.eps(), rows, k, &target),
            }
        }
        self.finish(ctx, positions, out, &temp, &mut scratch.rope, pool);
        scratch.temp = temp;
    }

    /// Where call `ci` writes.
    #[allow(clippy::too_many_arguments)]
    fn target(
        &self,
        ci: usize,
        ctx: &Ctx,
        out: &mut [f32],
        n_out: usize,
        n: usize,
        temp: &mut Vec<f32>,
    ) -> Target {
        let out = out.as_mut_ptr();
        let to_out = |col: usize, extra: *const f32, extra_stride: usize| Target {
            // SAFETY: `col + n <= n_out`, so every row stays inside `out`.
            out: unsafe { out.add(col) },
            stride: n_out,
            extra,
            extra_stride,
        };
        let to_temp = |temp: &mut Vec<f32>| {
            temp.resize(ctx.rows * n, 0.0);
            Target {
                out: temp.as_mut_ptr(),
                stride: n,
                extra: std::ptr::null(),
                extra_stride: 0,
            }
        };
        match &self.op {
            Op::QkvRope {
                heads,
                kv_heads,
                head_dim,
                bias,
                ..
            } => {
                let col = [0, heads * head_dim, (heads + kv_heads) * head_dim][ci];
                let bias = if *bias {
                    self.floats[6 + ci]
                        .as_ref()
                        .map_or(std::ptr::null(), |b| b.as_ptr())
                } else {
                    std::ptr::null()
                };
                to_out(col, bias, 0)
            }
            Op::GatedFfn { .. } if ci == 1 => to_temp(temp),
            Op::MatMulResidual { post_norm: Some(_) } => to_temp(temp),
            Op::MatMulResidual { post_norm: None } => {
                let residual = self.f32_operand(ctx, 2);
                to_out(0, residual.as_ptr(), n_out)
            }
            _ => to_out(0, std::ptr::null(), 0),
        }
    }

    /// Rotates the first `heads` heads (`head_dim` values each) of each row (`row` values apart) of `x`, whose
    /// rows are the table's positions from `first` on, with the generated function when the plan has one.
    fn rope_heads(
        &self,
        x: &mut [f32],
        (row, heads, head_dim): (usize, usize, usize),
        style: RopeStyle,
        (table, first): (&RopeTable, usize),
    ) {
        let tokens = x.len() / row;
        match self.rotate {
            Some(f) => {
                let args = RopeArgs {
                    x: x.as_mut_ptr(),
                    x_stride: row as u64,
                    tokens: tokens as u64,
                    heads: heads as u64,
                    cos: table.cos(first).as_ptr(),
                    sin: table.sin(first).as_ptr(),
                };
                assert!(
                    first + tokens <= table.positions(),
                    "a row of angles per token"
                );
                // SAFETY: `f` takes `RopeArgs`; `x` holds `tokens` rows of `row` values, the first `heads` heads
                // of each within it, and the table holds a row of angles per token (checked above).
                unsafe { f(&args as *const RopeArgs as *const u8) };
            }
            None => {
                for (t, token) in x.chunks_exact_mut(row).enumerate() {
                    table.apply(&mut token[..heads * head_dim], head_dim, first + t, style);
                }
            }
        }
    }

    /// `out = x * rms_scale(x) * gain` per group of `groups`, plus `residual` (rows of `groups.stride`) when
    /// given, with the generated function when the plan has one.
    fn rms_norm(&self, groups: Groups, gain: &[f32], eps: f32, residual: Option<&[f32]>) {
        let Groups {
            x,
            out,
            stride,
            rows,
            groups,
            n,
        } = groups;
        match self.normalize {
            Some(f) => {
                let args = RmsNormArgs {
                    x,
                    x_stride: stride as u64,
                    out,
                    out_stride: stride as u64,
                    residual: residual.map_or(std::ptr::null(), |r| r.as_ptr()),
                    residual_stride: stride as u64,
                    rows: rows as u64,
                    groups: groups as u64,
                    gain: gain.as_ptr(),
                    eps,
                };
                // SAFETY: `f` takes `RmsNormArgs`; `Groups` describes memory its constructor checked, and the
                // residual, when the kernel reads one, has the rows of `out`.
                unsafe { f(&args as *const RmsNormArgs as *const u8) };
            }
            None => {
                for t in 0..rows {
                    for g in 0..groups {
                        let at = t * stride + g * n;
                        // SAFETY: as above. `x` and `out` may be the same memory, so the group is borrowed only
                        // for its scale, then read and written value by value through the pointers.
                        let scale = reference::rms_scale(
                            unsafe { std::slice::from_raw_parts(x.add(at), n) },
                            eps,
                        );
                        for (i, &g) in gain.iter().enumerate() {
                            let y = unsafe { *x.add(at + i) } * scale * g;
                            let y = residual.map_or(y, |r| r[at + i] + y);
                            unsafe { *out.add(at + i) = y };
                        }
                    }
                }
            }
        }
    }

    /// Work after the matmuls, on the pool in pieces of tokens: all of it is token by token.
    fn finish(
        &self,
        ctx: &Ctx,
        positions: &[i32],
        out: &mut [f32],
        temp: &[f32],
        rope_tables: &mut RopeTables,
        pool: &Pool,
    ) {
        let table = match &self.op {
            Op::QkvRope { rope, .. } => Some(rope_tables.get(rope, positions)),
            _ => None,
        };
        let rows = ctx.rows;
        let width = out.len() / rows;
        let (out, ctx) = (Shared(out.as_mut_ptr()), Shared(ctx));
        let per_thread = if rows > 1 { PIECES_PER_THREAD } else { 1 };
        pool.run_pieces(rows, 1, per_thread, &|begin, end| {
            // SAFETY: pieces are disjoint ranges of tokens, so of rows of `out`.
            let out = unsafe {
                std::slice::from_raw_parts_mut(out.get().add(begin * width), (end - begin) * width)
            };
            self.finish_tokens(ctx.get(), begin..end, out, temp, table);
        });
    }

    /// `finish` for the tokens `range`, whose rows `out` holds; `temp` holds every token's.
    fn finish_tokens(
        &self,
        ctx: &Ctx,
        range: Range<usize>,
        out: &mut [f32],
        temp: &[f32],
        table: Option<&RopeTable>,
    ) {
        let width = out.len() / range.len();
        let rows_of = |values| rows_in(values, &range, width);
        match &self.op {
            Op::QkvRope {
                heads,
                kv_heads,
                head_dim,
                rope,
                bias,
                qk_norm,
                ..
            } => {
                let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
                let width = qw + 2 * kw;
                if let Some(eps) = qk_norm {
                    let first = if *bias { 9 } else { 6 };
                    let (qn, kn) = (
                        self.f32_operand(ctx, first),
                        self.f32_operand(ctx, first + 1),
                    );
                    for (at, gain, heads) in [(0, qn, *heads), (qw, kn, *kv_heads)] {
                        let heads = Groups::in_place(
                            &mut out[at..],
                            (width, range.len()),
                            (heads, *head_dim),
                        );
                        self.rms_norm(heads, gain, *eps, None);
                    }
                }
                let table = table.expect("qkv_rope's table");
                self.rope_heads(
                    out,
                    (width, heads + kv_heads, *head_dim),
                    rope.style,
                    (table, range.start),
                );
            }
            Op::GatedFfn { act, .. } if self.calls.len() == 2 => {
                let f = reference::activation(*act);
                for (o, &u) in out.iter_mut().zip(rows_of(temp)) {
                    *o = f(*o) * u;
                }
            }
            Op::MatMulResidual {
                post_norm: Some(eps),
            } => {
                let (g, residual) = (self.f32_operand(ctx, 2), self.f32_operand(ctx, 3));
                assert_eq!(
                    residual.len(),
                    ctx.rows * width,
                    "the residual has the output's rows"
                );
                let (temp, residual) = (rows_of(temp), rows_of(residual));
                self.rms_norm(Groups::rows(temp, out, g.len()), g, *eps, Some(residual));
            }
            _ => {}
        }
    }
}

/// `x` quantized to `act`, computed once per launch and format.
#[allow(clippy::too_many_arguments)]
fn quantized<'s>(
    scratch: &'s mut Scratch,
    act: ActFormat,
    quantize: KernelFn,
    x: &[f32],
    gain: Option<&[f32]>,
    eps: f32,
    rows: usize,
    k: usize,
    pool: &Pool,
) -> &'s [u8] {
    let at = match scratch.quantized.iter().position(|(a, _)| *a == act) {
        Some(at) => at,
        None => {
            scratch.quantized.push((act, Vec::new()));
            scratch.quantized.len() - 1
        }
    };
    let buf = &mut scratch.quantized[at].1;
    if buf.is_empty() {
        let row_bytes = act.row_bytes(k);
        buf.resize(rows * row_bytes, 0);
        let args = Shared(QuantizeArgs {
            x: x.as_ptr(),
            x_stride: k as u64,
            gain: gain.map_or(std::ptr::null(), |g| g.as_ptr()),
            out: buf.as_mut_ptr(),
            out_stride: row_bytes as u64,
            rows: rows as u64,
            eps,
        });
        let run = |begin: usize, end: usize| {
            let mut a = *args.get();
            // SAFETY: rows `begin..end` of `x` and of `buf` exist; threads take disjoint rows.
            unsafe {
                a.x = a.x.add(begin * k);
                a.out = a.out.add(begin * row_bytes);
                a.rows = (end - begin) as u64;
                quantize(&a as *const QuantizeArgs as *const u8);
            }
        };
        if rows < 2 * pool.threads() {
            run(0, rows);
        } else {
            pool.run(&|i| {
                let (begin, end) = split(rows, 1, i, pool.threads());
                run(begin, end);
            });
        }
    }
    &scratch.quantized[at].1
}

/// A matmul without generated code: the reference kernel, then the epilogue in Rust.
#[allow(clippy::too_many_arguments)]
fn reference_call(
    call: &Call,
    w2: Option<WeightView>,
    x: &[f32],
    gain: Option<&[f32]>,
    eps: f32,
    rows: usize,
    k: usize,
    target: &Target,
) {
    let h = match gain {
        Some(g) => {
            let mut h = x.to_vec();
            ops::rms_norm_in_place(&mut h, g, eps);
            std::borrow::Cow::Owned(h)
        }
        None => std::borrow::Cow::Borrowed(x),
    };
    let acc = reference::matmul(&h, k, &call.w);
    let acc2 = w2.map(|w| reference::matmul(&h, k, &w));
    let n = call.w.shape[0];
    for t in 0..rows {
        for j in 0..n {
            let v = acc[t * n + j];
            // SAFETY: `target` addresses `rows` rows of at least `n` values (see `Step::target`).
            unsafe {
                let value = match call.epilogue {
                    Epilogue::Store => v,
                    Epilogue::Bias => v + *target.extra.add(j),
                    Epilogue::Residual => *target.extra.add(t * target.extra_stride + j) + v,
                    Epilogue::Gated(act) => {
                        reference::activation(act)(v) * acc2.as_ref().expect("gated")[t * n + j]
                    }
                };
                *target.out.add(t * target.stride + j) = value;
            }
        }
    }
}

/// Where each token's q, k and v heads lie.
struct Rows<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    q_stride: usize,
    kv_stride: usize,
    q_at: usize,
    k_at: usize,
    v_at: usize,
}

/// Pieces per thread of a matmul over several tokens, taken by whichever thread is free: a thread slowed down by
/// another process leaves its last pieces to the others (SmolLM2's and Gemma 3's prefill measured 10-20% faster
/// than with halves, more beside a busy process). A decode step's matmuls are too short for it: they keep one
/// piece per thread, as pieces cost a call and a contended atomic each.
const PIECES_PER_THREAD: usize = 8;

/// The attention function for `function`'s group, or in plans compiled before attention was grouped, the one for
/// a single head; with the query heads one call attends.
fn grouped_attention(code: &NativeCode, function: CpuFunction) -> Option<(KernelFn, usize)> {
    let CpuFunction::Attention { head_dim, group } = function else {
        return None;
    };
    [group, 1].into_iter().find_map(|group| {
        code.get(&CpuFunction::Attention { head_dim, group })
            .map(|f| (f, group))
    })
}

/// Appends the step's keys and values to each token's sequence (slot `slots[t]`) at this `layer`, then attends
/// every token's heads, a call per group of query heads that share a KV head (one head without a generated
/// function), spread over the pool. Tokens of one sequence see each other (causally) through the cache; tokens of
/// different sequences never do.
#[allow(clippy::too_many_arguments)]
fn attention(
    rows: &Rows,
    positions: &[i32],
    slots: &[usize],
    kv: &mut PagedKv,
    layer: usize,
    s: &AttentionShape,
    attend: Option<(KernelFn, usize)>,
    pool: &Pool,
    out: &mut [f32],
) -> Result<(), ExecError> {
    let (hd, kvw) = (s.head_dim, s.kv_heads * s.head_dim);
    for (t, (&pos, &slot)) in positions.iter().zip(slots).enumerate() {
        let k = &rows.k[t * rows.kv_stride + rows.k_at..][..kvw];
        let v = &rows.v[t * rows.kv_stride + rows.v_at..][..kvw];
        kv.write(layer, slot, pos as usize, hd, k, v)?;
    }
    let kv = &*kv;
    let sequences: Vec<SeqKv> = slots.iter().map(|&slot| kv.sequence(layer, slot)).collect();
    let group = s.heads / s.kv_heads;
    let per_call = attend.map_or(1, |(_, heads)| heads);
    let calls = positions.len() * s.heads / per_call;
    let out_ptr = Shared(out.as_mut_ptr());
    // Each thread takes the next call when it finishes one: later tokens attend to more keys, and a thread slowed
    // down by another process takes fewer calls.
    let claims = Claims::new(calls);
    pool.run(&|_| {
        let mut scores = Vec::new();
        for call in &claims {
            // The call's first (token, head) pair, and its heads' queries and outputs, consecutive.
            let pair = call * per_call;
            let (t, h) = (pair / s.heads, pair % s.heads);
            let q = &rows.q[t * rows.q_stride + rows.q_at + h * hd..][..per_call * hd];
            // SAFETY: each call owns the `head_dim` outputs of its pairs.
            let o = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(pair * hd), per_call * hd)
            };
            let (seq, kv_head, pos) = (&sequences[t], h / group, positions[t] as usize);
            match attend {
                Some((f, heads)) => {
                    let first = s.first_attended(pos);
                    scores.resize(heads * (pos + 1 - first), 0.0);
                    let (k, v, pages, page_stride) = seq.raw();
                    let args = AttentionArgs {
                        q: q.as_ptr(),
                        k,
                        v,
                        pages,
                        page_stride: page_stride as u64,
                        kv_offset: seq.head_offset(kv_head) as u64,
                        first: first as u64,
                        last: pos as u64,
                        out: o.as_mut_ptr(),
                        scores: scores.as_mut_ptr(),
                        scale: s.scale,
                    };
                    // SAFETY: `f` takes `AttentionArgs` and attends `heads` query heads of one KV head; the
                    // positions `first..=pos` are cached (written above), `scores` has room for each head's, and
                    // `q` and `o` hold `heads * head_dim` values.
                    unsafe { f(&args as *const AttentionArgs as *const u8) };
                }
                None => ops::attend(q, seq, kv_head, pos, s, &mut scores, o),
            }
        }
    });
    Ok(())
}

/// The rows `range` of `values`, rows of `width` values.
fn rows_in<'v>(values: &'v [f32], range: &Range<usize>, width: usize) -> &'v [f32] {
    &values[range.start * width..range.end * width]
}

/// Groups of `n` values to normalize: group `g` of row `t` at `t * stride + g * n` from `x` (read) and `out`
/// (written; the same memory for an in-place norm).
struct Groups {
    x: *const f32,
    out: *mut f32,
    stride: usize,
    rows: usize,
    groups: usize,
    n: usize,
}

impl Groups {
    /// Groups `0..groups` of `n` values in each of `rows` rows of `stride` values of `x`, normalized in place.
    fn in_place(
        x: &mut [f32],
        (stride, rows): (usize, usize),
        (groups, n): (usize, usize),
    ) -> Self {
        assert!(
            rows == 0 || (rows - 1) * stride + groups * n <= x.len(),
            "the groups lie in `x`"
        );
        let out = x.as_mut_ptr();
        Groups {
            x: out,
            out,
            stride,
            rows,
            groups,
            n,
        }
    }

    /// Whole rows of `n` values: `x`'s normalized into `out`.
    fn rows(x: &[f32], out: &mut [f32], n: usize) -> Self {
        assert_eq!(x.len(), out.len(), "as many values in as out");
        Groups {
            x: x.as_ptr(),
            out: out.as_mut_ptr(),
            stride: n,
            rows: out.len() / n,
            groups: 1,
            n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::plan::CodeEntry;

    /// A plan's code holding `functions`, each a bare `ret` (looked up here, never called).
    fn code_of(functions: &[CpuFunction]) -> NativeCode {
        let entries: Vec<CodeEntry> = functions
            .iter()
            .enumerate()
            .map(|(i, function)| CodeEntry {
                function: function.clone(),
                offset: i,
                len: 1,
                clif: String::new(),
            })
            .collect();
        NativeCode::load(&entries, &vec![0xC3; functions.len()]).unwrap()
    }

    /// A plan compiled before attention was grouped names its function without a group (its JSON index, as
    /// written then); it deserializes as one head, and the executor calls it head by head.
    #[test]
    fn plans_from_before_grouping_attend_head_by_head() {
        let old: CodeEntry = serde_json::from_str(
            r#"{"function": {"Attention": {"head_dim": 64}}, "offset": 0, "len": 1, "clif": ""}"#,
        )
        .unwrap();
        assert_eq!(
            old.function,
            CpuFunction::Attention {
                head_dim: 64,
                group: 1
            }
        );
        let wanted = CpuFunction::Attention {
            head_dim: 64,
            group: 3,
        };
        let heads = |code: &NativeCode| grouped_attention(code, wanted.clone()).map(|(_, h)| h);
        assert_eq!(
            heads(&code_of(std::slice::from_ref(&old.function))),
            Some(1)
        );
        assert_eq!(heads(&code_of(&[old.function, wanted.clone()])), Some(3));
        assert_eq!(heads(&code_of(&[])), None);
    }

    #[test]
    fn attention_matches_the_reference() {
        let (heads, kv_heads, hd, t) = (9, 3, 64, 7);
        let s = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            scale: 0.125,
            window: None,
        };
        let stride = (heads + 2 * kv_heads) * hd;
        let qkv: Vec<f32> = (0..t * stride)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let positions: Vec<i32> = (0..t as i32).collect();
        let rows = Rows {
            q: &qkv,
            k: &qkv,
            v: &qkv,
            q_stride: stride,
            kv_stride: stride,
            q_at: 0,
            k_at: heads * hd,
            v_at: (heads + kv_heads) * hd,
        };
        let mut out = vec![0f32; t * heads * hd];
        attention(
            &rows,
            &positions,
            &vec![0; t],
            &mut PagedKv::new(1, t),
            0,
            &s,
            None,
            &Pool::new(1),
            &mut out,
        )
        .unwrap();
        let (q, k, v) = crate::reference::fused_unpack(&qkv, heads, kv_heads, hd);
        let expected = reference::attention(&q, &k, &v, &positions, &mut Default::default(), &s);
        let diff = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "{diff}");
    }
}
