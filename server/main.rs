//! `kiln`: compile, inspect and run quantized LLMs.

mod commands;
mod model;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "A compiler and runtime for quantized LLMs (GGUF models)."
)]
struct Cli {
    /// Log lines on stderr as text or as JSON objects (one per line). KILN_LOG sets the level filter
    /// (default: info for `serve`, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compile a GGUF model into a plan file.
    Compile(commands::compile::CompileArgs),
    /// Show what a model or plan holds (metadata, tensors, sections), or its IR (--ir).
    Inspect(commands::inspect::InspectArgs),
    /// Show the token ids (and pieces) of a text.
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Generate text from a prompt.
    Run(commands::run::RunArgs),
    /// Chat interactively, using the model's chat template.
    Chat(commands::chat::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure perplexity over a text file (llama-perplexity's method).
    Perplexity(commands::perplexity::PerplexityArgs),
    /// Measure prefill and decode speed, time to first token and peak memory.
    Bench(commands::bench::BenchArgs),
    /// Re-quantize a GGUF model's weight matrices to another format (q8_0, q4_0, tq1_0, tq2_0, i2_s, ...).
    Quantize(commands::quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of stdout goes away (`kiln inspect M | head`)
    // instead of failing a write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| default_level.into());
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let result = match &cli.command {
        Command::Compile(args) => commands::compile::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Serve(args) => serve::run(args, matches!(cli.log_format, LogFormat::Json)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, joined.
            eprintln!("error: {}", format!("{error:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
