//! The contract between the CUDA code generator and the CUDA executor: which kernels a plan carries, their names,
//! and the parameters each takes, in order.
//!
//! Every kernel is specialized on its shapes (`k`, `head_dim`, ...) and format, so its name says all of that and
//! two launches with equal kernels share one. Parameters are plain values: device pointers as `u64`, counts as
//! `i32`, strides as `u64` (in elements), factors as `f32`. Each variant's doc lists them; the generator writes
//! exactly that signature and the executor passes exactly those values.

use crate::cpu_abi::{node_weights, op_matmuls, ActFormat, Epilogue, MatMulWeight};
use crate::layout::Layout;
use crate::{Dim, Graph, Node, Operand};
use crate::{Op, QuantFormat, RopeStyle};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Threads per block of the row kernels (quantize, norm, embed, elementwise).
pub const ROW_THREADS: u32 = 256;
/// Warps per block of the matmul: each warp computes one output row.
pub const MATMUL_WARPS: u32 = 8;
/// Tokens a matmul block computes together, so each weight sub-block is decoded once for all of them.
pub const MATMUL_TOKENS: u32 = 8;
/// Threads per block of the attention kernel: one block per (token, head), its threads scoring keys in parallel.
pub const ATTENTION_THREADS: u32 = 256;
/// Keys the attention kernel scores at a time (its shared-memory tile), merged across tiles by an online softmax.
pub const ATTENTION_TILE: usize = 1024;

/// An elementwise kernel's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElementOp {
    /// `out[i] = a[i] + b[i % b_len]`
    Add,
    /// `out[i] = a[i] * b[i % b_len]`
    Mul,
    /// `out[i] = a[i] * factor`
    Scale,
    /// `out[i] = act(a[i])`
    Act(crate::Activation),
    /// `out[i] = a[i]` (a reshape)
    Copy,
    /// `out[i] = act(a[i]) * b[i]` (a gated FFN whose gate and up weights differ in format)
    Gate(crate::Activation),
}

impl ElementOp {
    pub fn name(self) -> &'static str {
        match self {
            ElementOp::Add => "add",
            ElementOp::Mul => "mul",
            ElementOp::Scale => "scale",
            ElementOp::Act(act) => act.name(),
            ElementOp::Copy => "copy",
            ElementOp::Gate(crate::Activation::Silu) => "gate_silu",
            ElementOp::Gate(crate::Activation::Gelu) => "gate_gelu",
            ElementOp::Gate(crate::Activation::ReluSqr) => "gate_relu_sqr",
        }
    }
}

/// One CUDA kernel of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CudaKernel {
    /// Rounds rows of `k` f32 to `act` blocks (RMS-normalized first with `norm`), one block per row, in the same
    /// layout the CPU kernels read (`ActFormat`).
    /// Params: `x: u64, gain: u64, out: u64, eps: f32`. Grid: rows.
    Quantize {
        act: ActFormat,
        k: usize,
        norm: bool,
    },
    /// `out[t * out_stride + r] = epilogue(dot(W[r], x[t]))` for rows `0..n` and tokens `0..tokens`, `x` quantized
    /// to the weight format's activation format. Params: `w: u64, w2: u64, x: u64, out: u64, out_stride: u64,
    /// extra: u64, extra_stride: u64, n: i32, tokens: i32`.
    /// Grid: (n / MATMUL_WARPS, tokens / MATMUL_TOKENS), rounded up; block: MATMUL_WARPS warps.
    MatMul {
        format: QuantFormat,
        layout: Layout,
        k: usize,
        epilogue: Epilogue,
    },
    /// Rows of an embedding table: `out[t] = dequantize(W[ids[t]])`, `d` values per row (ids checked on the host).
    /// Params: `w: u64, ids: u64, out: u64`. Grid: tokens.
    Embed {
        format: QuantFormat,
        layout: Layout,
        d: usize,
    },
    /// RMSNorm of rows of `d` values: row `(t, h)` starts at `x + t * x_stride + h * d` and is written to the same
    /// place under `out`, plus the matching `residual` row when `residual` is not null.
    /// Params: `x: u64, x_stride: u64, gain: u64, residual: u64, residual_stride: u64, out: u64, out_stride: u64,
    /// eps: f32`. Grid: (tokens, rows per token).
    RmsNorm { d: usize },
    /// RoPE in place over the first `heads` heads of each token (`head_dim` values each, `token_stride` apart).
    /// Params: `x: u64, token_stride: u64, positions: u64, base: f32, freq_scale: f32`. Grid: (tokens, heads).
    Rope {
        style: RopeStyle,
        head_dim: usize,
        dims: usize,
    },
    /// Copies each token's keys and values (`width` values each, `src_stride` apart) into the layer's cache at its
    /// position. Params: `k: u64, v: u64, src_stride: u64, positions: u64, k_cache: u64, v_cache: u64`.
    /// Grid: tokens.
    KvAppend { width: usize },
    /// Causal attention of each (token, head) over the cache up to the token's position (and within `window`
    /// when it is positive), `group` query heads per KV head: keys scored in tiles of ATTENTION_TILE with an
    /// online softmax across tiles, ATTENTION_THREADS threads per block. Params: `q: u64, q_stride: u64,
    /// k_cache: u64, v_cache: u64, positions: u64, out: u64, kv_heads: i32, scale: f32, window: i32`.
    /// Grid: (tokens, heads).
    Attention { head_dim: usize, group: usize },
    /// Elementwise. Params: `a: u64, b: u64, out: u64, n: i32, b_len: i32, factor: f32`. Grid: n / ROW_THREADS.
    Elementwise { op: ElementOp },
}

