//! The CPU executor: runs a plan's schedule with the generated kernels it carries, on a persistent thread pool.
//!
//! Matmul-family ops (the weight stream, nearly all of the time) run generated code: activations are quantized
//! once per launch (RMS-normalized on the way where the op has a norm prologue), then each thread computes its
//! share of output rows with the fused epilogue. Attention runs the plan's generated function once per token and KV
//! head, for the query heads of its group, over the paged KV cache; RoPE and norms run generated functions too, and
//! the elementwise odds and ends run in Rust (`ops`). A matmul whose function the plan lacks runs the reference
//! code instead, and `fallbacks()` counts them; attention without one runs `ops::attend`.
//!
//! What follows a launch's matmuls (QK-norm and RoPE, a post-norm and its residual) runs on the pool in pieces of
//! tokens, with RoPE tables built once per step. Activations live in one arena planned per token, except the
//! logits: a prompt wants only its last row, and a row per token of a 262144-entry vocabulary would be a MiB each.
//!
//! With `with_slots`, one step may carry tokens of several sequences (`step_batch`): rows of the same launches,
//! each token attending within its own sequence through the paged KV cache (`kv`).

pub mod code;
mod kv;
mod launch;
mod ops;
pub mod pool;

use crate::engine::{check_step, Engine, ExecError, KernelTime, KvBudget, Logits, SeqTokens};
use crate::plan::PlanFile;
use code::NativeCode;
use kiln_ir::schedule::Slot;
use kv::PagedKv;
use launch::Step;
use pool::Pool;
use std::time::Instant;

pub use code::KernelFn;

pub struct CpuExecutor<'p> {
    steps: Vec<Step<'p>>,
    pool: Pool,
    /// Kept alive while `steps` hold function pointers into it.
    _code: NativeCode,
    inputs: Vec<(String, Slot)>,
    logits: Slot,
    /// Per token of the arena, which holds every slot but the logits.
    arena_bytes_per_token: usize,
    /// The activation arena, in f32 units (every slot is 4-byte aligned).
    arena: Vec<f32>,
    /// The logits of the rows the LM head computes, kept out of the arena: a prefill wants only its last row,
    /// and a vocabulary of 262144 would otherwise take a MiB of arena per prompt token.
    logits_rows: Vec<f32>,
    kv: PagedKv,
    scratch: launch::Scratch,
    vocab: usize,
    max_context: usize,
    /// Positions cached per sequence slot; its length is the number of slots.
    cached: Vec<usize>,
    /// Each schedule kernel's launches and time while profiling, since the profile was last taken.
    kernels: Vec<KernelTime>,
    profiling: bool,
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
        if schedule.launches.last().map(|l| &l.output) != Some(&logits) {
            return Err(ExecError::OutputNotLast("logits").into());
        }
        let arena_bytes_per_token = schedule.arena_bytes_per_token_without(&logits);
        Ok(CpuExecutor {
            steps,
            pool: Pool::new(threads),
            _code: code,
            inputs: schedule.inputs.clone(),
            logits,
            arena_bytes_per_token,
            arena: Vec::new(),
            logits_rows: Vec::new(),
            kv: PagedKv::new(1, max_context),
            scratch: launch::Scratch::default(),
            vocab,
            max_context,
            cached: vec![0],
            kernels: schedule
                .kernels
                .iter()
                .enumerate()
                .map(|(kernel, k)| KernelTime {
                    kernel,
                    spec: k.to_string(),
                    launches: 0,
                    seconds: 0.0,
                })
                .collect(),
            profiling: false,
        })
    }

    /// Keeps `slots` sequences at once (for `step_batch`), with room for `kv_positions` cached positions among
    /// them all (0: every slot's full context). The KV cache is paged: memory follows the positions in use, and a
    /// released sequence's pages serve the next.
    pub fn with_slots(mut self, slots: usize, kv_positions: usize) -> Self {
        let slots = slots.max(1);
        let capacity = match kv_positions {
            0 => slots * self.max_context,
            n => n,
        };
        self.cached = vec![0; slots];
        self.kv = PagedKv::new(slots, capacity);
        self
    }

    /// Launches that run reference code because the plan has no generated function for them.
    pub fn fallbacks(&self) -> usize {
        self.steps.iter().filter(|s| s.is_fallback()).count()
    }

    /// Runs the schedule for the sequences of `batch`, their tokens one after another; the final launch (the LM
    /// head) computes only the rows from `logits_from` on, which it returns. Every op works token by token (or,
    /// for attention, within each token's own sequence), so a row's result does not depend on the rest.
    fn run(&mut self, batch: &[SeqTokens], logits_from: usize) -> Result<Logits, ExecError> {
        let slots = self.cached.len();
        for (i, s) in batch.iter().enumerate() {
            let cached = *self.cached.get(s.slot).ok_or(ExecError::NoSlot {
                slot: s.slot,
                slots,
            })?;
            check_step(s.tokens, s.start, cached, self.max_context)?;
            assert!(
                batch[..i].iter().all(|other| other.slot != s.slot),
                "a batch holds each sequence once"
            );
        }
        let mut tokens = Vec::new();
        let (mut positions, mut token_slots) = (Vec::new(), Vec::new());
        for s in batch {
            tokens.extend(s.tokens.iter().map(|&id| id as i32));
            positions.extend((s.start..s.start + s.tokens.len()).map(|p| p as i32));
            token_slots.extend(std::iter::repeat_n(s.slot, s.tokens.len()));
        }
        let t = tokens.len();
        let units = (t * self.arena_bytes_per_token).div_ceil(4);
        if self.arena.len() < units {
            self.arena.resize(units, 0.0);
        }
        let logits_len = (t - logits_from) * self.vocab;
        if self.logits_rows.len() < logits_len {
            self.logits_rows.resize(logits_len, 0.0);
        }
        let arena = self.arena.as_mut_ptr() as *mut u8;
        for (name, slot) in &self.inputs {
            let values = match name.as_str() {
                "tokens" => &tokens,
                _ => &positions,
            };
            let ctx = launch::Ctx::new(arena, t, 0, t);
            // Slots are padded per token; the values are packed at their start.
            ctx.i32s_mut(slot)[..t].copy_from_slice(values);
        }
        let last = self.steps.len() - 1;
        for (i, step) in self.steps.iter().enumerate() {
            let ctx = if i == last {
                let logits = self.logits_rows.as_mut_ptr() as *mut u8;
                launch::Ctx::new(arena, t, logits_from, t - logits_from)
                    .with_apart(&self.logits, logits)
            } else {
                launch::Ctx::new(arena, t, 0, t)
            };
            let started = self.profiling.then(Instant::now);
            step.run(
                &ctx,
                &positions,
                &token_slots,
                &self.pool,
                &mut self.kv,
                &mut self.scratch,
            )?;
            if let Some(started) = started {
                let kernel = &mut self.kernels[step.kernel()];
                kernel.launches += 1;
                kernel.seconds += started.elapsed().as_secs_f64();
            }
        }
        for s in batch {
            self.cached[s.slot] = s.start + s.tokens.len();
        }
        Ok(Logits {
            vocab: self.vocab,
            data: self.logits_rows[..logits_len].to_vec(),
        })
    }
}

