//! The contract between the CPU code generator and the CPU executor: which native functions a plan carries, the
//! argument blocks they take, and the layout of quantized activations.
//!
//! Every generated function has the signature `extern "C" fn(args: *const Args)`, where `Args` is one of the
//! `#[repr(C)]` structs below: one pointer keeps the signature uniform, and the field offsets are computed here
//! once, so the generator and the executor cannot disagree on them.

use crate::activation::ActivationFormat;
use crate::layout::Layout;
use crate::{Activation, QuantFormat, RopeStyle};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::mem::offset_of;

/// What a matmul kernel does with each finished dot product `acc` of output `[t, r]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Epilogue {
    /// `out = acc`
    Store,
    /// `out = acc + extra[r]` (a bias).
    Bias,
    /// `out = acc + extra[t, r]` (the residual stream).
    Residual,
    /// `out = act(acc) * acc2`, where `acc2` is the dot product with the second weight (gate and up).
    Gated(Activation),
}

impl Epilogue {
    pub fn name(self) -> String {
        match self {
            Epilogue::Store => "store".into(),
            Epilogue::Bias => "bias".into(),
            Epilogue::Residual => "residual".into(),
            Epilogue::Gated(act) => format!("gated_{}", act.name()),
        }
    }
}

/// One native function of a CPU plan. Shapes are baked in: a function exists per distinct `k`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuFunction {
    /// Rounds `rows` rows of `k` f32 (optionally RMS-normalized first, with gain `g`) to `act` blocks.
    /// Takes `QuantizeArgs`.
    Quantize {
        act: ActFormat,
        k: usize,
        norm: bool,
    },
    /// `out[t, r] = epilogue(dot(W[r], x[t]))` for rows `row_begin..row_end` and tokens `0..tokens`, with `x`
    /// quantized to the weight format's activation format. Takes `MatMulArgs`.
    MatMul {
        format: QuantFormat,
        layout: Layout,
        k: usize,
        epilogue: Epilogue,
    },
    /// The `group` query heads that share one KV head (consecutive, `head_dim` apart in `q` and `out`) attending
    /// to a sequence's cached keys and values (paged, `KV_PAGE` positions per page): scores, softmax, the weighted
    /// sum of values. Takes `AttentionArgs`. Plans written before grouping hold `group` 1.
    Attention {
        head_dim: usize,
        #[serde(default = "one_head")]
        group: usize,
    },
    /// Rotates the first `dims` values of every head (`head_dim` values each) of `tokens` rows, by the cos/sin of
    /// each pair's angle at the row's position, paired as `style` says. Takes `RopeArgs`.
    Rope {
        head_dim: usize,
        dims: usize,
        style: RopeStyle,
    },
    /// RMS-normalizes each group of `n` values (a head, or a whole row) and scales it by the gain:
    /// `out = x * scale * gain`, plus `residual` when `residual` is set (a post-norm). Takes `RmsNormArgs`.
    RmsNorm { n: usize, residual: bool },
    /// Each token's row of an embedding table (`k` values, stored in `format` and `layout`) dequantized.
    /// Takes `EmbedArgs`.
    Embed {
        format: QuantFormat,
        layout: Layout,
        k: usize,
    },
}

/// Positions per page of the CPU executor's KV cache, which generated attention walks.
pub const KV_PAGE: usize = 16;

impl fmt::Display for CpuFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuFunction::Quantize { act, k, norm } => {
                let norm = if *norm { "rms_norm_" } else { "" };
                write!(f, "{norm}quantize_{}_k{k}", act.name())
            }
            CpuFunction::MatMul {
                format,
                layout,
                k,
                epilogue,
            } => write!(f, "matmul_{format}_{layout}_k{k}_{}", epilogue.name()),
            CpuFunction::Attention { head_dim, group: 1 } => write!(f, "attention_hd{head_dim}"),
            CpuFunction::Attention { head_dim, group } => {
                write!(f, "attention_hd{head_dim}_g{group}")
            }
            CpuFunction::Rope {
                head_dim,
                dims,
                style,
            } => write!(f, "rope_{}_hd{head_dim}_d{dims}", style.name()),
            CpuFunction::Embed { format, layout, k } => write!(f, "embed_{format}_{layout}_k{k}"),
            CpuFunction::RmsNorm { n, residual } => {
                let residual = if *residual { "_residual" } else { "" };
                write!(f, "rms_norm_n{n}{residual}")
            }
        }
    }
}

