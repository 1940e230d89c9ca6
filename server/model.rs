//! Opening a model for the commands: a GGUF (read, lowered and compiled in memory) or a compiled plan.

use crate::commands::{DeviceArg, EngineArgs};
use anyhow::{Context, Result};
use kiln_compiler::passes::run_pipeline;
use kiln_compiler::{lower, GgufFile};
use kiln_ir::model::ModelInfo;
use kiln_ir::weights::WeightSource;
use kiln_ir::Graph;
use kiln_runtime::plan::PlanFile;
use kiln_runtime::{CpuExecutor, CudaExecutor, Engine, ReferenceExecutor, Tokenizer};
use std::path::Path;
use std::time::Instant;

/// What a model file is, told by its first bytes (not its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Gguf,
    Plan,
}

impl FileKind {
    pub fn detect(path: &Path) -> Result<Self> {
        let mut magic = [0u8; 8];
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let n = std::io::Read::read(&mut file, &mut magic)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if magic[..n].starts_with(b"GGUF") && n >= 4 {
            Ok(FileKind::Gguf)
        } else if n == 8 && magic == kiln_ir::plan::MAGIC {
            Ok(FileKind::Plan)
        } else {
            anyhow::bail!(
                "{} is neither a GGUF model nor a kiln plan (it starts with {:?})",
                path.display(),
                &magic[..n]
            )
        }
    }
}

/// Where the weights live.
pub enum Source {
    Gguf(GgufFile),
    Plan(Box<PlanFile>),
}

pub struct Model {
    pub source: Source,
    pub graph: Graph,
    pub info: ModelInfo,
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Opens a `.gguf` model or a `.plan` (told apart by their first bytes, not the file name) for inspection:
    /// a plan's weights stay in the mapped file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, None)
    }

    /// Opens a model to run as `engine` says: a plan whose code will run on the CPU gets its weights copied into
    /// huge pages (`EngineArgs::huge_pages_for`).
    pub fn open_to_run(path: &Path, engine: &EngineArgs) -> Result<Self> {
        Self::open_with(path, Some(engine))
    }

    fn open_with(path: &Path, engine: Option<&EngineArgs>) -> Result<Self> {
        let started = Instant::now();
        let (source, graph, info) = if FileKind::detect(path)? == FileKind::Plan {
            let mut plan =
                PlanFile::open(path).with_context(|| format!("cannot load {}", path.display()))?;
            if engine.is_some_and(|engine| engine.huge_pages_for(&plan.meta)) {
                let copied = Instant::now();
                let moved = plan
                    .move_to_huge_pages()
                    .with_context(|| format!("cannot load {}", path.display()))?;
                tracing::debug!(
                    moved,
                    ms = copied.elapsed().as_millis() as u64,
                    "plan weights in huge pages"
                );
            }
            let (graph, info) = (plan.graph.clone(), plan.meta.model.clone());
            (Source::Plan(Box::new(plan)), graph, info)
        } else {
            let gguf = GgufFile::open(path)?;
            let lowered =
                lower(&gguf).with_context(|| format!("cannot lower {}", path.display()))?;
            // The same passes `kiln compile` runs, so a GGUF and its plan execute the same graph.
            let graph = run_pipeline(lowered.graph, |_, _, _| {})?;
            (Source::Gguf(gguf), graph, lowered.info)
        };
        let tokenizer = Tokenizer::new(&info.tokenizer)
            .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;
        tracing::info!(
            model = %path.display(),
            architecture = %info.architecture,
            nodes = graph.len(),
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Model {
            source,
            graph,
            info,
            tokenizer,
        })
    }

    pub fn weights(&self) -> &dyn WeightSource {
        match &self.source {
            Source::Gguf(gguf) => gguf,
            Source::Plan(plan) => plan.as_ref(),
        }
    }

    /// An executor over this model's weights, for sequences of up to `ctx` positions (0: the model's trained
    /// context length, capped at 4096 to keep the KV cache small): a plan's generated code on the device
    /// `--device` picks, or the reference interpreter for GGUF files and when asked for.
    /// An executor for this model with a context of `ctx` (0: the model's, at most 4096) that keeps up to `slots`
    /// sequences at once, with `kv_positions` cached positions among them (0: a full context each), where it can
    /// (the CPU executor; the others keep one sequence).
    pub fn executor(
        &self,
        ctx: usize,
        engine: &EngineArgs,
        slots: usize,
        kv_positions: usize,
    ) -> Result<Box<dyn Engine + '_>> {
        let ctx = if ctx == 0 {
            self.info.context_length.min(4096)
        } else {
            ctx
        };
        let plan = match &self.source {
            Source::Plan(plan) if !engine.reference => plan,
            _ => {
                if let DeviceArg::Cuda(_) = engine.device {
                    anyhow::bail!("--device cuda runs compiled plans only: compile one with `kiln compile MODEL.gguf -o MODEL.plan --target cpu,cuda`");
                }
                return Ok(Box::new(ReferenceExecutor::new(
                    self.graph.clone(),
                    self.weights(),
                    ctx,
                )?));
            }
        };
        let ordinal = match engine.device {
            DeviceArg::Cpu => None,
            DeviceArg::Cuda(n) => Some(n),
            DeviceArg::Auto => plan.meta.has_cuda().then_some(0),
        };
        if let Some(ordinal) = ordinal {
            match CudaExecutor::new(plan, ordinal, ctx) {
                Ok(executor) => {
                    tracing::info!(device = %executor.describe(), "running on the GPU");
                    return Ok(Box::new(executor));
                }
                Err(e) if engine.device == DeviceArg::Auto && plan.meta.cpu_target().is_some() => {
                    tracing::warn!("cannot run on the GPU ({e}); running on the CPU instead");
                }
                Err(e) if engine.device == DeviceArg::Auto => anyhow::bail!(
                    "the plan has only CUDA code and cannot run on a GPU here ({e}); compile it for this CPU with `kiln compile MODEL.gguf --target native` (or `--target cpu,cuda` for a plan that serves on either)"
                ),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot run on cuda:{ordinal}"))),
            }
        }
        let executor =
            CpuExecutor::new(plan, engine.threads(), ctx)?.with_slots(slots, kv_positions);
        if executor.fallbacks() > 0 {
            tracing::warn!(
                launches = executor.fallbacks(),
                "the plan lacks generated code for some launches; they run the slow reference kernels"
            );
        }
        Ok(Box::new(executor))
    }
}