impl Engine for CpuExecutor<'_> {
    fn step(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError> {
        let seq = SeqTokens {
            slot: 0,
            tokens,
            start,
        };
        let from = if last_only {
            tokens.len().max(1) - 1
        } else {
            0
        };
        self.run(&[seq], from)
    }

    fn slots(&self) -> usize {
        self.cached.len()
    }

    fn kv_budget(&self) -> Option<KvBudget> {
        Some(KvBudget {
            positions: self.kv.pages().1 * kv::PAGE,
            page: kv::PAGE,
        })
    }

    fn set_profiling(&mut self, on: bool) -> bool {
        self.profiling = on;
        true
    }

    fn take_profile(&mut self) -> Vec<KernelTime> {
        let mut times: Vec<KernelTime> = self
            .kernels
            .iter_mut()
            .filter(|k| k.launches > 0)
            .map(|k| KernelTime {
                kernel: k.kernel,
                spec: k.spec.clone(),
                launches: std::mem::take(&mut k.launches),
                seconds: std::mem::take(&mut k.seconds),
            })
            .collect();
        times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        times
    }

    fn release(&mut self, slot: usize) {
        self.kv.release(slot);
        self.cached[slot] = 0;
    }

    /// One step for the whole batch. The LM head runs from the first sequence's last token on: with a prompt
    /// chunk first and single decode tokens after it (how the server batches), exactly the rows wanted.
    fn step_batch(&mut self, batch: &[SeqTokens]) -> Result<Vec<Vec<f32>>, ExecError> {
        let Some(first) = batch.first() else {
            return Ok(Vec::new());
        };
        let from = first.tokens.len().max(1) - 1;
        let logits = self.run(batch, from)?;
        let mut last = from;
        let mut rows = Vec::with_capacity(batch.len());
        for (i, s) in batch.iter().enumerate() {
            if i > 0 {
                last += s.tokens.len();
            }
            let at = (last - from) * self.vocab;
            rows.push(logits.data[at..at + self.vocab].to_vec());
        }
        Ok(rows)
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