/// Quantized activations as the CPU kernels read them: per block, the f32 scale `d`, then per group of 16 values
/// the sum of their codes (i16) — what formats with an offset or a minimum need — then the i8 codes; Q8_0 blocks
/// end with `d * sum(codes)` as f32 (ggml's Q8_1 `s`), the factor of a weight block's minimum, computed once per
/// token rather than once per row group. The codes are exactly ggml's, so a dot product with them is the
/// reference `matmul`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActFormat {
    /// Blocks of 32 with ggml's Q8_0 rounding (Q8_1 has the same codes).
    Q8_0,
    /// Blocks of 256 with ggml's Q8_K rounding.
    Q8K,
    /// Blocks of 128 sharing one scale per row (BitNet's per-token int8): every block repeats the row's `d`.
    I8Row,
    /// f32 values, rounded to `F16` or `BF16` precision first when the weights are of that type.
    F32 { round: FloatRound },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FloatRound {
    None,
    F16,
    BF16,
}

impl ActFormat {
    pub fn for_weight(format: QuantFormat) -> Self {
        match ActivationFormat::for_weight(format) {
            ActivationFormat::Q8_0 | ActivationFormat::Q8_1 => ActFormat::Q8_0,
            ActivationFormat::Q8_K => ActFormat::Q8K,
            ActivationFormat::I8Row => ActFormat::I8Row,
            ActivationFormat::F32 => ActFormat::F32 {
                round: FloatRound::None,
            },
            ActivationFormat::F16 => ActFormat::F32 {
                round: FloatRound::F16,
            },
            ActivationFormat::BF16 => ActFormat::F32 {
                round: FloatRound::BF16,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ActFormat::Q8_0 => "q8_0",
            ActFormat::Q8K => "q8_k",
            ActFormat::I8Row => "i8_row",
            ActFormat::F32 {
                round: FloatRound::None,
            } => "f32",
            ActFormat::F32 {
                round: FloatRound::F16,
            } => "f32_via_f16",
            ActFormat::F32 {
                round: FloatRound::BF16,
            } => "f32_via_bf16",
        }
    }

    /// Values per block (1 for f32: no blocks).
    pub fn block_elems(self) -> usize {
        match self {
            ActFormat::Q8_0 => 32,
            ActFormat::Q8K => 256,
            ActFormat::I8Row => 128,
            ActFormat::F32 { .. } => 1,
        }
    }

    /// Byte offset of the i16 group sums inside a block.
    pub const SUMS_AT: usize = 4;

    /// Byte offset of the codes inside a block.
    pub fn codes_at(self) -> usize {
        Self::SUMS_AT + 2 * (self.block_elems() / 16)
    }

    /// Byte offset of the f32 `d * sum(codes)` inside a block, for the format that keeps it (Q8_0).
    pub fn scaled_sum_at(self) -> Option<usize> {
        (self == ActFormat::Q8_0).then(|| self.codes_at() + self.block_elems())
    }

    pub fn block_bytes(self) -> usize {
        match (self, self.scaled_sum_at()) {
            (ActFormat::F32 { .. }, _) => 4,
            (_, Some(at)) => at + 4,
            (_, None) => self.codes_at() + self.block_elems(),
        }
    }

    /// Bytes of one quantized row of `k` values.
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_elems() * self.block_bytes()
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct QuantizeArgs {
    pub x: *const f32,
    /// Elements from one row of `x` to the next.
    pub x_stride: u64,
    /// The RMSNorm gain (`k` values), read only by `norm` functions.
    pub gain: *const f32,
    pub out: *mut u8,
    /// Bytes from one quantized row to the next.
    pub out_stride: u64,
    pub rows: u64,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MatMulArgs {
    pub w: *const u8,
    /// The second weight of a gated epilogue.
    pub w2: *const u8,
    /// Quantized activations, `x_stride` bytes per token.
    pub x: *const u8,
    pub x_stride: u64,
    pub out: *mut f32,
    /// Elements from one token's output row to the next.
    pub out_stride: u64,
    /// The bias (`Bias`) or residual rows (`Residual`, `extra_stride` elements apart).
    pub extra: *const f32,
    pub extra_stride: u64,
    /// Output rows to compute: a multiple of the layout's interleave.
    pub row_begin: u64,
    pub row_end: u64,
    pub tokens: u64,
    /// The whole-tensor scales of `w` and `w2` for formats that keep one after their blocks (I2_S); null
    /// otherwise.
    pub w_scale: *const f32,
    pub w2_scale: *const f32,
}

/// Position `j` of the sequence is at `k + pages[j / KV_PAGE] * page_stride + kv_offset + (j % KV_PAGE) * head_dim`
/// (and likewise in `v`): the executor keeps each KV head's pages in a region of their own, so that a head's rows are
/// one run of memory per page, and one run across pages taken in order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    /// The query head (`head_dim` values).
    pub q: *const f32,
    /// The layer's key and value pools.
    pub k: *const f32,
    pub v: *const f32,
    /// The sequence's page table.
    pub pages: *const u32,
    /// Values per page of one KV head (its `KV_PAGE` rows).
    pub page_stride: u64,
    /// Where the KV head's region of the pools starts.
    pub kv_offset: u64,
    /// The positions attended: `first..=last`.
    pub first: u64,
    pub last: u64,
    pub out: *mut f32,
    /// Room for `last - first + 1` scores.
    pub scores: *mut f32,
    pub scale: f32,
}

/// Pair `i` of row `t` turns by the angle whose cosine is `cos[t * dims / 2 + i]` (and sine `sin[...]`): the
/// executor computes the table (in f64, as the reference does), the kernel rotates.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RopeArgs {
    /// Row `t` is at `x + t * x_stride`, its heads one after another.
    pub x: *mut f32,
    pub x_stride: u64,
    pub tokens: u64,
    /// Heads per row.
    pub heads: u64,
    pub cos: *const f32,
    pub sin: *const f32,
}

/// Group `g` of row `t` is the `n` values at `x + t * x_stride + g * n` (likewise in `out` and `residual`);
/// `out` may be `x` (in place).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RmsNormArgs {
    pub x: *const f32,
    pub x_stride: u64,
    pub out: *mut f32,
    pub out_stride: u64,
    /// Read only by the `residual` kernels.
    pub residual: *const f32,
    pub residual_stride: u64,
    pub rows: u64,
    /// Groups per row.
    pub groups: u64,
    /// `n` gains, shared by every group.
    pub gain: *const f32,
    pub eps: f32,
}

