//! `kiln quantize MODEL.gguf --to FORMAT -o OUT.gguf`: re-quantize a model's weight matrices (test models for
//! formats no published model uses, such as the ternary ones).

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::quantize::quantize_model;
use kiln_compiler::GgufFile;
use kiln_ir::QuantFormat;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The GGUF model to read.
    pub model: PathBuf,
    /// The format to write the weight matrices in: f32, f16, q8_0, q4_0, or the ternary tq1_0, tq2_0 and i2_s
    /// (absmean ternarization, BitNet b1.58's rule: per block of 256 for tq*, one scale per tensor for i2_s, as
    /// bitnet.cpp writes it; embeddings and the LM head are kept).
    #[arg(long, value_parser = parse_format)]
    pub to: QuantFormat,
    /// Where to write the new GGUF.
    #[arg(short, long)]
    pub output: PathBuf,
}

fn parse_format(s: &str) -> Result<QuantFormat, String> {
    QuantFormat::from_name(&s.to_ascii_lowercase())
        .ok_or_else(|| format!("`{s}` is not a format kiln knows"))
}

pub fn run(args: &QuantizeArgs) -> Result<()> {
    let started = Instant::now();
    let gguf = GgufFile::open(&args.model)?;
    let bar = ProgressBar::new(gguf.tensors().len() as u64).with_style(
        ProgressStyle::with_template("quantizing [{bar:30}] {pos}/{len} tensors")
            .expect("valid template"),
    );
    let summary = quantize_model(&gguf, args.to, &args.output, |done, _| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("cannot quantize {}", args.model.display()))?;
    bar.finish_and_clear();
    let mut reasons: Vec<&str> = summary.kept.iter().map(|(_, why)| *why).collect();
    reasons.sort();
    reasons.dedup();
    for why in reasons {
        let names: Vec<&str> = summary
            .kept
            .iter()
            .filter(|(_, w)| *w == why)
            .map(|(n, _)| n.as_str())
            .collect();
        eprintln!(
            "  kept {} tensors: {why} ({}{})",
            names.len(),
            names[..names.len().min(3)].join(", "),
            if names.len() > 3 { ", ..." } else { "" }
        );
    }
    eprintln!(
        "wrote {}: {} bytes, {} weight matrices in {}, {} tensors kept, in {:.2} s",
        args.output.display(),
        summary.bytes,
        summary.quantized,
        args.to,
        summary.kept.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
