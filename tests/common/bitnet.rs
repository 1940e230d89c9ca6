//! A small synthetic BitNet b1.58 model, written with kiln's own GGUF writer: no ternary model is published in a
//! registry, and this one is small enough to check every step against the reference interpreter.
//!
//! `SMALL` (the test fixture): two layers, d = 128, four heads of 32 over two KV heads, FFN 256. Any shape takes
//! SmolLM2's tokenizer (its vocabulary sets the embedding's size). Every weight matrix holds random ternary values
//! times one scale per tensor, in F32: what `kiln quantize --to i2_s` turns into I2_S without changing a digit.
//! Norm gains are near 1, the embeddings F16.

use kiln_compiler::gguf::{write_gguf, MetaValue, TensorSpec};
use kiln_compiler::GgufFile;
use kiln_ir::QuantFormat;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// A model's size.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub layers: usize,
    pub d: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Dims of each head that RoPE rotates (`rope.dimension_count`): the whole head, or part of it.
    pub rope_dims: usize,
}

pub const SMALL: Shape = Shape {
    layers: 2,
    d: 128,
    ffn: 256,
    heads: 4,
    kv_heads: 2,
    rope_dims: 32,
};

/// The `SMALL` model's path, written once per test binary; `None` (skipped) without SmolLM2 for the tokenizer.
pub fn synthetic_bitnet() -> Option<PathBuf> {
    static MODEL: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bitnet-synthetic.gguf");
            write_synthetic_bitnet(SMALL, &path)?;
            Some(path)
        })
        .clone()
}

/// Writes a synthetic model of `shape` at `path`; `None` (skipped) without SmolLM2 for the tokenizer.
pub fn write_synthetic_bitnet(shape: Shape, path: &std::path::Path) -> Option<()> {
    let tokenizer = GgufFile::open(super::model("smollm2")?).unwrap();
    write(shape, &tokenizer, path);
    Some(())
}

fn write(shape: Shape, tokenizer: &GgufFile, path: &std::path::Path) {
    let Shape {
        layers,
        d,
        ffn,
        heads,
        kv_heads,
        rope_dims,
    } = shape;
    let head_dim = d / heads;
    let u32_key = |k: &str, v: usize| (format!("bitnet.{k}"), MetaValue::U32(v as u32));
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("bitnet".into()),
        ),
        (
            "general.name".into(),
            MetaValue::String("kiln synthetic bitnet".into()),
        ),
        u32_key("block_count", layers),
        u32_key("context_length", 512),
        u32_key("embedding_length", d),
        u32_key("feed_forward_length", ffn),
        u32_key("attention.head_count", heads),
        u32_key("attention.head_count_kv", kv_heads),
        u32_key("rope.dimension_count", rope_dims),
        ("bitnet.rope.freq_base".into(), MetaValue::F32(10_000.0)),
        (
            "bitnet.attention.layer_norm_rms_epsilon".into(),
            MetaValue::F32(1e-5),
        ),
    ];
    metadata.extend(
        tokenizer
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned(),
    );
    let vocab = tokenizer
        .tensors()
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .expect("SmolLM2 has embeddings")
        .shape[0];
    let mut tensors = vec![
        spec("token_embd.weight", QuantFormat::F16, &[vocab, d]),
        spec("output_norm.weight", QuantFormat::F32, &[d]),
    ];
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        for (name, shape) in [
            ("attn_norm", vec![d]),
            ("attn_q", vec![d, d]),
            ("attn_k", vec![kv_heads * head_dim, d]),
            ("attn_v", vec![kv_heads * head_dim, d]),
            ("attn_sub_norm", vec![d]),
            ("attn_output", vec![d, d]),
            ("ffn_norm", vec![d]),
            ("ffn_gate", vec![ffn, d]),
            ("ffn_up", vec![ffn, d]),
            ("ffn_sub_norm", vec![ffn]),
            ("ffn_down", vec![d, ffn]),
        ] {
            tensors.push(spec(&p(name), QuantFormat::F32, &shape));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(158);
    write_gguf(path, &metadata, &tensors, |i| {
        let t = &tensors[i];
        let n: usize = t.shape.iter().product();
        Ok(match (t.format, t.shape.len()) {
            (QuantFormat::F16, _) => (0..n)
                .flat_map(|_| half::f16::from_f32(rng.gen_range(-0.1..0.1)).to_le_bytes())
                .collect(),
            // Norm gains.
            (_, 1) => f32_bytes((0..n).map(|_| rng.gen_range(0.8..1.2))),
            // Ternary digits times the tensor's scale, about a third of them zero.
            _ => {
                let scale = rng.gen_range(0.1f32..0.3);
                f32_bytes((0..n).map(|_| scale * rng.gen_range(-1i32..=1) as f32))
            }
        })
    })
    .unwrap();
}

fn spec(name: &str, format: QuantFormat, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        format,
        shape: shape.to_vec(),
    }
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}
