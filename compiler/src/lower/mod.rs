//! Lowering: a GGUF model becomes an unfused IR graph plus the model facts the runtime needs.
//!
//! One decoder lowering serves every architecture; what differs between them is a row of `arch::ARCHITECTURES`.

mod arch;
mod hparams;
mod model_info;

pub use arch::{known_names as known_architectures, Arch};
pub use hparams::Hyperparameters;

use crate::gguf::GgufFile;
use hparams::Meta;
use kiln_ir::model::ModelInfo;
use kiln_ir::{
    verify, DType, Dim, Graph, NodeId, Op, Operand, RopeParams, TensorType, VerifyError,
};

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("the model has no `general.architecture` key")]
    NoArchitecture,
    #[error("unsupported architecture `{found}` (kiln knows: {known})")]
    UnknownArchitecture { found: String, known: String },
    #[error("metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` does not fit the model: {reason}")]
    TensorShape { name: String, reason: String },
    #[error("lowering produced an invalid graph (a kiln bug): {0}")]
    Invalid(#[from] VerifyError),
}

/// A lowered model.
pub struct Lowered {
    pub graph: Graph,
    pub info: ModelInfo,
    pub hparams: Hyperparameters,
}

/// Lowers a GGUF model to the unfused graph, verified.
pub fn lower(gguf: &GgufFile) -> Result<Lowered, LowerError> {
    let arch_name = gguf
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or(LowerError::NoArchitecture)?;
    let arch = arch::find(arch_name).ok_or_else(|| LowerError::UnknownArchitecture {
        found: arch_name.to_string(),
        known: arch::known_names(),
    })?;
    let hp = Hyperparameters::read(&Meta {
        gguf,
        arch: arch.name,
    })?;
    if arch.sliding_window_every.is_some() && hp.sliding_window.is_none() {
        return Err(LowerError::Metadata {
            key: format!("{}.attention.sliding_window", arch.name),
            reason: "missing".into(),
        });
    }
    let graph = Decoder {
        gguf,
        arch,
        hp: &hp,
        graph: Graph::new(arch.name),
    }
    .build()?;
    verify(&graph)?;
    let info = model_info::read(gguf, arch.name, &hp)?;
    Ok(Lowered {
        graph,
        info,
        hparams: hp,
    })
}

struct Decoder<'a> {
    gguf: &'a GgufFile,
    arch: &'static Arch,
    hp: &'a Hyperparameters,
    graph: Graph,
}

