//! The op set: one definition of each op, its operands, attributes and type rule.
//!
//! The first group is what lowering produces. The second group is the fused ops the `fuse` pass makes: each is
//! defined as exactly the composition of first-group ops written in its doc comment, so an executor may run it
//! either way, and a fused kernel is checked against that composition.

use crate::types::{DType, Dim, TensorType};
use serde::{Deserialize, Serialize};

/// How RoPE pairs the dims of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF llama weights are permuted for this.
    Interleaved,
    /// Halves (i, i + d/2): GPT-NeoX, Qwen2, Gemma.
    Neox,
}

impl RopeStyle {
    pub fn name(self) -> &'static str {
        match self {
            RopeStyle::Interleaved => "interleaved",
            RopeStyle::Neox => "neox",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [RopeStyle::Interleaved, RopeStyle::Neox]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

/// Rotary position embedding over the first `dims` dims of each head: position p rotates pair i by the angle
/// `p * freq_scale * base^(-2i/dims)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParams {
    pub base: f32,
    pub dims: usize,
    pub freq_scale: f32,
    pub style: RopeStyle,
}

impl RopeParams {
    /// The angle pair `pair` of a head is rotated by at position `pos`.
    pub fn angle(&self, pos: i32, pair: usize) -> f64 {
        self.scaled_position(pos) * self.frequency(pair)
    }

    /// `pos * freq_scale`, the factor of an angle that depends on the position.
    pub fn scaled_position(&self, pos: i32) -> f64 {
        pos as f64 * self.freq_scale as f64
    }

    /// `base^(-2 pair / dims)`, the factor of an angle that depends on the pair.
    pub fn frequency(&self, pair: usize) -> f64 {
        (self.base as f64).powf(-2.0 * pair as f64 / self.dims as f64)
    }
}

/// An elementwise activation (and the gate activation of a gated FFN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    Gelu,
    /// `max(x, 0)^2` (BitNet b1.58's FFN).
    ReluSqr,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::ReluSqr => "relu_sqr",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Activation::Silu, Activation::Gelu, Activation::ReluSqr]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input, bound by the executor: `tokens` (i32 ids) or `positions` (i32).
    Input {
        name: String,
    },
    /// Rows of a table: `embed W[vocab, d], ids[tokens] -> f32[tokens, d]`.
    Embed,
    /// `x * w / rms(x)` over the last dim.
    RmsNorm {
        eps: f32,
    },
    /// `x[.., k] @ W[n, k]^T -> [.., n]`, with `x` first rounded to the weight format's activation format
    /// (`activation::ActivationFormat::for_weight`), as ggml's dot products do.
    MatMul,
    /// Elementwise; the second operand may be a suffix of the first's shape (a bias, broadcast).
    Add,
    Mul,
    Scale {
        factor: f32,
    },
    /// Elementwise; printed by the activation's name (`silu`, `gelu`, `relu_sqr`).
    Activation(Activation),
    /// Same elements, new shape (given by the result type).
    Reshape,
    /// RoPE of `x[tokens, heads, head_dim]` at `positions`.
    Rope(RopeParams),
    /// Causal attention of `q[tokens, heads, hd]` over this layer's KV cache after appending `k`, `v`
    /// (`[tokens, kv_heads, hd]`) at `positions`. `window`: a key at position j is seen from position i only
    /// when `i - j < window` (sliding-window layers).
    Attention {
        layer: usize,
        scale: f32,
        window: Option<usize>,
    },

    /// `matmul(rms_norm(x, g), W)`. Operands: x, g, W.
    NormMatMul {
        eps: f32,
    },
    /// The attention input of a layer: `h = rms_norm(x, g)`; `q, k, v = matmul(h, Wq|Wk|Wv) (+ bq|bk|bv)`,
    /// reshaped to heads; with `qk_norm`, `q, k = rms_norm(q, qn), rms_norm(k, kn)` per head; `q, k = rope(q), rope(k)`;
    /// the result packs the heads of q, then k, then v: `f32[tokens, heads + 2 kv_heads, head_dim]`.
    /// Operands: x, g, Wq, Wk, Wv, positions, then bq, bk, bv when `bias`, then qn, kn when `qk_norm` is set.
    QkvRope {
        eps: f32,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rope: RopeParams,
        bias: bool,
        qk_norm: Option<f32>,
    },
    /// `attention` reading a packed `qkv_rope` result, its output flattened to `f32[tokens, heads * head_dim]`.
    /// Operands: qkv, positions.
    AttentionQkv {
        layer: usize,
        scale: f32,
        window: Option<usize>,
        heads: usize,
        kv_heads: usize,
    },
    /// The gated feed-forward input: `h = rms_norm(x, g)`; `act(matmul(h, Wgate)) * matmul(h, Wup)`.
    /// Operands: x, g, Wgate, Wup.
    GatedFfn {
        eps: f32,
        act: Activation,
    },
    /// `residual + matmul(x, W)`, or with `post_norm`, `residual + rms_norm(matmul(x, W), g)`.
    /// Operands: x, W, residual; or x, W, g, residual with `post_norm`.
    MatMulResidual {
        post_norm: Option<f32>,
    },
}

