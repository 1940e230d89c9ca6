//! Hyperparameters, read from `{arch}.*` metadata keys with clear errors for missing or inconsistent ones.

use super::LowerError;
use crate::gguf::GgufFile;

#[derive(Clone, Debug)]
pub struct Hyperparameters {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ffn: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    /// Linear RoPE scaling of global layers: 1 / `rope.scaling.factor`, 1 when absent.
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub sliding_window: Option<usize>,
}

/// Typed access to `{arch}.KEY` metadata.
pub struct Meta<'a> {
    pub gguf: &'a GgufFile,
    pub arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    pub fn usize(&self, key: &str) -> Result<Option<usize>, LowerError> {
        let full = self.key(key);
        match self.gguf.get(&full) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| LowerError::Metadata {
                    key: full,
                    reason: format!("must be a non-negative integer, is {} {v}", v.type_name()),
                }),
        }
    }

    pub fn required_usize(&self, key: &str) -> Result<usize, LowerError> {
        self.usize(key)?.ok_or_else(|| LowerError::Metadata {
            key: self.key(key),
            reason: "missing".into(),
        })
    }

    pub fn f32(&self, key: &str) -> Result<Option<f32>, LowerError> {
        let full = self.key(key);
        match self.gguf.get(&full) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| LowerError::Metadata {
                    key: full,
                    reason: format!("must be a number, is {} {v}", v.type_name()),
                }),
        }
    }
}

impl Hyperparameters {
    pub fn read(meta: &Meta) -> Result<Self, LowerError> {
        let n_layers = meta.required_usize("block_count")?;
        let d_model = meta.required_usize("embedding_length")?;
        let d_ffn = meta.required_usize("feed_forward_length")?;
        let n_heads = meta.required_usize("attention.head_count")?;
        let n_kv_heads = meta.usize("attention.head_count_kv")?.unwrap_or(n_heads);
        let inconsistent = |key: &str, reason: String| LowerError::Metadata {
            key: format!("{}.{key}", meta.arch),
            reason,
        };
        if n_layers == 0 || d_model == 0 || d_ffn == 0 {
            return Err(inconsistent(
                "block_count",
                "layer count and widths must be positive".into(),
            ));
        }
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(inconsistent(
                "attention.head_count_kv",
                format!(
                    "{n_kv_heads} kv heads must be positive and divide the {n_heads} query heads"
                ),
            ));
        }
        let head_dim = match meta.usize("attention.key_length")? {
            Some(k) => k,
            None if d_model % n_heads == 0 => d_model / n_heads,
            None => {
                return Err(inconsistent(
                    "attention.head_count",
                    format!("{n_heads} heads do not divide d_model {d_model}"),
                ))
            }
        };
        if let Some(v) = meta.usize("attention.value_length")? {
            if v != head_dim {
                return Err(inconsistent(
                    "attention.value_length",
                    format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        let rope_dims = meta.usize("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(inconsistent(
                "rope.dimension_count",
                format!("{rope_dims} must be even and at most the head dim {head_dim}"),
            ));
        }
        let scaling_type = meta
            .gguf
            .get(&format!("{}.rope.scaling.type", meta.arch))
            .and_then(|v| v.as_str());
        if let Some(t) = scaling_type.filter(|t| !matches!(*t, "none" | "linear")) {
            return Err(inconsistent(
                "rope.scaling.type",
                format!("`{t}` RoPE scaling is not supported (none, linear)"),
            ));
        }
        let rope_freq_scale = match meta.f32("rope.scaling.factor")? {
            Some(f) if f > 0.0 => 1.0 / f,
            Some(f) => {
                return Err(inconsistent(
                    "rope.scaling.factor",
                    format!("must be positive, is {f}"),
                ))
            }
            None => 1.0,
        };
        Ok(Hyperparameters {
            n_layers,
            d_model,
            d_ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            rope_base: meta.f32("rope.freq_base")?.unwrap_or(10_000.0),
            rope_freq_scale,
            rms_eps: meta
                .f32("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            context_length: meta.usize("context_length")?.unwrap_or(2048),
            sliding_window: meta.usize("attention.sliding_window")?,
        })
    }
}
