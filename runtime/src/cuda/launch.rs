//! One launch of the schedule on the GPU: prepared at load (kernels looked up, weight addresses and shapes
//! resolved), turned into kernel launches per step. The op-by-op logic mirrors the CPU executor's `launch.rs`:
//! the same matmul calls (`cpu_abi::op_matmuls`), the same targets and the same finishing work.

use super::device::{Arg, CudaLoadError, Device, Launch};
use cudarc::driver::CudaFunction;
use kiln_ir::cpu_abi::{op_matmuls, ActFormat, Epilogue};
use kiln_ir::cuda_abi::{
    op_kernels, NodeShapes, ATTENTION_THREADS, MATMUL_TOKENS, MATMUL_WARPS, ROW_THREADS,
};
use kiln_ir::schedule::Slot;
use kiln_ir::Op;

/// Where one step's buffers lie on the device, and which rows of the step a launch covers.
pub struct Env {
    pub arena: u64,
    /// Quantized activations of the current launch.
    pub quantized: u64,
    /// Intermediate matmul results (an unfused gate's up projection, a post-norm's input).
    pub temp: u64,
    pub t: usize,
    pub first: usize,
    pub rows: usize,
}

impl Env {
    /// The device address of a slot's rows `first..first + rows`.
    fn slot(&self, slot: &Slot) -> u64 {
        match slot {
            Slot::Arena {
                offset_per_token,
                bytes_per_token,
            } => self.arena + (self.t * offset_per_token + self.first * bytes_per_token) as u64,
            Slot::Weight(name) => unreachable!("weight `{name}` read as an activation"),
        }
    }
}

/// One matmul of a launch.
struct Call {
    epilogue: Epilogue,
    act: ActFormat,
    k: usize,
    n: usize,
    w: u64,
    quantize: CudaFunction,
    matmul: CudaFunction,
}

pub struct Step {
    op: Op,
    operands: Vec<Slot>,
    output: Slot,
    shapes: NodeShapes,
    /// Device address of each weight operand: matmul weights in place, 1-D weights as f32 copies.
    weights: Vec<Option<u64>>,
    /// Each weight operand's row count and element count (for embedding checks and broadcasts).
    weight_elems: Vec<usize>,
    calls: Vec<Call>,
    norm: bool,
    /// The op's kernels after its matmuls, in `op_kernels` order.
    finish: Vec<CudaFunction>,
    /// The layer's KV cache (keys, values), for attention steps.
    pub cache: Option<(u64, u64)>,
}

/// A launch's device addresses: each weight operand's (`None` for values) with its element count, and the
/// layer's KV cache for attention.
pub struct Bound {
    pub weights: Vec<Option<u64>>,
    pub weight_elems: Vec<usize>,
    pub cache: Option<(u64, u64)>,
}

/// What one step's scratch needs per token, in bytes.
#[derive(Default, Clone, Copy)]
pub struct ScratchNeeds {
    pub quantized: usize,
    pub temp: usize,
}

impl Step {
    /// Prepares `launch` of `op`, with its weights and cache already on the device.
    pub fn prepare(
        op: Op,
        launch: &kiln_ir::schedule::Launch,
        shapes: NodeShapes,
        bound: Bound,
        device: &Device,
    ) -> Result<Self, CudaLoadError> {
        let Bound {
            weights,
            weight_elems,
            cache,
        } = bound;
        let kernels = op_kernels(&op, &shapes);
        let mut functions = kernels
            .iter()
            .map(|k| device.kernel(&k.name()).cloned())
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut calls = Vec::new();
        let mut norm = false;
        if let Some(plan) = op_matmuls(&op, &shapes.weights) {
            norm = plan.norm;
            for (operand, epilogue) in plan.calls {
                let (Some(mw), Some(w)) = (shapes.weights[operand], weights[operand]) else {
                    continue;
                };
                let (quantize, matmul) = (
                    functions
                        .next()
                        .expect("op_kernels lists a quantizer per call"),
                    functions
                        .next()
                        .expect("op_kernels lists a matmul per call"),
                );
                calls.push(Call {
                    epilogue,
                    act: ActFormat::for_weight(mw.format),
                    k: mw.k,
                    n: weight_elems[operand] / mw.k,
                    w,
                    quantize,
                    matmul,
                });
            }
        }
        Ok(Step {
            op,
            operands: launch.operands.clone(),
            output: launch.output.clone(),
            shapes,
            weights,
            weight_elems,
            calls,
            norm,
            finish: functions.collect(),
            cache,
        })
    }

    pub fn writes(&self, slot: &Slot) -> bool {
        &self.output == slot
    }

    /// The embedding table's row count, when this is the embedding.
    pub fn embed_rows(&self) -> Option<usize> {
        match self.op {
            Op::Embed => Some(self.weight_elems[0] / self.shapes.weights[0]?.k),
            _ => None,
        }
    }

