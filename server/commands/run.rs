//! `kiln run MODEL -p PROMPT`: generate a continuation.

use super::sampling::SamplingArgs;
use super::TokenPrinter;
use crate::model::Model;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_runtime::generate::generate;
use kiln_runtime::Sampler;
use std::ops::ControlFlow;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RunArgs {
    pub model: PathBuf,
    /// The prompt (raw text; special tokens such as <|im_start|> are recognised).
    #[arg(short, long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Context size in tokens (0: the model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    /// Print one JSON object: prompt_ids, ids, text, and top_logits (top 5 at the first generated position).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let sampler_config = args.sampling.config()?;
    let model = Model::open_to_run(&args.model, &args.engine)?;
    let mut engine = model.executor(args.ctx, &args.engine, 1, 0)?;
    let tokenizer = &model.tokenizer;
    let prompt_ids = tokenizer.encode(&args.prompt, true);
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let mut sampler = Sampler::new(sampler_config);
    let mut printer = TokenPrinter::new(tokenizer);
    // In JSON mode nothing streams to stdout, so progress goes to stderr (drawn only on a terminal).
    let bar = match args.json {
        true => ProgressBar::new(args.max_tokens as u64).with_style(
            ProgressStyle::with_template("generating [{bar:30}] {pos}/{len} tokens, {per_sec}")
                .expect("valid template"),
        ),
        false => ProgressBar::hidden(),
    };
    let started = std::time::Instant::now();
    let result = generate(
        engine.as_mut(),
        tokenizer,
        &mut sampler,
        &prompt_ids,
        0,
        args.max_tokens,
        |id, _| {
            bar.inc(1);
            if !args.json {
                printer.token(id);
            }
            ControlFlow::Continue(())
        },
    )?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(tokens = result.ids.len(), seconds, finish = ?result.finish, "generated");
    if args.json {
        let text = tokenizer.decode(&result.ids)?;
        let top: Vec<(u32, f32)> = result.first_top_logits;
        println!(
            "{}",
            serde_json::json!({ "prompt_ids": prompt_ids, "ids": result.ids, "text": text, "top_logits": top })
        );
    } else {
        printer.finish()?;
    }
    Ok(())
}
