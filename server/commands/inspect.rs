//! `kiln inspect MODEL`: metadata, tensor table, and the lowered IR with `--ir`.

use crate::model::Model;
use anyhow::Result;
use clap::Args;
use kiln_compiler::GgufFile;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A GGUF model.
    pub model: PathBuf,
    /// Print the lowered IR graph (text form) instead of the tables.
    #[arg(long)]
    pub ir: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    if args.ir {
        let model = Model::open(&args.model)?;
        print!("{}", kiln_ir::text::print(&model.lowered.graph));
        return Ok(());
    }
    let gguf = GgufFile::open(&args.model)?;
    println!(
        "{}: GGUF v{}, {} bytes, alignment {}",
        args.model.display(),
        gguf.version,
        gguf.file_size(),
        gguf.alignment
    );
    println!("\nmetadata ({} keys):", gguf.metadata().len());
    let width = gguf
        .metadata()
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (key, value) in gguf.metadata() {
        println!("  {key:width$}  {value}");
    }
    println!("\ntensors ({}):", gguf.tensors().len());
    let width = gguf
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    println!(
        "  {:width$}  {:6}  {:16}  {:>12}",
        "name", "format", "shape", "bytes"
    );
    let mut total = 0;
    for t in gguf.tensors() {
        let shape = format!("{:?}", t.shape);
        println!(
            "  {:width$}  {:6}  {shape:16}  {:>12}",
            t.name,
            t.format.name(),
            t.size
        );
        total += t.size;
    }
    println!("\n{} tensor bytes", total);
    Ok(())
}