/// Row `ids[t]` of `table` into `out + t * out_stride`, for `t` in `0..tokens`; the executor has checked every
/// id against the table's rows.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmbedArgs {
    pub table: *const u8,
    pub ids: *const i32,
    pub tokens: u64,
    pub out: *mut f32,
    pub out_stride: u64,
}

/// Field offsets, for the code generator.
pub mod offsets {
    use super::*;

    pub mod quantize {
        use super::*;
        pub const X: i32 = offset_of!(QuantizeArgs, x) as i32;
        pub const X_STRIDE: i32 = offset_of!(QuantizeArgs, x_stride) as i32;
        pub const GAIN: i32 = offset_of!(QuantizeArgs, gain) as i32;
        pub const OUT: i32 = offset_of!(QuantizeArgs, out) as i32;
        pub const OUT_STRIDE: i32 = offset_of!(QuantizeArgs, out_stride) as i32;
        pub const ROWS: i32 = offset_of!(QuantizeArgs, rows) as i32;
        pub const EPS: i32 = offset_of!(QuantizeArgs, eps) as i32;
    }

    pub mod matmul {
        use super::*;
        pub const W: i32 = offset_of!(MatMulArgs, w) as i32;
        pub const W2: i32 = offset_of!(MatMulArgs, w2) as i32;
        pub const W_SCALE: i32 = offset_of!(MatMulArgs, w_scale) as i32;
        pub const W2_SCALE: i32 = offset_of!(MatMulArgs, w2_scale) as i32;
        pub const X: i32 = offset_of!(MatMulArgs, x) as i32;
        pub const X_STRIDE: i32 = offset_of!(MatMulArgs, x_stride) as i32;
        pub const OUT: i32 = offset_of!(MatMulArgs, out) as i32;
        pub const OUT_STRIDE: i32 = offset_of!(MatMulArgs, out_stride) as i32;
        pub const EXTRA: i32 = offset_of!(MatMulArgs, extra) as i32;
        pub const EXTRA_STRIDE: i32 = offset_of!(MatMulArgs, extra_stride) as i32;
        pub const ROW_BEGIN: i32 = offset_of!(MatMulArgs, row_begin) as i32;
        pub const ROW_END: i32 = offset_of!(MatMulArgs, row_end) as i32;
        pub const TOKENS: i32 = offset_of!(MatMulArgs, tokens) as i32;
    }

