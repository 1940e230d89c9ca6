//! One module per `kiln` subcommand.

pub mod bench;
pub mod chat;
pub mod compile;
pub mod inspect;
pub mod perplexity;
pub mod quantize;
pub mod run;
pub mod sampling;
pub mod tokenize;

use clap::Args;
use kiln_runtime::tokenizer::StreamDecoder;
use kiln_runtime::Tokenizer;
use std::io::Write;

/// How a model is executed: shared by every command that runs one.
#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// Threads for a plan's generated code (0: one per core). The reference interpreter uses one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Run a plan on the reference interpreter (plain f32 arithmetic, one thread) instead of its generated code:
    /// slow, but the yardstick the generated code is tested against. GGUF files always run on it.
    #[arg(long)]
    pub reference: bool,
    /// Where a plan runs: `cpu`, `cuda` (GPU 0) or `cuda:N`, or `auto`: the GPU when the plan has CUDA code and
    /// one is usable, else the CPU (with one warning line saying why when the plan has CUDA code).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Serve a plan's weights straight from the mapped file instead of copying them into huge pages when it runs
    /// on the CPU: no private copy (processes that map one plan share its page cache), but decode is slower by
    /// however much of the file the kernel did not cache in 2 MiB pages (up to about 6% on SmolLM2).
    #[arg(long)]
    pub mapped_weights: bool,
}

/// Where to run a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceArg {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s {
        "auto" => Ok(DeviceArg::Auto),
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
    }
}

impl EngineArgs {
    /// Whether a plan with `meta` gets its weights copied into huge pages: where its generated code runs on the
    /// CPU (a GPU reads its own copy) and `--mapped-weights` is not given.
    pub fn huge_pages_for(&self, meta: &kiln_ir::plan::PlanMeta) -> bool {
        let on_cpu = match self.device {
            DeviceArg::Cpu => true,
            DeviceArg::Cuda(_) => false,
            DeviceArg::Auto => !meta.has_cuda(),
        };
        on_cpu && !self.reference && !self.mapped_weights
    }

    /// The threads to run on: `--threads`, or one per core.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Writes generated tokens to stdout as text as they come, holding back incomplete UTF-8 sequences.
pub struct TokenPrinter<'t> {
    tokenizer: &'t Tokenizer,
    stream: StreamDecoder,
    stdout: std::io::Stdout,
}

impl<'t> TokenPrinter<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TokenPrinter {
            tokenizer,
            stream: StreamDecoder::default(),
            stdout: std::io::stdout(),
        }
    }

    pub fn token(&mut self, id: u32) {
        let text = self
            .tokenizer
            .token_bytes(id)
            .map(|b| self.stream.push(&b))
            .unwrap_or_default();
        // A closed stdout (e.g. piped to `head`) ends the output, not the generation.
        let _ = write!(self.stdout, "{text}").and_then(|_| self.stdout.flush());
    }

    /// Prints what is held back, and a newline.
    pub fn finish(&mut self) -> std::io::Result<()> {
        writeln!(self.stdout, "{}", self.stream.finish())
    }
}