impl CudaKernel {
    /// The kernel's C name: unique per variant and parameters.
    pub fn name(&self) -> String {
        match self {
            CudaKernel::Quantize { act, k, norm } => {
                let norm = if *norm { "rms_norm_" } else { "" };
                format!("{norm}quantize_{}_k{k}", act.name())
            }
            CudaKernel::MatMul {
                format,
                layout,
                k,
                epilogue,
            } => format!(
                "matmul_{format}_{}_k{k}_{}",
                layout_name(*layout),
                epilogue.name()
            ),
            CudaKernel::Embed { format, layout, d } => {
                format!("embed_{format}_{}_d{d}", layout_name(*layout))
            }
            CudaKernel::RmsNorm { d } => format!("rms_norm_d{d}"),
            CudaKernel::Rope {
                style,
                head_dim,
                dims,
            } => format!("rope_{}_hd{head_dim}_dims{dims}", style.name()),
            CudaKernel::KvAppend { width } => format!("kv_append_w{width}"),
            CudaKernel::Attention { head_dim, group } => {
                format!("attention_hd{head_dim}_g{group}")
            }
            CudaKernel::Elementwise { op } => format!("elementwise_{}", op.name()),
        }
    }
}

impl fmt::Display for CudaKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A layout as a C identifier fragment (`f32s.x4` -> `f32s_x4`).
fn layout_name(layout: Layout) -> String {
    layout.to_string().replace('.', "_")
}

/// Shapes of one node, as kernel selection and launches need them.
pub struct NodeShapes {
    /// The op's weights (`None` for values), with their layouts.
    pub weights: Vec<Option<MatMulWeight>>,
    /// The result's dims after `tokens`.
    pub dims: Vec<usize>,
    /// Each value operand's dims after `tokens` (empty for weights).
    pub operand_dims: Vec<Vec<usize>>,
}

impl NodeShapes {
    pub fn of(graph: &Graph, node: &Node, layout_of: impl Fn(&str) -> Layout) -> Self {
        let fixed = |dims: &[Dim]| -> Vec<usize> {
            dims.iter()
                .skip(1)
                .filter_map(|d| d.clone().fixed())
                .collect()
        };
        NodeShapes {
            weights: node_weights(graph, node, layout_of),
            dims: fixed(&node.ty.shape),
            operand_dims: node
                .operands
                .iter()
                .map(|operand| match operand {
                    Operand::Value(v) => fixed(&graph.node(*v).ty.shape),
                    Operand::Weight(_) => Vec::new(),
                })
                .collect(),
        }
    }
}