    pub mod attention {
        use super::*;
        pub const Q: i32 = offset_of!(AttentionArgs, q) as i32;
        pub const K: i32 = offset_of!(AttentionArgs, k) as i32;
        pub const V: i32 = offset_of!(AttentionArgs, v) as i32;
        pub const PAGES: i32 = offset_of!(AttentionArgs, pages) as i32;
        pub const PAGE_STRIDE: i32 = offset_of!(AttentionArgs, page_stride) as i32;
        pub const KV_OFFSET: i32 = offset_of!(AttentionArgs, kv_offset) as i32;
        pub const FIRST: i32 = offset_of!(AttentionArgs, first) as i32;
        pub const LAST: i32 = offset_of!(AttentionArgs, last) as i32;
        pub const OUT: i32 = offset_of!(AttentionArgs, out) as i32;
        pub const SCORES: i32 = offset_of!(AttentionArgs, scores) as i32;
        pub const SCALE: i32 = offset_of!(AttentionArgs, scale) as i32;
    }

    pub mod embed {
        use super::*;
        pub const TABLE: i32 = offset_of!(EmbedArgs, table) as i32;
        pub const IDS: i32 = offset_of!(EmbedArgs, ids) as i32;
        pub const TOKENS: i32 = offset_of!(EmbedArgs, tokens) as i32;
        pub const OUT: i32 = offset_of!(EmbedArgs, out) as i32;
        pub const OUT_STRIDE: i32 = offset_of!(EmbedArgs, out_stride) as i32;
    }

    pub mod rms_norm {
        use super::*;
        pub const X: i32 = offset_of!(RmsNormArgs, x) as i32;
        pub const X_STRIDE: i32 = offset_of!(RmsNormArgs, x_stride) as i32;
        pub const OUT: i32 = offset_of!(RmsNormArgs, out) as i32;
        pub const OUT_STRIDE: i32 = offset_of!(RmsNormArgs, out_stride) as i32;
        pub const RESIDUAL: i32 = offset_of!(RmsNormArgs, residual) as i32;
        pub const RESIDUAL_STRIDE: i32 = offset_of!(RmsNormArgs, residual_stride) as i32;
        pub const ROWS: i32 = offset_of!(RmsNormArgs, rows) as i32;
        pub const GROUPS: i32 = offset_of!(RmsNormArgs, groups) as i32;
        pub const GAIN: i32 = offset_of!(RmsNormArgs, gain) as i32;
        pub const EPS: i32 = offset_of!(RmsNormArgs, eps) as i32;
    }

