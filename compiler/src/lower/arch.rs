//! The lowering table: what distinguishes each supported architecture, one row each.
//!
//! Everything not in a row (layer count, widths, head counts, epsilons, RoPE bases) comes from metadata.

use kiln_ir::{Activation, RopeStyle};

/// The traits of one architecture's decoder block.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    /// `general.architecture`.
    pub name: &'static str,
    pub rope_style: RopeStyle,
    /// Q, K and V projections carry biases (`attn_q.bias`, ...).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of Q and K before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm after the attention output and after the FFN, before each residual add.
    pub post_norms: bool,
    /// The gate activation of the gated FFN.
    pub ffn_activation: Activation,
    /// Embeddings are multiplied by sqrt(d_model).
    pub scale_embeddings: bool,
    /// Every n-th layer is global, the others use `attention.sliding_window` and `local_rope_base`.
    pub sliding_window_every: Option<usize>,
    /// RoPE base of sliding-window layers (fixed by the architecture, not in metadata).
    pub local_rope_base: Option<f32>,
    /// BitNet's sub-layer norms: RMSNorm of the attention output before its projection (`attn_sub_norm`) and of
    /// the gated FFN's product before the down projection (`ffn_sub_norm`).
    pub sub_norms: bool,
}

pub const ARCHITECTURES: [Arch; 4] = [
    Arch {
        name: "llama",
        rope_style: RopeStyle::Interleaved,
        qkv_bias: false,
        qk_norm: false,
        post_norms: false,
        ffn_activation: Activation::Silu,
        scale_embeddings: false,
        sliding_window_every: None,
        local_rope_base: None,
        sub_norms: false,
    },
    Arch {
        name: "qwen2",
        rope_style: RopeStyle::Neox,
        qkv_bias: true,
        qk_norm: false,
        post_norms: false,
        ffn_activation: Activation::Silu,
        scale_embeddings: false,
        sliding_window_every: None,
        local_rope_base: None,
        sub_norms: false,
    },
    Arch {
        name: "gemma3",
        rope_style: RopeStyle::Neox,
        qkv_bias: false,
        qk_norm: true,
        post_norms: true,
        ffn_activation: Activation::Gelu,
        scale_embeddings: true,
        sliding_window_every: Some(6),
        local_rope_base: Some(10_000.0),
        sub_norms: false,
    },
    // BitNet b1.58 (bitnet.cpp's keys; RoPE as llama.cpp's `bitnet`): its ternary projections read per-token int8
    // activations, which the I2_S format's activation quantization provides.
    Arch {
        name: "bitnet",
        rope_style: RopeStyle::Neox,
        qkv_bias: false,
        qk_norm: false,
        post_norms: false,
        ffn_activation: Activation::ReluSqr,
        scale_embeddings: false,
        sliding_window_every: None,
        local_rope_base: None,
        sub_norms: true,
    },
];

pub fn find(name: &str) -> Option<&'static Arch> {
    ARCHITECTURES.iter().find(|a| a.name == name)
}

pub fn known_names() -> String {
    ARCHITECTURES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}