impl Decoder<'_> {
    /// Declares a GGUF tensor as a weight, with its expected row-major shape.
    fn weight(&mut self, name: &str, expected: &[usize]) -> Result<Operand, LowerError> {
        let info = self
            .gguf
            .tensor(name)
            .ok_or_else(|| LowerError::MissingTensor(name.to_string()))?;
        if info.shape != expected {
            return Err(LowerError::TensorShape {
                name: name.to_string(),
                reason: format!(
                    "shape {:?}, but the metadata implies {expected:?}",
                    info.shape
                ),
            });
        }
        let ty = TensorType::new(
            DType::of_format(info.format),
            info.shape.iter().map(|&d| Dim::Fixed(d)),
        );
        Ok(Operand::Weight(self.graph.declare_weight(name, ty)))
    }

    /// Adds a node whose type follows from its operands.
    fn op(&mut self, op: Op, operands: Vec<Operand>) -> Result<NodeId, LowerError> {
        let types: Vec<_> = operands
            .iter()
            .map(|o| self.graph.operand_type(*o))
            .collect();
        let placeholder = TensorType::new(DType::F32, []);
        let ty = op
            .infer(&types, &placeholder)
            .map_err(|reason| LowerError::TensorShape {
                name: format!("{} operand", op.name()),
                reason,
            })?;
        Ok(self.graph.add(op, operands, ty))
    }

    fn reshape(&mut self, x: NodeId, dims: &[usize]) -> NodeId {
        let shape = std::iter::once(Dim::tokens()).chain(dims.iter().map(|&d| Dim::Fixed(d)));
        self.graph.add(
            Op::Reshape,
            vec![Operand::Value(x)],
            TensorType::new(DType::F32, shape),
        )
    }

    fn norm(&mut self, x: NodeId, weight: &str, width: usize) -> Result<NodeId, LowerError> {
        let w = self.weight(weight, &[width])?;
        self.op(
            Op::RmsNorm {
                eps: self.hp.rms_eps,
            },
            vec![Operand::Value(x), w],
        )
    }

    fn linear(
        &mut self,
        x: NodeId,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<NodeId, LowerError> {
        let w = self.weight(&format!("{name}.weight"), &[out, inp])?;
        let y = self.op(Op::MatMul, vec![Operand::Value(x), w])?;
        if self.arch.qkv_bias
            && [".attn_q", ".attn_k", ".attn_v"]
                .iter()
                .any(|s| name.ends_with(s))
        {
            let b = self.weight(&format!("{name}.bias"), &[out])?;
            return self.op(Op::Add, vec![Operand::Value(y), b]);
        }
        Ok(y)
    }

    fn build(mut self) -> Result<Graph, LowerError> {
        let hp = self.hp;
        let tokens = self.graph.add(
            Op::Input {
                name: "tokens".into(),
            },
            vec![],
            TensorType::new(DType::I32, [Dim::tokens()]),
        );
        let positions = self.graph.add(
            Op::Input {
                name: "positions".into(),
            },
            vec![],
            TensorType::new(DType::I32, [Dim::tokens()]),
        );
        let vocab = self
            .gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| LowerError::MissingTensor("token_embd.weight".into()))?
            .shape[0];
        let embd = self.weight("token_embd.weight", &[vocab, hp.d_model])?;
        let mut x = self.op(Op::Embed, vec![embd, Operand::Value(tokens)])?;
        if self.arch.scale_embeddings {
            x = self.op(
                Op::Scale {
                    factor: (hp.d_model as f32).sqrt(),
                },
                vec![Operand::Value(x)],
            )?;
        }
        for layer in 0..hp.n_layers {
            x = self.block(layer, x, positions)?;
        }
        let x = self.norm(x, "output_norm.weight", hp.d_model)?;
        let head = match self.gguf.tensor("output.weight") {
            Some(_) => self.weight("output.weight", &[vocab, hp.d_model])?,
            None => embd, // tied embeddings
        };
        let logits = self.op(Op::MatMul, vec![Operand::Value(x), head])?;
        self.graph.set_output("logits", logits);
        Ok(self.graph)
    }

    fn block(&mut self, layer: usize, x: NodeId, positions: NodeId) -> Result<NodeId, LowerError> {
        let hp = self.hp;
        let p = format!("blk.{layer}");
        let (d, hd) = (hp.d_model, hp.head_dim);
        let (q_width, kv_width) = (hp.n_heads * hd, hp.n_kv_heads * hd);

        // Attention.
        let h = self.norm(x, &format!("{p}.attn_norm.weight"), d)?;
        let q = self.linear(h, &format!("{p}.attn_q"), q_width, d)?;
        let k = self.linear(h, &format!("{p}.attn_k"), kv_width, d)?;
        let v = self.linear(h, &format!("{p}.attn_v"), kv_width, d)?;
        let mut q = self.reshape(q, &[hp.n_heads, hd]);
        let mut k = self.reshape(k, &[hp.n_kv_heads, hd]);
        let v = self.reshape(v, &[hp.n_kv_heads, hd]);
        if self.arch.qk_norm {
            q = self.norm(q, &format!("{p}.attn_q_norm.weight"), hd)?;
            k = self.norm(k, &format!("{p}.attn_k_norm.weight"), hd)?;
        }
        let local = self
            .arch
            .sliding_window_every
            .is_some_and(|n| !(layer + 1).is_multiple_of(n));
        let (base, freq_scale, window) = match (local, self.arch.local_rope_base) {
            (true, Some(local_base)) => (local_base, 1.0, hp.sliding_window),
            _ => (hp.rope_base, hp.rope_freq_scale, None),
        };
        let rope = Op::Rope(RopeParams {
            base,
            dims: hp.rope_dims,
            freq_scale,
            style: self.arch.rope_style,
        });
        let q = self.op(
            rope.clone(),
            vec![Operand::Value(q), Operand::Value(positions)],
        )?;
        let k = self.op(rope, vec![Operand::Value(k), Operand::Value(positions)])?;
        let attention = Op::Attention {
            layer,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let a = self.op(attention, [q, k, v, positions].map(Operand::Value).to_vec())?;
        let mut a = self.reshape(a, &[q_width]);
        if self.arch.sub_norms {
            a = self.norm(a, &format!("{p}.attn_sub_norm.weight"), q_width)?;
        }
        let mut o = self.linear(a, &format!("{p}.attn_output"), d, q_width)?;
        if self.arch.post_norms {
            o = self.norm(o, &format!("{p}.post_attention_norm.weight"), d)?;
        }
        let x = self.op(Op::Add, vec![Operand::Value(x), Operand::Value(o)])?;

        // Gated feed-forward.
        let h = self.norm(x, &format!("{p}.ffn_norm.weight"), d)?;
        let gate = self.linear(h, &format!("{p}.ffn_gate"), hp.d_ffn, d)?;
        let up = self.linear(h, &format!("{p}.ffn_up"), hp.d_ffn, d)?;
        let gate = self.op(
            Op::Activation(self.arch.ffn_activation),
            vec![Operand::Value(gate)],
        )?;
        let mut m = self.op(Op::Mul, vec![Operand::Value(gate), Operand::Value(up)])?;
        if self.arch.sub_norms {
            m = self.norm(m, &format!("{p}.ffn_sub_norm.weight"), hp.d_ffn)?;
        }
        let mut down = self.linear(m, &format!("{p}.ffn_down"), d, hp.d_ffn)?;
        if self.arch.post_norms {
            down = self.norm(down, &format!("{p}.post_ffw_norm.weight"), d)?;
        }
        self.op(Op::Add, vec![Operand::Value(x), Operand::Value(down)])
    }
}