/// Every kernel the CUDA executor launches for `op`, in launch order. The executor runs exactly these, and the
/// compiler generates exactly these, so the two cannot drift apart.
pub fn op_kernels(op: &Op, shapes: &NodeShapes) -> Vec<CudaKernel> {
    let mut out = Vec::new();
    let matmuls = op_matmuls(op, &shapes.weights);
    if let Some(plan) = &matmuls {
        for &(operand, epilogue) in &plan.calls {
            let Some(w) = shapes.weights.get(operand).copied().flatten() else {
                continue;
            };
            out.push(CudaKernel::Quantize {
                act: ActFormat::for_weight(w.format),
                k: w.k,
                norm: plan.norm,
            });
            out.push(CudaKernel::MatMul {
                format: w.format,
                layout: w.layout,
                k: w.k,
                epilogue,
            });
        }
    }
    match op {
        Op::Embed => {
            if let Some(w) = shapes.weights.first().copied().flatten() {
                out.push(CudaKernel::Embed {
                    format: w.format,
                    layout: w.layout,
                    d: w.k,
                });
            }
        }
        Op::RmsNorm { .. } => out.push(CudaKernel::RmsNorm {
            d: *shapes.dims.last().unwrap_or(&0),
        }),
        Op::Add => out.push(elementwise(ElementOp::Add)),
        Op::Mul => out.push(elementwise(ElementOp::Mul)),
        Op::Scale { .. } => out.push(elementwise(ElementOp::Scale)),
        Op::Activation(act) => out.push(elementwise(ElementOp::Act(*act))),
        Op::Reshape => out.push(elementwise(ElementOp::Copy)),
        Op::Rope(rope) => {
            out.push(elementwise(ElementOp::Copy));
            out.push(CudaKernel::Rope {
                style: rope.style,
                head_dim: shapes.dims[1],
                dims: rope.dims,
            });
        }
        Op::Attention { .. } => {
            let (heads, head_dim) = (shapes.dims[0], shapes.dims[1]);
            let kv_heads = shapes.operand_dims[1][0];
            out.push(CudaKernel::KvAppend {
                width: kv_heads * head_dim,
            });
            out.push(CudaKernel::Attention {
                head_dim,
                group: heads / kv_heads,
            });
        }
        Op::AttentionQkv {
            heads, kv_heads, ..
        } => {
            let head_dim = shapes.operand_dims[0][1];
            out.push(CudaKernel::KvAppend {
                width: kv_heads * head_dim,
            });
            out.push(CudaKernel::Attention {
                head_dim,
                group: heads / kv_heads,
            });
        }
        Op::QkvRope {
            head_dim,
            rope,
            qk_norm,
            ..
        } => {
            if qk_norm.is_some() {
                out.push(CudaKernel::RmsNorm { d: *head_dim });
            }
            out.push(CudaKernel::Rope {
                style: rope.style,
                head_dim: *head_dim,
                dims: rope.dims,
            });
        }
        Op::GatedFfn { act, .. } => {
            // Two separate matmuls when gate and up differ in format: the gate is applied after.
            if matmuls.is_some_and(|p| p.calls.len() == 2) {
                out.push(elementwise(ElementOp::Gate(*act)));
            }
        }
        Op::MatMulResidual { post_norm: Some(_) } => out.push(CudaKernel::RmsNorm {
            d: *shapes.dims.last().unwrap_or(&0),
        }),
        Op::Input { .. } | Op::MatMul | Op::NormMatMul { .. } | Op::MatMulResidual { .. } => {}
    }
    out
}

fn elementwise(op: ElementOp) -> CudaKernel {
    CudaKernel::Elementwise { op }
}

/// The CUDA code of a plan: one module's source, its kernels, and its PTX per virtual architecture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaCode {
    pub source: String,
    pub kernels: Vec<CudaKernel>,
    pub ptx: Vec<ArchPtx>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchPtx {
    /// A virtual architecture, `compute_80` or `compute_90`.
    pub arch: String,
    pub ptx: String,
}

impl CudaCode {
    /// The PTX of the newest architecture at or below compute capability `major.minor`, if any.
    pub fn ptx_for(&self, major: u32, minor: u32) -> Option<&ArchPtx> {
        let capability = major * 10 + minor;
        self.ptx
            .iter()
            .filter_map(|p| Some((p.arch.strip_prefix("compute_")?.parse::<u32>().ok()?, p)))
            .filter(|(cc, _)| *cc <= capability)
            .max_by_key(|(cc, _)| *cc)
            .map(|(_, p)| p)
    }
}