/// What an operand slot accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A declared weight (`@name`), of any format.
    Weight,
    F32,
    I32,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Embed => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::MatMul => "matmul",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale { .. } => "scale",
            Op::Activation(act) => act.name(),
            Op::Reshape => "reshape",
            Op::Rope(_) => "rope",
            Op::Attention { .. } => "attention",
            Op::NormMatMul { .. } => "norm_matmul",
            Op::QkvRope { .. } => "qkv_rope",
            Op::AttentionQkv { .. } => "attention_qkv",
            Op::GatedFfn { .. } => "gated_ffn",
            Op::MatMulResidual { .. } => "matmul_residual",
        }
    }

    /// What each operand must be, in order; its length is the op's arity.
    pub fn operand_kinds(&self) -> Vec<Expect> {
        use Expect::*;
        match self {
            Op::Input { .. } => vec![],
            Op::Embed => vec![Weight, I32],
            Op::RmsNorm { .. } => vec![F32, F32],
            Op::MatMul => vec![F32, Weight],
            Op::Add | Op::Mul => vec![F32, F32],
            Op::Scale { .. } | Op::Activation(_) | Op::Reshape => vec![F32],
            Op::Rope(_) => vec![F32, I32],
            Op::Attention { .. } => vec![F32, F32, F32, I32],
            Op::NormMatMul { .. } => vec![F32, F32, Weight],
            Op::QkvRope { bias, qk_norm, .. } => {
                let mut kinds = vec![F32, F32, Weight, Weight, Weight, I32];
                if *bias {
                    kinds.extend([F32; 3]);
                }
                if qk_norm.is_some() {
                    kinds.extend([F32; 2]);
                }
                kinds
            }
            Op::AttentionQkv { .. } => vec![F32, I32],
            Op::GatedFfn { .. } => vec![F32, F32, Weight, Weight],
            Op::MatMulResidual { post_norm: None } => vec![F32, Weight, F32],
            Op::MatMulResidual { post_norm: Some(_) } => vec![F32, Weight, F32, F32],
        }
    }

    /// The result type, from the operand types; `Err` says which rule the operands break. `Input` and
    /// `Reshape` take their type from the node (`declared`), checked for consistency only.
    pub fn infer(
        &self,
        operands: &[&TensorType],
        declared: &TensorType,
    ) -> Result<TensorType, String> {
        let f32_of = |shape: &[Dim]| TensorType::new(DType::F32, shape.iter().cloned());
        match self {
            Op::Input { name } => match name.as_str() {
                "tokens" | "positions" => Ok(TensorType::new(DType::I32, [Dim::tokens()])),
                other => Err(format!(
                    "unknown input `{other}` (known: tokens, positions)"
                )),
            },
            Op::Embed => {
                let (table, ids) = (operands[0], operands[1]);
                expect_rank(table, 2, "embedding table")?;
                expect_rank(ids, 1, "ids")?;
                Ok(f32_of(&[ids.shape[0].clone(), table.shape[1].clone()]))
            }
            Op::RmsNorm { .. } => norm(operands[0], operands[1]),
            Op::MatMul => matmul(operands[0], operands[1]),
            Op::Add | Op::Mul => {
                let (a, b) = (operands[0], operands[1]);
                if b.rank() > a.rank() || a.shape[a.rank() - b.rank()..] != b.shape[..] {
                    return Err(format!("{b} does not broadcast to {a}"));
                }
                Ok(a.clone())
            }
            Op::Scale { .. } | Op::Activation(_) => Ok(operands[0].clone()),
            Op::Reshape => {
                if operands[0].volume() != declared.volume() || declared.dtype != DType::F32 {
                    return Err(format!("cannot reshape {} to {declared}", operands[0]));
                }
                Ok(declared.clone())
            }
            Op::Rope(rope) => {
                let (x, pos) = (operands[0], operands[1]);
                expect_rank(x, 3, "rope input")?;
                check_rope(rope, &x.shape[2])?;
                same_tokens(x, pos)?;
                Ok(x.clone())
            }
            Op::Attention { .. } => {
                let (q, k, v, pos) = (operands[0], operands[1], operands[2], operands[3]);
                for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                    expect_rank(t, 3, what)?;
                }
                if k.shape != v.shape || q.shape[2] != k.shape[2] || q.shape[0] != k.shape[0] {
                    return Err(format!("q {q}, k {k}, v {v} disagree"));
                }
                check_heads(q.shape[1].clone().fixed(), k.shape[1].clone().fixed())?;
                same_tokens(q, pos)?;
                Ok(q.clone())
            }
            Op::NormMatMul { .. } => {
                norm(operands[0], operands[1])?;
                matmul(operands[0], operands[2])
            }
            Op::QkvRope {
                heads,
                kv_heads,
                head_dim,
                rope,
                bias,
                qk_norm,
                ..
            } => {
                let (x, g) = (operands[0], operands[1]);
                norm(x, g)?;
                expect_rank(x, 2, "qkv_rope input")?;
                check_heads(Some(*heads), Some(*kv_heads))?;
                let widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim];
                for (w, width) in operands[2..5].iter().zip(widths) {
                    let y = matmul(x, w)?;
                    if y.inner() != Some(&Dim::Fixed(width)) {
                        return Err(format!("projection {w} does not give {width} outputs"));
                    }
                }
                same_tokens(x, operands[5])?;
                let mut rest = &operands[6..];
                if *bias {
                    for (b, width) in rest[..3].iter().zip(widths) {
                        if b.shape != [Dim::Fixed(width)] {
                            return Err(format!("bias {b} does not have {width} elements"));
                        }
                    }
                    rest = &rest[3..];
                }
                if qk_norm.is_some() {
                    for n in &rest[..2] {
                        if n.shape != [Dim::Fixed(*head_dim)] {
                            return Err(format!(
                                "qk norm weight {n} does not match head dim {head_dim}"
                            ));
                        }
                    }
                }
                check_rope(rope, &Dim::Fixed(*head_dim))?;
                Ok(f32_of(&[
                    x.shape[0].clone(),
                    Dim::Fixed(heads + 2 * kv_heads),
                    Dim::Fixed(*head_dim),
                ]))
            }
            Op::AttentionQkv {
                heads, kv_heads, ..
            } => {
                let (qkv, pos) = (operands[0], operands[1]);
                expect_rank(qkv, 3, "packed qkv")?;
                check_heads(Some(*heads), Some(*kv_heads))?;
                if qkv.shape[1] != Dim::Fixed(heads + 2 * kv_heads) {
                    return Err(format!(
                        "{qkv} does not pack {heads} + 2 x {kv_heads} heads"
                    ));
                }
                same_tokens(qkv, pos)?;
                let head_dim = qkv.shape[2]
                    .clone()
                    .fixed()
                    .ok_or("head dim must be fixed")?;
                Ok(f32_of(&[
                    qkv.shape[0].clone(),
                    Dim::Fixed(heads * head_dim),
                ]))
            }
            Op::GatedFfn { .. } => {
                let (x, g) = (operands[0], operands[1]);
                norm(x, g)?;
                let (gate, up) = (matmul(x, operands[2])?, matmul(x, operands[3])?);
                if gate != up {
                    return Err(format!(
                        "gate {} and up {} projections differ",
                        operands[2], operands[3]
                    ));
                }
                Ok(gate)
            }
            Op::MatMulResidual { post_norm } => {
                let y = matmul(operands[0], operands[1])?;
                if post_norm.is_some() {
                    norm(&y, operands[2])?;
                }
                let residual = operands[operands.len() - 1];
                if *residual != y {
                    return Err(format!(
                        "residual {residual} does not match the product {y}"
                    ));
                }
                Ok(y)
            }
        }
    }
}

