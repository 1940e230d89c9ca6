//! `kiln chat MODEL`: an interactive conversation using the model's chat template.

use super::sampling::SamplingArgs;
use super::TokenPrinter;
use crate::model::Model;
use anyhow::{Context, Result};
use clap::Args;
use kiln_runtime::chat::{ChatError, ChatTemplate, Message};
use kiln_runtime::generate::generate;
use kiln_runtime::Sampler;
use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ChatArgs {
    pub model: PathBuf,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// A Jinja chat template file, for models without one (or to override it).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Tokens per reply at most.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Context size in tokens (0: the model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

pub fn run(args: &ChatArgs) -> Result<()> {
    let sampler_config = args.sampling.config()?;
    let model = Model::open_to_run(&args.model, &args.engine)?;
    let tokenizer = &model.tokenizer;
    let source = match &args.chat_template {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => model
            .info
            .chat_template
            .clone()
            .ok_or(ChatError::NoTemplate)?,
    };
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_text(i))
            .unwrap_or("")
            .to_string()
    };
    let template = ChatTemplate::new(
        &source,
        &token_text(tokenizer.bos()),
        &token_text(tokenizer.spec().eos),
    )?;
    let mut engine = model.executor(args.ctx, &args.engine, 1, 0)?;
    let mut sampler = Sampler::new(sampler_config);
    let mut messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    // Tokens already in the KV cache: a new turn only evaluates what differs from them.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    eprintln!("kiln chat: type a message and press Enter; an empty line or end of input quits.");
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new("user", line.trim_end()));
        let prompt = template.render(&messages, true)?;
        let mut ids = tokenizer.encode(&prompt, true);
        if let Some(bos) = tokenizer.bos() {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0); // the template wrote BOS itself
            }
        }
        anyhow::ensure!(
            !ids.is_empty(),
            "the chat template rendered an empty prompt"
        );
        let common = cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        if ids.len() + args.max_tokens > engine.max_context() {
            anyhow::bail!(
                "the conversation needs {} tokens, more than the context of {} (raise --ctx)",
                ids.len() + args.max_tokens,
                engine.max_context()
            );
        }
        let mut printer = TokenPrinter::new(tokenizer);
        let generation = generate(
            engine.as_mut(),
            tokenizer,
            &mut sampler,
            &ids[common..],
            common,
            args.max_tokens,
            |id, _| {
                printer.token(id);
                ControlFlow::Continue(())
            },
        )?;
        printer.finish()?;
        cached = ids;
        cached.extend(&generation.ids);
        messages.push(Message::new(
            "assistant",
            &tokenizer.decode(&generation.ids)?,
        ));
    }
    Ok(())
}