    pub mod rope {
        use super::*;
        pub const X: i32 = offset_of!(RopeArgs, x) as i32;
        pub const X_STRIDE: i32 = offset_of!(RopeArgs, x_stride) as i32;
        pub const TOKENS: i32 = offset_of!(RopeArgs, tokens) as i32;
        pub const HEADS: i32 = offset_of!(RopeArgs, heads) as i32;
        pub const COS: i32 = offset_of!(RopeArgs, cos) as i32;
        pub const SIN: i32 = offset_of!(RopeArgs, sin) as i32;
    }
}

/// A matmul weight as the executor sees it.
#[derive(Clone, Copy, Debug)]
pub struct MatMulWeight {
    pub format: QuantFormat,
    pub layout: Layout,
    /// Input width (the weight's row length).
    pub k: usize,
}

impl CpuFunction {
    /// The activation quantizer feeding `w`.
    pub fn quantize_for(w: MatMulWeight, norm: bool) -> Self {
        CpuFunction::Quantize {
            act: ActFormat::for_weight(w.format),
            k: w.k,
            norm,
        }
    }

    pub fn matmul_for(w: MatMulWeight, epilogue: Epilogue) -> Self {
        CpuFunction::MatMul {
            format: w.format,
            layout: w.layout,
            k: w.k,
            epilogue,
        }
    }
}

/// How the executor runs an op with generated code: whether the activations are RMS-normalized as they are
/// quantized, and the matmuls it makes (weight operand index, epilogue).
pub struct OpMatMuls {
    pub norm: bool,
    pub calls: Vec<(usize, Epilogue)>,
}

/// The matmuls of `op`, given its operands' weights (`None` for value operands); `None` for ops the executor runs
/// without generated code. The executor runs exactly these calls, and the compiler generates exactly their
/// functions (`op_functions`), so the two cannot drift apart.
pub fn op_matmuls(op: &crate::Op, weights: &[Option<MatMulWeight>]) -> Option<OpMatMuls> {
    use crate::Op;
    let (norm, calls) = match op {
        Op::MatMul => (false, vec![(1, Epilogue::Store)]),
        Op::NormMatMul { .. } => (true, vec![(2, Epilogue::Store)]),
        Op::QkvRope { bias, .. } => {
            let epilogue = if *bias {
                Epilogue::Bias
            } else {
                Epilogue::Store
            };
            (true, (2..5).map(|i| (i, epilogue)).collect())
        }
        Op::GatedFfn { act, .. } => {
            let (g, u) = (weights.get(2)?.as_ref()?, weights.get(3)?.as_ref()?);
            // One kernel computes both dot products only when gate and up share a format and layout.
            if (g.format, g.layout) == (u.format, u.layout) {
                (true, vec![(2, Epilogue::Gated(*act))])
            } else {
                (true, vec![(2, Epilogue::Store), (3, Epilogue::Store)])
            }
        }
        Op::MatMulResidual { post_norm: None } => (false, vec![(1, Epilogue::Residual)]),
        Op::MatMulResidual { post_norm: Some(_) } => (false, vec![(1, Epilogue::Store)]),
        _ => return None,
    };
    Some(OpMatMuls { norm, calls })
}

fn one_head() -> usize {
    1
}

