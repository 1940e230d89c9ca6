//! The op set: one definition of each op, its operands, attributes and type rule.
//!
//! Ops are unfused here; fused ops join this enum (and so print, parse and verify like any other).

use crate::types::{DType, Dim, TensorType};
use serde::{Deserialize, Serialize};

/// How RoPE pairs the dims of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    Silu,
    /// GELU, tanh approximation.
    Gelu,
    /// Same elements, new shape (given by the result type).
    Reshape,
    /// Rotary position embedding over the first `dims` dims of each head of `x[tokens, heads, head_dim]`.
    /// Position p rotates pair i by the angle `p * freq_scale * base^(-2i/dims)`.
    Rope {
        base: f32,
        dims: usize,
        freq_scale: f32,
        style: RopeStyle,
    },
    /// Causal attention of `q[tokens, heads, hd]` over this layer's KV cache after appending `k`, `v`
    /// (`[tokens, kv_heads, hd]`) at `positions`. `window`: a key at position j is seen from position i only
    /// when `i - j < window` (sliding-window layers).
    Attention {
        layer: usize,
        scale: f32,
        window: Option<usize>,
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
            Op::Silu => "silu",
            Op::Gelu => "gelu",
            Op::Reshape => "reshape",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
        }
    }

    /// The dtype each operand must have, in order; its length is the op's arity.
    pub fn operand_dtypes(&self) -> &'static [Expect] {
        use Expect::*;
        match self {
            Op::Input { .. } => &[],
            Op::Embed => &[Weight, I32],
            Op::RmsNorm { .. } => &[F32, F32],
            Op::MatMul => &[F32, Weight],
            Op::Add | Op::Mul => &[F32, F32],
            Op::Scale { .. } | Op::Silu | Op::Gelu | Op::Reshape => &[F32],
            Op::Rope { .. } => &[F32, I32],
            Op::Attention { .. } => &[F32, F32, F32, I32],
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
            Op::RmsNorm { .. } => {
                let (x, w) = (operands[0], operands[1]);
                expect_rank(w, 1, "norm weight")?;
                if x.inner() != w.inner() {
                    return Err(format!(
                        "norm weight {w} does not match the last dim of {x}"
                    ));
                }
                Ok(x.clone())
            }
            Op::MatMul => {
                let (x, w) = (operands[0], operands[1]);
                expect_rank(w, 2, "matmul weight")?;
                if x.inner() != Some(&w.shape[1]) {
                    return Err(format!(
                        "inner dims differ: {x} times {w} (weights are [out, in])"
                    ));
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().expect("rank >= 1") = w.shape[0].clone();
                Ok(f32_of(&shape))
            }
            Op::Add | Op::Mul => {
                let (a, b) = (operands[0], operands[1]);
                if b.rank() > a.rank() || a.shape[a.rank() - b.rank()..] != b.shape[..] {
                    return Err(format!("{b} does not broadcast to {a}"));
                }
                Ok(a.clone())
            }
            Op::Scale { .. } | Op::Silu | Op::Gelu => Ok(operands[0].clone()),
            Op::Reshape => {
                if operands[0].volume() != declared.volume() || declared.dtype != DType::F32 {
                    return Err(format!("cannot reshape {} to {declared}", operands[0]));
                }
                Ok(declared.clone())
            }
            Op::Rope { dims, .. } => {
                let (x, pos) = (operands[0], operands[1]);
                expect_rank(x, 3, "rope input")?;
                let head_dim = x.shape[2]
                    .clone()
                    .fixed()
                    .ok_or("rope head dim must be fixed")?;
                if *dims > head_dim || dims % 2 != 0 {
                    return Err(format!(
                        "rope dims {dims} must be even and at most the head dim {head_dim}"
                    ));
                }
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
                let (heads, kv_heads) = (q.shape[1].clone().fixed(), k.shape[1].clone().fixed());
                match (heads, kv_heads) {
                    (Some(h), Some(kv)) if kv > 0 && h % kv == 0 => {}
                    _ => {
                        return Err(format!(
                            "query heads of {q} are not a multiple of kv heads of {k}"
                        ))
                    }
                }
                same_tokens(q, pos)?;
                Ok(q.clone())
            }
        }
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
