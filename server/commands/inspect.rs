//! `kiln inspect MODEL|PLAN`: what a model or plan holds, or its IR with `--ir`.

use crate::model::{FileKind, Model};
use anyhow::Result;
use clap::Args;
use kiln_compiler::GgufFile;
use kiln_ir::schedule::{Schedule, Slot};
use kiln_runtime::plan::PlanFile;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A GGUF model or a compiled plan.
    pub model: PathBuf,
    /// Print the IR graph that runs (text form) instead of the tables: a plan's graph, or a GGUF's after the
    /// compiler's passes (`kiln compile --dump-ir` shows every stage).
    #[arg(long, group = "graph_form")]
    pub ir: bool,
    /// Print that graph as Graphviz dot (`kiln inspect M --dot | dot -Tsvg > graph.svg`).
    #[arg(long, group = "graph_form")]
    pub dot: bool,
    /// Print that graph as JSON.
    #[arg(long, group = "graph_form")]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    if args.ir || args.dot || args.json {
        let graph = Model::open(&args.model)?.graph;
        match (args.dot, args.json) {
            (true, _) => print!("{}", kiln_ir::dot::print(&graph)),
            (_, true) => println!("{}", serde_json::to_string_pretty(&graph)?),
            _ => print!("{}", kiln_ir::text::print(&graph)),
        }
        return Ok(());
    }
    match FileKind::detect(&args.model)? {
        FileKind::Plan => inspect_plan(&args.model),
        FileKind::Gguf => inspect_gguf(&args.model),
    }
}

fn inspect_plan(path: &Path) -> Result<()> {
    let plan = PlanFile::open(path)?;
    let meta = &plan.meta;
    println!(
        "{}: kiln plan, format version {}, {} bytes",
        path.display(),
        kiln_ir::plan::FORMAT_VERSION,
        plan.file_size()
    );
    println!("  compiled by  kiln {}", meta.compiler);
    println!("  targets      {}", meta.targets_text());
    println!(
        "  model        {} ({})",
        meta.model.name.as_deref().unwrap_or("unnamed"),
        meta.model.architecture
    );
    println!(
        "  graph        {} nodes, {} weights",
        plan.graph.len(),
        plan.graph.weights().len()
    );
    println!("\nsections:");
    println!(
        "  {:12}  {:>12}  {:>12}  checksum (xxh3)",
        "name", "offset", "bytes"
    );
    for (name, offset, len, checksum) in plan.sections() {
        println!("  {name:12}  {offset:>12}  {len:>12}  {checksum:016x}");
    }
    print!("{}", schedule_text(&plan.schedule));
    if let Some(cuda) = plan.cuda() {
        let ptx: Vec<String> = cuda
            .ptx
            .iter()
            .map(|p| format!("{} {} bytes", p.arch, p.ptx.len()))
            .collect();
        println!(
            "\ncuda kernels ({}, {} lines of CUDA C; PTX: {}):",
            cuda.kernels.len(),
            cuda.source.lines().count(),
            ptx.join(", ")
        );
        for kernel in &cuda.kernels {
            println!("  {kernel}");
        }
    }
    println!("\nweights ({}):", plan.weight_entries().len());
    let width = plan
        .weight_entries()
        .iter()
        .map(|w| w.name.len())
        .max()
        .unwrap_or(0);
    for w in plan.weight_entries() {
        println!(
            "  {:width$}  {:6}  {:16}  {:>12}",
            w.name,
            w.format.name(),
            format!("{:?}", w.shape),
            w.len
        );
    }
    Ok(())
}

/// The kernels, launches and memory plan of a schedule, as `inspect` and `compile --dump-ir` show them.
pub fn schedule_text(schedule: &Schedule) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let per_token = schedule.arena_bytes_per_token;
    writeln!(out, "\nmemory plan: one arena of {per_token} bytes per token ({} KiB at 1 token, {} MiB at 512)", per_token / 1024, (per_token * 512) >> 20).unwrap();
    if let Some((_, logits)) = schedule.outputs.iter().find(|(name, _)| name == "logits") {
        let rest = schedule.arena_bytes_per_token_without(logits);
        writeln!(out, "  the CPU executor keeps the logits apart, for the rows it computes (a prompt's last), and the rest in {rest} bytes per token ({} MiB at 512)", (rest * 512) >> 20).unwrap();
    }
    writeln!(
        out,
        "\nkernels ({} distinct, {} launches):",
        schedule.kernels.len(),
        schedule.launches.len()
    )
    .unwrap();
    for (i, spec) in schedule.kernels.iter().enumerate() {
        let uses = schedule.launches.iter().filter(|l| l.kernel == i).count();
        writeln!(out, "  k{i:<3} x{uses:<4} {spec}").unwrap();
    }
    writeln!(out, "\nlaunches:").unwrap();
    let slot = |s: &Slot| match s {
        Slot::Arena {
            offset_per_token,
            bytes_per_token,
        } => format!("arena[{offset_per_token}+{bytes_per_token}]"),
        Slot::Weight(name) => format!("@{name}"),
    };
    for l in &schedule.launches {
        let operands: Vec<String> = l.operands.iter().map(slot).collect();
        let layer = l.layer.map(|n| format!(" layer {n}")).unwrap_or_default();
        writeln!(
            out,
            "  %{:<4} k{:<3}{layer} ({}) -> {}",
            l.node,
            l.kernel,
            operands.join(", "),
            slot(&l.output)
        )
        .unwrap();
    }
    out
}

fn inspect_gguf(path: &Path) -> Result<()> {
    let gguf = GgufFile::open(path)?;
    println!(
        "{}: GGUF v{}, {} bytes, alignment {}",
        path.display(),
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
        println!(
            "  {:width$}  {:6}  {:16}  {:>12}",
            t.name,
            t.format.name(),
            format!("{:?}", t.shape),
            t.size
        );
        total += t.size;
    }
    println!("\n{total} tensor bytes");
    Ok(())
}
