//! The CPU executor: runs a plan's schedule with the generated kernels it carries, on a persistent thread pool.
//!
//! Matmul-family ops (the weight stream, nearly all of the time) run generated code: activations are quantized
//! once per launch (RMS-normalized on the way where the op has a norm prologue), then each thread computes its
//! share of output rows with the fused epilogue. The small ops (RoPE, attention, norms) run in Rust (`ops`). A
//! matmul whose function the plan lacks runs the reference code instead, and `fallbacks()` counts them.

pub mod code;
mod launch;
mod ops;
pub mod pool;

use crate::engine::{check_step, Engine, ExecError, Logits};
use crate::plan::PlanFile;
use code::NativeCode;
use kiln_ir::schedule::Slot;
use launch::Step;
use ops::KvCache;
use pool::Pool;
use std::collections::HashMap;

pub use code::KernelFn;

pub struct CpuExecutor<'p> {
    steps: Vec<Step<'p>>,
    pool: Pool,
    /// Kept alive while `steps` hold function pointers into it.
    _code: NativeCode,
    inputs: Vec<(String, Slot)>,
    logits: Slot,
    arena_bytes_per_token: usize,
    /// The activation arena, in f32 units (every slot is 4-byte aligned).
    arena: Vec<f32>,
    caches: HashMap<usize, KvCache>,
    scratch: launch::Scratch,
    vocab: usize,
    max_context: usize,
    cached: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuLoadError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("cannot map the plan's machine code executable: {0}")]
    Map(std::io::Error),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
}

impl<'p> CpuExecutor<'p> {
    pub fn new(
        plan: &'p PlanFile,
        threads: usize,
        max_context: usize,
    ) -> Result<Self, CpuLoadError> {
        plan.check_cpu_target()?;
        let code =
            NativeCode::load(plan.code_index(), plan.code_bytes()).map_err(CpuLoadError::Map)?;
        let schedule = &plan.schedule;
        let mut steps = Vec::with_capacity(schedule.launches.len());
        for launch in &schedule.launches {
            steps.push(Step::prepare(plan, launch, &code)?);
        }
        let logits = schedule
            .outputs
            .iter()
            .find(|(name, _)| name == "logits")
            .map(|(_, slot)| slot.clone())
            .ok_or(ExecError::NoOutput("logits"))?;
        let vocab = match &logits {
            Slot::Arena {
                bytes_per_token, ..
            } => bytes_per_token / 4,
            Slot::Weight(_) => return Err(ExecError::NoOutput("logits").into()),
        };
        Ok(CpuExecutor {
            steps,
            pool: Pool::new(threads),
            _code: code,
            inputs: schedule.inputs.clone(),
            logits,
            arena_bytes_per_token: schedule.arena_bytes_per_token,
            arena: Vec::new(),
            caches: HashMap::new(),
            scratch: launch::Scratch::default(),
            vocab,
            max_context,
            cached: 0,
        })
    }

    /// Launches that run reference code because the plan has no generated function for them.
    pub fn fallbacks(&self) -> usize {
        self.steps.iter().filter(|s| s.is_fallback()).count()
    }

    /// Runs the schedule for `tokens` at `start..`; with `last_only`, the final launch (the LM head) computes only
    /// the last token's row. Returns the logits rows computed.
    fn run(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError> {
        check_step(tokens, start, self.cached, self.max_context)?;
        let t = tokens.len();
        let units = (t * self.arena_bytes_per_token).div_ceil(4);
        if self.arena.len() < units {
            self.arena.resize(units, 0.0);
        }
        let positions: Vec<i32> = (start..start + t).map(|p| p as i32).collect();
        let arena = self.arena.as_mut_ptr() as *mut u8;
        for (name, slot) in &self.inputs {
            let values: Vec<i32> = match name.as_str() {
                "tokens" => tokens.iter().map(|&id| id as i32).collect(),
                _ => positions.clone(),
            };
            let ctx = launch::Ctx::new(arena, t, 0, t);
            // Slots are padded per token; the values are packed at their start.
            ctx.i32s_mut(slot)[..t].copy_from_slice(&values);
        }
        let last = self.steps.len() - 1;
        for (i, step) in self.steps.iter().enumerate() {
            let ctx = if last_only && i == last && step.writes(&self.logits) {
                launch::Ctx::new(arena, t, t - 1, 1)
            } else {
                launch::Ctx::new(arena, t, 0, t)
            };
            step.run(
                &ctx,
                &positions,
                &self.pool,
                &mut self.caches,
                &mut self.scratch,
            )?;
        }
        self.cached = start + t;
        let (first_row, rows) = if last_only { (t - 1, 1) } else { (0, t) };
        let ctx = launch::Ctx::new(arena, t, first_row, rows);
        Ok(Logits {
            vocab: self.vocab,
            data: ctx.f32s(&self.logits).to_vec(),
        })
    }
}

impl Engine for CpuExecutor<'_> {
    fn step(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError> {
        self.run(tokens, start, last_only)
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