/// The attention function of an attention node: its head width is the last dim of its query (or fused QKV)
/// operand, and its group the query heads per KV head; `None` for other nodes.
pub fn attention_function(graph: &crate::Graph, node: &crate::Node) -> Option<CpuFunction> {
    use crate::{Op, Operand};
    // Dim `from_end` (1: the last) of operand `i`, which must be fixed.
    let dim = |i: usize, from_end: usize| -> Option<usize> {
        let Operand::Value(v) = node.operands.get(i)? else {
            return None;
        };
        let shape = &graph.node(*v).ty.shape;
        shape
            .get(shape.len().checked_sub(from_end)?)?
            .clone()
            .fixed()
    };
    let (head_dim, heads, kv_heads) = match node.op {
        Op::Attention { .. } => (dim(0, 1)?, dim(0, 2)?, dim(1, 2)?),
        Op::AttentionQkv {
            heads, kv_heads, ..
        } => (dim(0, 1)?, heads, kv_heads),
        _ => return None,
    };
    let group = heads
        .checked_div(kv_heads)
        .filter(|g| g * kv_heads == heads)?;
    Some(CpuFunction::Attention { head_dim, group })
}

/// The RoPE function of a node that rotates heads (`rope`, `qkv_rope`); `None` for other nodes.
pub fn rope_function(graph: &crate::Graph, node: &crate::Node) -> Option<CpuFunction> {
    use crate::{Op, Operand};
    let (head_dim, rope) = match &node.op {
        Op::QkvRope { head_dim, rope, .. } => (*head_dim, rope),
        Op::Rope(rope) => {
            let Operand::Value(x) = node.operands.first()? else {
                return None;
            };
            (graph.node(*x).ty.shape.last()?.clone().fixed()?, rope)
        }
        _ => return None,
    };
    Some(CpuFunction::Rope {
        head_dim,
        dims: rope.dims,
        style: rope.style,
    })
}

/// The embedding function of an `embed` node, given its table's weight (`node_weights`); `None` for other nodes.
pub fn embed_function(op: &crate::Op, weights: &[Option<MatMulWeight>]) -> Option<CpuFunction> {
    let table = match op {
        crate::Op::Embed => weights.first().copied().flatten()?,
        _ => return None,
    };
    Some(CpuFunction::Embed {
        format: table.format,
        layout: table.layout,
        k: table.k,
    })
}

/// The stand-alone RMSNorm function of a node that has one (an unfused norm, a post-norm added to the residual,
/// QK-norms over the heads); `None` for other nodes.
pub fn rms_norm_function(node: &crate::Node) -> Option<CpuFunction> {
    use crate::Op;
    match &node.op {
        Op::MatMulResidual { post_norm: Some(_) } => Some(CpuFunction::RmsNorm {
            n: node.ty.shape.last()?.clone().fixed()?,
            residual: true,
        }),
        Op::QkvRope {
            qk_norm: Some(_),
            head_dim,
            ..
        } => Some(CpuFunction::RmsNorm {
            n: *head_dim,
            residual: false,
        }),
        Op::RmsNorm { .. } => Some(CpuFunction::RmsNorm {
            n: node.ty.shape.last()?.clone().fixed()?,
            residual: false,
        }),
        _ => None,
    }
}

/// Every function the executor calls for `op`.
pub fn op_functions(op: &crate::Op, weights: &[Option<MatMulWeight>]) -> Vec<CpuFunction> {
    let Some(plan) = op_matmuls(op, weights) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (operand, epilogue) in plan.calls {
        let Some(w) = weights.get(operand).copied().flatten() else {
            continue;
        };
        for f in [
            CpuFunction::quantize_for(w, plan.norm),
            CpuFunction::matmul_for(w, epilogue),
        ] {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// The weights among `node`'s operands (`None` for values), with the layout each is stored in.
pub fn node_weights(
    graph: &crate::Graph,
    node: &crate::Node,
    layout_of: impl Fn(&str) -> Layout,
) -> Vec<Option<MatMulWeight>> {
    node.operands
        .iter()
        .map(|operand| match operand {
            crate::Operand::Weight(w) => {
                let decl = graph.weight(*w);
                let format = decl.ty.dtype.format()?;
                let k = decl.ty.inner()?.clone().fixed()?;
                Some(MatMulWeight {
                    format,
                    layout: layout_of(&decl.name),
                    k,
                })
            }
            crate::Operand::Value(_) => None,
        })
        .collect()
}