    /// Scratch bytes per token this step needs.
    pub fn scratch_needs(&self) -> ScratchNeeds {
        let mut acts: Vec<ActFormat> = Vec::new();
        let mut quantized = 0;
        for call in &self.calls {
            if !acts.contains(&call.act) {
                acts.push(call.act);
                quantized += call.act.row_bytes(call.k);
            }
        }
        let temp = match self.op {
            Op::GatedFfn { .. } | Op::MatMulResidual { post_norm: Some(_) } => {
                self.calls.iter().map(|c| 4 * c.n).max().unwrap_or(0)
            }
            _ => 0,
        };
        ScratchNeeds { quantized, temp }
    }

    fn weight(&self, i: usize) -> u64 {
        self.weights[i].unwrap_or(0)
    }

    /// A value operand's address, or a float weight's.
    fn operand(&self, env: &Env, i: usize) -> u64 {
        match self.weights[i] {
            Some(ptr) => ptr,
            None => env.slot(&self.operands[i]),
        }
    }

    fn out_width(&self) -> usize {
        self.shapes.dims.iter().product()
    }

    /// This step's kernel launches for `env`.
    pub fn launches<'s>(&'s self, env: &Env, out: &mut Vec<Launch<'s>>) {
        let o = env.slot(&self.output);
        let rows = env.rows;
        let width = self.out_width();
        let elementwise = |f: &'s CudaFunction, a: u64, b: u64, b_len: usize, factor: f32| {
            elementwise_launch(f, rows * width, [a, b, o], b_len, factor)
        };
        match &self.op {
            Op::Input { .. } => {}
            Op::Embed => out.push(Launch {
                kernel: &self.finish[0],
                grid: (rows as u32, 1),
                block: ROW_THREADS,
                args: vec![
                    Arg::Ptr(self.weight(0)),
                    Arg::Ptr(env.slot(&self.operands[1])),
                    Arg::Ptr(o),
                ],
            }),
            Op::RmsNorm { eps } => {
                let d = *self.shapes.dims.last().unwrap_or(&1);
                out.push(rms_norm(
                    &self.finish[0],
                    (rows, width / d),
                    (self.operand(env, 0), width),
                    self.operand(env, 1),
                    (0, 0),
                    (o, width),
                    *eps,
                ));
            }
            Op::Add | Op::Mul => {
                let b_len = match self.weights[1] {
                    Some(_) => self.weight_elems[1],
                    None => rows * self.shapes.operand_dims[1].iter().product::<usize>(),
                };
                let (a, b) = (self.operand(env, 0), self.operand(env, 1));
                out.push(elementwise(&self.finish[0], a, b, b_len, 0.0));
            }
            Op::Scale { factor } => out.push(elementwise(
                &self.finish[0],
                self.operand(env, 0),
                0,
                1,
                *factor,
            )),
            Op::Activation(_) | Op::Reshape => out.push(elementwise(
                &self.finish[0],
                self.operand(env, 0),
                0,
                1,
                0.0,
            )),
            Op::Rope(rope) => {
                out.push(elementwise(
                    &self.finish[0],
                    self.operand(env, 0),
                    0,
                    1,
                    0.0,
                ));
                let heads = self.shapes.dims[0];
                out.push(rope_launch(
                    &self.finish[1],
                    rows,
                    heads,
                    (o, width),
                    env.slot(&self.operands[1]),
                    rope,
                ));
            }
            Op::Attention { scale, window, .. } => {
                let (heads, hd) = (self.shapes.dims[0], self.shapes.dims[1]);
                let kv_heads = self.shapes.operand_dims[1][0];
                let (q, k, v) = (
                    env.slot(&self.operands[0]),
                    env.slot(&self.operands[1]),
                    env.slot(&self.operands[2]),
                );
                let positions = env.slot(&self.operands[3]);
                self.attention(
                    out,
                    env,
                    [q, k, v],
                    [heads * hd, kv_heads * hd],
                    positions,
                    (heads, kv_heads),
                    (*scale, *window),
                    o,
                );
            }
            Op::AttentionQkv {
                scale,
                window,
                heads,
                kv_heads,
                ..
            } => {
                let hd = self.shapes.operand_dims[0][1];
                let (qw, kvw) = (heads * hd, kv_heads * hd);
                let qkv = env.slot(&self.operands[0]);
                let stride = qw + 2 * kvw;
                self.attention(
                    out,
                    env,
                    [qkv, qkv + 4 * qw as u64, qkv + 4 * (qw + kvw) as u64],
                    [stride, stride],
                    env.slot(&self.operands[1]),
                    (*heads, *kv_heads),
                    (*scale, *window),
                    o,
                );
            }
            Op::MatMul
            | Op::NormMatMul { .. }
            | Op::QkvRope { .. }
            | Op::GatedFfn { .. }
            | Op::MatMulResidual { .. } => self.matmuls(env, o, out),
        }
    }

    /// Appends the step's keys and values to the layer's cache, then attends.
    #[allow(clippy::too_many_arguments)]
    fn attention<'s>(
        &'s self,
        out: &mut Vec<Launch<'s>>,
        env: &Env,
        qkv: [u64; 3],
        strides: [usize; 2],
        positions: u64,
        heads: (usize, usize),
        scale_window: (f32, Option<usize>),
        o: u64,
    ) {
        let cache = self
            .cache
            .expect("the executor binds a cache to every attention step");
        attention_launches(
            (&self.finish[0], &self.finish[1]),
            env.rows,
            qkv,
            strides,
            positions,
            heads,
            scale_window,
            cache,
            o,
            out,
        );
    }

    /// The matmul family: quantize the input once per activation format, run each call, then the op's finishing
    /// work (RoPE, QK-norm, post-norm, an unfused gate).
    fn matmuls<'s>(&'s self, env: &Env, o: u64, out: &mut Vec<Launch<'s>>) {
        let rows = env.rows;
        let x = env.slot(&self.operands[0]);
        let gain = if self.norm { self.operand(env, 1) } else { 0 };
        let eps = match self.op {
            Op::NormMatMul { eps } | Op::QkvRope { eps, .. } | Op::GatedFfn { eps, .. } => eps,
            _ => 0.0,
        };
        let n_out = self.out_width();
        let mut quantized: Vec<(ActFormat, u64)> = Vec::new();
        let mut next = env.quantized;
        for (ci, call) in self.calls.iter().enumerate() {
            let xq = match quantized.iter().find(|(a, _)| *a == call.act) {
                Some((_, p)) => *p,
                None => {
                    let p = next;
                    next += (rows * call.act.row_bytes(call.k)) as u64;
                    quantized.push((call.act, p));
                    out.push(Launch {
                        kernel: &call.quantize,
                        grid: (rows as u32, 1),
                        block: ROW_THREADS,
                        args: vec![Arg::Ptr(x), Arg::Ptr(gain), Arg::Ptr(p), Arg::F32(eps)],
                    });
                    p
                }
            };
            let (dst, stride, extra, extra_stride) = self.target(env, ci, o, n_out, call.n);
            let w2 = match call.epilogue {
                Epilogue::Gated(_) => self.weight(3),
                _ => 0,
            };
            out.push(Launch {
                kernel: &call.matmul,
                grid: (
                    call.n.div_ceil(MATMUL_WARPS as usize) as u32,
                    rows.div_ceil(MATMUL_TOKENS as usize) as u32,
                ),
                block: MATMUL_WARPS * 32,
                args: vec![
                    Arg::Ptr(call.w),
                    Arg::Ptr(w2),
                    Arg::Ptr(xq),
                    Arg::Ptr(dst),
                    Arg::U64(stride as u64),
                    Arg::Ptr(extra),
                    Arg::U64(extra_stride as u64),
                    Arg::I32(call.n as i32),
                    Arg::I32(rows as i32),
                ],
            });
        }
        self.finish_matmuls(env, o, n_out, out);
    }

    /// Where call `ci` writes: (address, stride, extra operand, its stride), strides in elements.
    fn target(
        &self,
        env: &Env,
        ci: usize,
        o: u64,
        n_out: usize,
        n: usize,
    ) -> (u64, usize, u64, usize) {
        match &self.op {
            Op::QkvRope {
                heads,
                kv_heads,
                head_dim,
                bias,
                ..
            } => {
                let col = [0, heads * head_dim, (heads + kv_heads) * head_dim][ci];
                let bias = if *bias { self.weight(6 + ci) } else { 0 };
                (o + 4 * col as u64, n_out, bias, 0)
            }
            Op::GatedFfn { .. } if ci == 1 => (env.temp, n, 0, 0),
            Op::MatMulResidual { post_norm: Some(_) } => (env.temp, n, 0, 0),
            Op::MatMulResidual { post_norm: None } => (o, n_out, self.operand(env, 2), n_out),
            _ => (o, n_out, 0, 0),
        }
    }

    fn finish_matmuls<'s>(&'s self, env: &Env, o: u64, n_out: usize, out: &mut Vec<Launch<'s>>) {
        let rows = env.rows;
        let mut finish = self.finish.iter();
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
                if let Some(eps) = qk_norm {
                    let norm = finish.next().expect("op_kernels lists the QK norm");
                    let first = if *bias { 9 } else { 6 };
                    let k_at = o + 4 * (heads * head_dim) as u64;
                    for (at, count, gain) in [
                        (o, *heads, self.weight(first)),
                        (k_at, *kv_heads, self.weight(first + 1)),
                    ] {
                        out.push(rms_norm(
                            norm,
                            (rows, count),
                            (at, n_out),
                            gain,
                            (0, 0),
                            (at, n_out),
                            *eps,
                        ));
                    }
                }
                let rope_kernel = finish.next().expect("op_kernels lists RoPE");
                out.push(rope_launch(
                    rope_kernel,
                    rows,
                    heads + kv_heads,
                    (o, n_out),
                    env.slot(&self.operands[5]),
                    rope,
                ));
            }
            Op::GatedFfn { .. } if self.calls.len() == 2 => {
                let gate = finish.next().expect("op_kernels lists the gate");
                let n = rows * n_out;
                out.push(elementwise_launch(gate, n, [o, env.temp, o], n, 0.0));
            }
            Op::MatMulResidual {
                post_norm: Some(eps),
            } => {
                let norm = finish.next().expect("op_kernels lists the post-norm");
                out.push(rms_norm(
                    norm,
                    (rows, 1),
                    (env.temp, n_out),
                    self.weight(2),
                    (self.operand(env, 3), n_out),
                    (o, n_out),
                    *eps,
                ));
            }
            _ => {}
        }
    }
}

