//! `kiln compile MODEL.gguf -o MODEL.plan`: compile a model offline into a plan file.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::codegen::{generate_cpu_code, generate_cuda_code};
use kiln_compiler::passes::{compile, Readers, Stage, INTERLEAVE};
use kiln_compiler::plan_writer::{write_plan, PlanCode};
use kiln_compiler::{lower, GgufFile};
use kiln_ir::plan::{PlanMeta, Target};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetArg {
    /// This host's CPU, with every ISA extension it has (AVX-512 and VNNI where present).
    Native,
    /// Any server CPU of this architecture from the last decade (x86-64-v3: AVX2, FMA, BMI2), for plans that are
    /// compiled once and served on many machines.
    Cpu,
    /// NVIDIA GPUs from Ampere on: CUDA kernels compiled by NVRTC to PTX for compute_80 and compute_90 (needs
    /// libnvrtc at compile time only; see the README).
    Cuda,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The GGUF model to compile.
    pub model: PathBuf,
    /// Where to write the plan.
    #[arg(short, long)]
    pub output: PathBuf,
    /// What to generate code for, comma-separated: one CPU target (`native` or `cpu`) and/or `cuda`. A plan
    /// with both (`--target cpu,cuda`) serves on either.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "native")]
    pub target: Vec<TargetArg>,
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
    let cpu_targets: Vec<TargetArg> = args
        .target
        .iter()
        .copied()
        .filter(|t| !matches!(t, TargetArg::Cuda))
        .collect();
    if cpu_targets.len() > 1 {
        anyhow::bail!(
            "--target names {} CPU targets; a plan carries at most one (`native` or `cpu`)",
            cpu_targets.len()
        );
    }
    let isa = match cpu_targets.first() {
        Some(TargetArg::Native) => Some(kiln_codegen_cpu::host_isa()?),
        Some(TargetArg::Cpu) => Some(kiln_codegen_cpu::portable_isa()?),
        _ => None,
    };
    let cuda = args.target.iter().any(|t| matches!(t, TargetArg::Cuda));
    let mut dumps = vec![(
        "00-lowered.kir".to_string(),
        kiln_ir::text::print(&lowered.graph),
    )];
    let readers = if cuda {
        Readers::WithCuda
    } else {
        Readers::Cpu
    };
    let compiled = compile(lowered.graph, readers, &gguf, |i, name, stage| {
        let (summary, dump) = match stage {
            Stage::Graph(graph) => (format!("{} nodes", graph.len()), kiln_ir::text::print(graph)),
            Stage::Layouts(layouts) => (
                format!("{} weights repacked (rows interleaved by {INTERLEAVE}, block scales moved)", layouts.len()),
                layouts.iter().map(|(name, layout)| format!("@{name} {layout}\n")).collect(),
            ),
            Stage::Schedule(schedule) => (
                format!(
                    "{} launches of {} distinct kernels; arena {} bytes per token ({} at 512 tokens)",
                    schedule.launches.len(),
                    schedule.kernels.len(),
                    schedule.arena_bytes_per_token,
                    schedule.arena_bytes_per_token * 512
                ),
                crate::commands::inspect::schedule_text(schedule),
            ),
        };
        eprintln!("  {i:>2} {name:<13} {summary}");
        let extension = if matches!(stage, Stage::Graph(_)) {
            "kir"
        } else {
            "txt"
        };
        dumps.push((format!("{i:02}-{name}.{extension}"), dump));
    })?;
    if let Some(dir) = &args.dump_ir {
        dump_ir(dir, &dumps, &compiled.graph)?;
        eprintln!("  wrote the IR after each stage to {}", dir.display());
    }
    let mut targets = Vec::new();
    let mut code = PlanCode::default();
    if let Some(isa) = &isa {
        let started = Instant::now();
        code = generate_cpu_code(&compiled.graph, &compiled.layouts, isa, |done, total| {
            if done == total {
                eprintln!(
                    "  generated {total} native functions with Cranelift in {:.0} ms",
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
        })?;
        targets.push(Target::Cpu {
            arch: isa.arch(),
            features: isa.features(),
        });
    }
    if cuda {
        let started = Instant::now();
        let cuda_code = generate_cuda_code(&compiled.graph, &compiled.layouts, |done, total| {
            eprintln!(
                "  compiled the CUDA module with NVRTC for {done}/{total} architectures ({:.0} ms)",
                started.elapsed().as_secs_f64() * 1e3
            );
        })?;
        eprintln!(
            "  generated {} CUDA kernels ({} lines of CUDA C)",
            cuda_code.kernels.len(),
            cuda_code.source.lines().count()
        );
        targets.push(Target::Cuda {
            archs: cuda_code.ptx.iter().map(|p| p.arch.clone()).collect(),
        });
        code.cuda = Some(cuda_code);
    }
    let meta = PlanMeta {
        compiler: env!("CARGO_PKG_VERSION").to_string(),
        targets,
        model: lowered.info,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("writing weights [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    let summary = write_plan(
        &args.output,
        &meta,
        &compiled,
        &code,
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
        meta.targets_text(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes each stage's dump, then the final graph as Graphviz dot and JSON.
fn dump_ir(
    dir: &std::path::Path,
    dumps: &[(String, String)],
    graph: &kiln_ir::Graph,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    for (name, text) in dumps {
        write(name, text)?;
    }
    write("final.dot", &kiln_ir::dot::print(graph))?;
    write("final.json", &serde_json::to_string_pretty(graph)?)
}