fn norm(x: &TensorType, w: &TensorType) -> Result<TensorType, String> {
    expect_rank(w, 1, "norm weight")?;
    if x.inner() != w.inner() {
        return Err(format!(
            "norm weight {w} does not match the last dim of {x}"
        ));
    }
    Ok(x.clone())
}

fn matmul(x: &TensorType, w: &TensorType) -> Result<TensorType, String> {
    expect_rank(w, 2, "matmul weight")?;
    if x.inner() != Some(&w.shape[1]) {
        return Err(format!(
            "inner dims differ: {x} times {w} (weights are [out, in])"
        ));
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank >= 1") = w.shape[0].clone();
    Ok(TensorType::new(DType::F32, shape))
}

fn check_rope(rope: &RopeParams, head_dim: &Dim) -> Result<(), String> {
    let head_dim = head_dim
        .clone()
        .fixed()
        .ok_or("rope head dim must be fixed")?;
    if rope.dims > head_dim || !rope.dims.is_multiple_of(2) {
        return Err(format!(
            "rope dims {} must be even and at most the head dim {head_dim}",
            rope.dims
        ));
    }
    Ok(())
}

fn check_heads(heads: Option<usize>, kv_heads: Option<usize>) -> Result<(), String> {
    match (heads, kv_heads) {
        (Some(h), Some(kv)) if kv > 0 && h.is_multiple_of(kv) => Ok(()),
        _ => Err(format!(
            "query heads {heads:?} are not a multiple of kv heads {kv_heads:?}"
        )),
    }
}

fn expect_rank(t: &TensorType, rank: usize, what: &str) -> Result<(), String> {
    if t.rank() == rank {
        Ok(())
    } else {
        Err(format!("{what} must have rank {rank}, got {t}"))
    }
}

fn same_tokens(x: &TensorType, positions: &TensorType) -> Result<(), String> {
    if positions.shape.len() == 1 && positions.shape[0] == x.shape[0] {
        Ok(())
    } else {
        Err(format!(
            "positions {positions} do not match the rows of {x}"
        ))
    }
}