/// An `Elementwise` launch over `n` values: `out = op(a, b)`, `b` repeating every `b_len` values.
fn elementwise_launch(
    kernel: &CudaFunction,
    n: usize,
    [a, b, out]: [u64; 3],
    b_len: usize,
    factor: f32,
) -> Launch<'_> {
    Launch {
        kernel,
        grid: (n.div_ceil(ROW_THREADS as usize) as u32, 1),
        block: ROW_THREADS,
        args: vec![
            Arg::Ptr(a),
            Arg::Ptr(b),
            Arg::Ptr(out),
            Arg::I32(n as i32),
            Arg::I32(b_len as i32),
            Arg::F32(factor),
        ],
    }
}

/// An `RmsNorm` launch over `grid` = (tokens, rows per token); each (address, stride) pair in elements.
fn rms_norm(
    kernel: &CudaFunction,
    grid: (usize, usize),
    (x, x_stride): (u64, usize),
    gain: u64,
    (residual, residual_stride): (u64, usize),
    (out, out_stride): (u64, usize),
    eps: f32,
) -> Launch<'_> {
    Launch {
        kernel,
        grid: (grid.0 as u32, grid.1 as u32),
        block: ROW_THREADS,
        args: vec![
            Arg::Ptr(x),
            Arg::U64(x_stride as u64),
            Arg::Ptr(gain),
            Arg::Ptr(residual),
            Arg::U64(residual_stride as u64),
            Arg::Ptr(out),
            Arg::U64(out_stride as u64),
            Arg::F32(eps),
        ],
    }
}

