//! The interface every executor offers: run a step of tokens of one sequence, get logits; and, where the executor
//! keeps several sequences, a step of tokens from many at once.

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("weight `{0}` is missing from the model")]
    MissingWeight(String),
    #[error("weight `{name}` is {found}, the graph expects {expected}")]
    WeightMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("context full: position {need} is past the context size {max} (raise --ctx or shorten the input)")]
    ContextFull { need: usize, max: usize },
    #[error("sequence position {start} skips ahead of the {cached} cached tokens")]
    PositionGap { start: usize, cached: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("the graph has no `{0}` output")]
    NoOutput(&'static str),
    #[error("the `{0}` output is not what the schedule's last launch writes")]
    OutputNotLast(&'static str),
    #[error("nothing to run: the input has no tokens")]
    EmptyInput,
    #[error("the GPU failed while {doing}: {reason}")]
    Device { doing: &'static str, reason: String },
    #[error("sequence slot {slot} does not exist (this executor keeps {slots})")]
    NoSlot { slot: usize, slots: usize },
    #[error(
        "the KV cache is full ({positions} positions in all sequences; raise --kv-cache-tokens)"
    )]
    KvFull { positions: usize },
}

/// How many positions an executor's KV cache holds among all its sequences, handed out in pages of `page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBudget {
    pub positions: usize,
    pub page: usize,
}

/// One sequence's part of a batched step: `tokens` at positions `start..` of the sequence in cache slot `slot`.
#[derive(Clone, Copy, Debug)]
pub struct SeqTokens<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub start: usize,
}

/// Checks a step of `tokens` at `start..` against a sequence with `cached` positions in a context of `max`.
pub fn check_step(
    tokens: &[u32],
    start: usize,
    cached: usize,
    max: usize,
) -> Result<(), ExecError> {
    if tokens.is_empty() {
        return Err(ExecError::EmptyInput);
    }
    if start > cached {
        return Err(ExecError::PositionGap { start, cached });
    }
    if start + tokens.len() > max {
        return Err(ExecError::ContextFull {
            need: start + tokens.len(),
            max,
        });
    }
    Ok(())
}

/// Logits for each token of a step, row-major `[rows, vocab]`.
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn rows(&self) -> usize {
        self.data.len() / self.vocab
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    pub fn last(&self) -> &[f32] {
        self.row(self.rows() - 1)
    }
}

/// Time spent in one kernel of the plan's schedule (`kiln inspect` lists them as `k0`, `k1`, ...) since the
/// profile was last taken.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub kernel: usize,
    /// The kernel's spec, as `kiln inspect` prints it.
    pub spec: String,
    pub launches: usize,
    pub seconds: f64,
}

pub trait Engine {
    /// Runs `tokens` at positions `start..start + tokens.len()` of the current sequence, after the tokens cached
    /// at `0..start` (anything cached beyond `start` is discarded). With `last_only` only the last token's logits
    /// are wanted (what generation needs): an executor may skip the LM head for the other rows and return that
    /// one row.
    fn step(&mut self, tokens: &[u32], start: usize, last_only: bool) -> Result<Logits, ExecError>;
    /// Every token's logits.
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Logits, ExecError> {
        self.step(tokens, start, false)
    }
    /// The last token's logits.
    fn forward_last(&mut self, tokens: &[u32], start: usize) -> Result<Vec<f32>, ExecError> {
        let mut logits = self.step(tokens, start, true)?;
        let before_last = logits.data.len() - logits.vocab;
        logits.data.drain(..before_last);
        Ok(logits.data)
    }
    /// The most positions a sequence may use.
    fn max_context(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// How many sequences the executor keeps at once, each in its cache slot `0..slots()`. `step` uses slot 0.
    fn slots(&self) -> usize {
        1
    }
    /// The KV cache's size, where it is shared by the slots (else each slot holds a whole context).
    fn kv_budget(&self) -> Option<KvBudget> {
        None
    }
    /// Turns timing of every launch on or off; returns whether this executor can time them.
    fn set_profiling(&mut self, _on: bool) -> bool {
        false
    }
    /// The time per kernel since the last call (or since profiling was turned on), most time first.
    fn take_profile(&mut self) -> Vec<KernelTime> {
        Vec::new()
    }
    /// Frees the KV cache of the sequence in `slot`, which has ended.
    fn release(&mut self, _slot: usize) {}
    /// Runs the tokens of several sequences (distinct slots) as one step and returns each sequence's last-token
    /// logits, in order. The result does not depend on what else is in the batch. This default runs them one
    /// after another, for executors with one slot.
    fn step_batch(&mut self, batch: &[SeqTokens]) -> Result<Vec<Vec<f32>>, ExecError> {
        batch
            .iter()
            .map(|s| match s.slot {
                0 => self.forward_last(s.tokens, s.start),
                slot => Err(ExecError::NoSlot {
                    slot,
                    slots: self.slots(),
                }),
            })
            .collect()
    }
}
