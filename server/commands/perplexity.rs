//! `kiln perplexity MODEL --file PATH --ctx N`: llama-perplexity's method.

use crate::model::Model;
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::generate::perplexity;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    pub model: PathBuf,
    /// The text to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long)]
    pub ctx: usize,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    /// Score at most this many chunks (default: all the text holds).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print `{"ppl": x, "pm": y, "chunks": k}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PerplexityArgs) -> Result<()> {
    anyhow::ensure!(args.ctx >= 4, "--ctx must be at least 4, is {}", args.ctx);
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let model = Model::open_to_run(&args.model, &args.engine)?;
    let tokenizer = &model.tokenizer;
    let tokens = tokenizer.encode(&text, false);
    let available = tokens.len() / args.ctx;
    anyhow::ensure!(
        available > 0,
        "{} holds {} tokens, fewer than one chunk of --ctx {}",
        args.file.display(),
        tokens.len(),
        args.ctx
    );
    let chunks = args.chunks.map_or(available, |c| c.min(available));
    let mut engine = model.executor(args.ctx, &args.engine, 1, 0)?;
    let bar = ProgressBar::new(chunks as u64).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} chunks, {elapsed} elapsed, ~{eta} left",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("perplexity over {} tokens", tokens.len()));
    let bos = tokenizer
        .spec()
        .add_bos
        .then_some(tokenizer.bos())
        .flatten();
    let result = perplexity(
        engine.as_mut(),
        &tokens,
        args.ctx,
        Some(chunks),
        bos,
        |_, ppl| {
            bar.set_message(format!("PPL {ppl:.4}"));
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "ppl": result.ppl, "pm": result.pm, "chunks": result.chunks })
        );
    } else {
        println!(
            "PPL = {:.4} ± {:.4} ({} chunks of {} tokens, {} scored)",
            result.ppl, result.pm, result.chunks, args.ctx, result.scored_tokens
        );
    }
    Ok(())
}