fn rope_launch<'k>(
    kernel: &'k CudaFunction,
    tokens: usize,
    heads: usize,
    (x, stride): (u64, usize),
    positions: u64,
    rope: &kiln_ir::RopeParams,
) -> Launch<'k> {
    Launch {
        kernel,
        grid: (tokens as u32, heads as u32),
        block: (rope.dims / 2) as u32,
        args: vec![
            Arg::Ptr(x),
            Arg::U64(stride as u64),
            Arg::Ptr(positions),
            Arg::F32(rope.base),
            Arg::F32(rope.freq_scale),
        ],
    }
}

/// The attention launches: the cache append, then one block per (token, head).
#[allow(clippy::too_many_arguments)]
fn attention_launches<'k>(
    kernels: (&'k CudaFunction, &'k CudaFunction),
    tokens: usize,
    [q, k, v]: [u64; 3],
    [q_stride, kv_stride]: [usize; 2],
    positions: u64,
    (heads, kv_heads): (usize, usize),
    (scale, window): (f32, Option<usize>),
    (k_cache, v_cache): (u64, u64),
    o: u64,
    out: &mut Vec<Launch<'k>>,
) {
    out.push(Launch {
        kernel: kernels.0,
        grid: (tokens as u32, 1),
        block: ROW_THREADS,
        args: vec![
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::U64(kv_stride as u64),
            Arg::Ptr(positions),
            Arg::Ptr(k_cache),
            Arg::Ptr(v_cache),
        ],
    });
    out.push(Launch {
        kernel: kernels.1,
        grid: (tokens as u32, heads as u32),
        block: ATTENTION_THREADS,
        args: vec![
            Arg::Ptr(q),
            Arg::U64(q_stride as u64),
            Arg::Ptr(k_cache),
            Arg::Ptr(v_cache),
            Arg::Ptr(positions),
            Arg::Ptr(o),
            Arg::I32(kv_heads as i32),
            Arg::F32(scale),
            Arg::I32(window.map_or(0, |w| w as i32)),
        ],
    });
}
