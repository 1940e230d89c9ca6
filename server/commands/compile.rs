//! `kiln compile MODEL.gguf -o MODEL.plan`: compile a model offline into a plan file.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::passes::{choose_layouts, run_pipeline, schedule, INTERLEAVE};
use kiln_compiler::plan_writer::write_plan;
use kiln_compiler::{lower, GgufFile};
use kiln_ir::plan::{PlanMeta, Target};
use kiln_ir::schedule::Schedule;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetArg {
    /// Any CPU of this architecture (no ISA extensions required).
    Cpu,
    /// This host's CPU, with every ISA extension it has.
    Native,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The GGUF model to compile.
    pub model: PathBuf,
    /// Where to write the plan.
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = TargetArg::Cpu)]
    pub target: TargetArg,
    /// Write the IR after each stage (`00-lowered.kir`, ...) and the final graph as Graphviz (`final.dot`) and
    /// JSON (`final.json`) into DIR.
    #[arg(long, value_name = "DIR")]
    pub dump_ir: Option<PathBuf>,
}

pub fn run(args: &CompileArgs) -> Result<()> {
    let started = Instant::now();
    let gguf = GgufFile::open(&args.model)?;
    let lowered = lower(&gguf).with_context(|| format!("cannot lower {}", args.model.display()))?;
    eprintln!(
        "lowered {} ({}): {} nodes",
        args.model.display(),
        lowered.info.architecture,
        lowered.graph.len()
    );
    let target = match args.target {
        TargetArg::Cpu => Target::Cpu {
            arch: std::env::consts::ARCH.to_string(),
            features: Vec::new(),
        },
        TargetArg::Native => kiln_runtime::plan::host_target(),
    };
    let mut stages = vec![("00-lowered".to_string(), lowered.graph.clone())];
    let graph = run_pipeline(lowered.graph, |i, name, graph| {
        eprintln!("  pass {i:>2} {name:<14} {} nodes", graph.len());
        if args.dump_ir.is_some() {
            stages.push((format!("{i:02}-{name}"), graph.clone()));
        }
    })?;
    let layouts = choose_layouts(&graph);
    eprintln!(
        "  layout: {} weights repacked (f32 block scales, rows interleaved by {INTERLEAVE})",
        layouts.len()
    );
    let schedule = schedule(&graph, &target, &layouts)?;
    eprintln!(
        "  scheduled: {} launches of {} distinct kernels; arena {} bytes per token ({} at 512 tokens)",
        schedule.launches.len(),
        schedule.kernels.len(),
        schedule.arena_bytes_per_token,
        schedule.arena_bytes_per_token * 512
    );
    if let Some(dir) = &args.dump_ir {
        dump_ir(dir, &stages, &schedule)?;
        eprintln!("  wrote the IR after each stage to {}", dir.display());
    }
    let meta = PlanMeta {
        compiler: env!("CARGO_PKG_VERSION").to_string(),
        target,
        model: lowered.info,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("writing weights [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    let summary = write_plan(
        &args.output,
        &meta,
        &graph,
        &schedule,
        &layouts,
        &gguf,
        |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} bytes ({} weights, {} weight bytes) for {} in {:.2} s",
        args.output.display(),
        summary.bytes,
        summary.weights,
        summary.weight_bytes,
        meta.target,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes each stage's IR text, the schedule, and the final graph as Graphviz dot and JSON.
fn dump_ir(
    dir: &std::path::Path,
    stages: &[(String, kiln_ir::Graph)],
    schedule: &Schedule,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: String, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    for (name, graph) in stages {
        write(format!("{name}.kir"), kiln_ir::text::print(graph))?;
    }
    write(
        format!("{:02}-schedule.txt", stages.len()),
        crate::commands::inspect::schedule_text(schedule),
    )?;
    if let Some((_, last)) = stages.last() {
        write("final.dot".into(), kiln_ir::dot::print(last))?;
        write("final.json".into(), serde_json::to_string_pretty(last)?)?;
    }
    Ok(())
}
