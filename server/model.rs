//! Opening a model for the commands: read, lower, build the tokenizer.

use anyhow::{Context, Result};
use kiln_compiler::{lower, GgufFile, Lowered};
use kiln_runtime::{ReferenceExecutor, Tokenizer};
use std::path::Path;
use std::time::Instant;

pub struct Model {
    pub gguf: GgufFile,
    pub lowered: Lowered,
    pub tokenizer: Tokenizer,
}

impl Model {
    pub fn open(path: &Path) -> Result<Self> {
        let started = Instant::now();
        let gguf = GgufFile::open(path)?;
        let lowered = lower(&gguf).with_context(|| format!("cannot lower {}", path.display()))?;
        let tokenizer = Tokenizer::new(&lowered.info.tokenizer)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
        tracing::info!(
            model = %path.display(),
            architecture = %lowered.info.architecture,
            nodes = lowered.graph.len(),
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Model {
            gguf,
            lowered,
            tokenizer,
        })
    }

    /// A reference executor over this model's weights, for sequences of up to `ctx` positions
    /// (0: the model's trained context length, capped at 4096 to keep the KV cache small).
    pub fn executor(&self, ctx: usize) -> Result<ReferenceExecutor<'_>> {
        let ctx = if ctx == 0 {
            self.lowered.info.context_length.min(4096)
        } else {
            ctx
        };
        Ok(ReferenceExecutor::new(
            self.lowered.graph.clone(),
            &self.gguf,
            ctx,
        )?)
    }
}
