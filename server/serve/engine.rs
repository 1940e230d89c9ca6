//! The engine thread: it owns one model's executor and schedules its jobs with continuous batching. Each step
//! feeds a prompt chunk of one new sequence together with the next token of every sequence already generating, so
//! requests join and leave the batch at any step; text streams back as it is generated. Every op of a step works
//! per token (attention within each token's own sequence), so a request's tokens do not depend on its neighbours.

use super::handlers::finish_reason;
use super::metrics::Metrics;
use crate::commands::EngineArgs;
use crate::model::Model;
use kiln_runtime::generate::{log_softmax, top_logits, FinishReason};
use kiln_runtime::stop::StopMatcher;
use kiln_runtime::tokenizer::StreamDecoder;
use kiln_runtime::{Engine, Sampler, SamplerConfig, SeqTokens, Tokenizer};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

pub struct Job {
    /// The id the response carries; every log line about the request names it.
    pub id: String,
    pub arrived: Instant,
    /// When `--request-timeout` runs out: generation stops at the first token after it.
    pub deadline: Option<Instant>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many alternatives (`None`: no logprobs).
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// One generated token with its log-probability (under the model, before sampling settings) and the most likely
/// alternatives at its position.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// Text now safe to send, with the logprobs of the tokens that produced it (when asked for).
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// How many sequences an engine runs at once and how many KV positions they share.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub max_running: usize,
    /// 0: a full context per sequence.
    pub kv_positions: usize,
}

/// Starts the engine thread, which schedules the jobs sent on the returned channel: up to `max_running` (and the
/// executor's slots) generate together, one batched step at a time, admitted while their KV positions fit. Returns
/// the channel and the KV positions the engine has in all.
pub fn spawn(
    model: Arc<Model>,
    ctx: usize,
    engine_args: EngineArgs,
    metrics: Arc<Metrics>,
    capacity: Capacity,
) -> anyhow::Result<(std::sync::mpsc::Sender<Job>, usize)> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    // The executor is built once, on the engine thread (it owns it; a GPU executor is not `Send`), and start-up
    // waits for the outcome so that a model that cannot run fails `kiln serve`, not its first request.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<usize, String>>(1);
    std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || {
            let executor = model.executor(
                ctx,
                &engine_args,
                capacity.max_running,
                capacity.kv_positions,
            );
            let mut engine = match executor {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let slots = engine.slots().min(capacity.max_running).max(1);
            let (kv_positions, page) = match engine.kv_budget() {
                Some(budget) => (budget.positions, budget.page),
                // Each slot holds a whole context of its own.
                None => (slots * ctx, 1),
            };
            let _ = ready_tx.send(Ok(kv_positions));
            Scheduler {
                model: &model,
                metrics: &metrics,
                slots,
                kv_positions,
                page,
                reserved: 0,
                queue: VecDeque::new(),
                running: Vec::new(),
            }
            .run(engine.as_mut(), rx);
        })?;
    match ready_rx.recv() {
        Ok(Ok(kv_positions)) => Ok((tx, kv_positions)),
        Ok(Err(e)) => Err(anyhow::anyhow!(e)),
        Err(_) => anyhow::bail!("the engine thread stopped while loading the model"),
    }
}

fn token_logprob(tokenizer: &Tokenizer, id: u32, logits: &[f32], top: usize) -> TokenLogprob {
    let logprobs = log_softmax(logits);
    let entry = |id: u32| {
        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = entry(id);
    let top = top_logits(&logprobs, top)
        .into_iter()
        .map(|(alt, lp)| {
            let (text, bytes) = entry(alt);
            (text, bytes, lp)
        })
        .collect();
    TokenLogprob {
        token,
        bytes,
        logprob: logprobs[id as usize],
        top,
    }
}

/// Prompt tokens fed per step: a long prompt goes in chunks, between which the other sequences keep decoding.
const PREFILL_CHUNK: usize = 256;

/// The sequences an engine generates at once, each in a cache slot of the executor, and those waiting for one.
struct Scheduler<'m> {
    model: &'m Model,
    metrics: &'m Metrics,
    slots: usize,
    /// KV positions the running sequences share, handed out in pages of `page`.
    kv_positions: usize,
    page: usize,
    /// KV positions reserved by the running sequences: each its prompt and `max_tokens`, in whole pages, so a
    /// sequence admitted never runs out of cache.
    reserved: usize,
    queue: VecDeque<Job>,
    running: Vec<Sequence>,
}

impl Scheduler<'_> {
    /// Runs until the job channel closes and every job is done.
    fn run(mut self, engine: &mut dyn Engine, jobs: Receiver<Job>) {
        let mut open = true;
        loop {
            // Take what the channel holds, blocking only when there is nothing else to do.
            while open {
                let next = if self.running.is_empty() && self.queue.is_empty() {
                    jobs.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    jobs.try_recv()
                };
                match next {
                    Ok(job) => self.queue.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit();
            if self.running.is_empty() {
                if !open && self.queue.is_empty() {
                    return;
                }
                continue;
            }
            self.step(engine);
        }
    }

    /// KV positions a job reserves.
    fn reservation(&self, job: &Job) -> usize {
        (job.prompt.len() + job.max_tokens).div_ceil(self.page) * self.page
    }

    /// Admits waiting jobs, in arrival order, while a slot is free and their KV reservation fits. A job larger than
    /// the whole cache fails at once (the handlers refuse those, so this is a safeguard).
    fn admit(&mut self) {
        while let Some(job) = self.queue.front() {
            let need = self.reservation(job);
            if need > self.kv_positions {
                let job = self.queue.pop_front().expect("a front");
                self.metrics.waiting.dec();
                let _ = job.events.send(Event::Failed(format!(
                    "the request needs {need} KV positions; the cache holds {}",
                    self.kv_positions
                )));
                continue;
            }
            if self.running.len() == self.slots || self.reserved + need > self.kv_positions {
                return;
            }
            let job = self.queue.pop_front().expect("a front");
            let slot = (0..self.slots)
                .find(|&slot| self.running.iter().all(|s| s.slot != slot))
                .expect("a slot is free");
            self.metrics.waiting.dec();
            self.metrics.running.inc();
            self.metrics
                .queue_time
                .observe(job.arrived.elapsed().as_secs_f64());
            self.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
            self.reserved += need;
            self.running.push(Sequence::new(job, slot, need));
        }
    }

    /// One batched step: a prompt chunk of the oldest sequence still reading its prompt, then the next token of
    /// every sequence that is generating (the order the executor computes the fewest logits rows for).
    fn step(&mut self, engine: &mut dyn Engine) {
        let prefilling = self.running.iter().position(Sequence::prefilling);
        let order: Vec<usize> = prefilling
            .into_iter()
            .chain((0..self.running.len()).filter(|&i| !self.running[i].prefilling()))
            .collect();
        let inputs: Vec<Vec<u32>> = order.iter().map(|&i| self.running[i].input()).collect();
        let batch: Vec<SeqTokens> = order
            .iter()
            .zip(&inputs)
            .map(|(&i, tokens)| SeqTokens {
                slot: self.running[i].slot,
                tokens,
                start: self.running[i].position,
            })
            .collect();
        let mut done = vec![false; self.running.len()];
        match engine.step_batch(&batch) {
            Ok(rows) => {
                for ((&i, row), input) in order.iter().zip(rows).zip(&inputs) {
                    let seq = &mut self.running[i];
                    if let Some(finish) = seq.advance(input.len(), &row, self.model, self.metrics) {
                        seq.finish(finish, self.metrics);
                        done[i] = true;
                    }
                }
            }
            Err(e) => {
                for &i in &order {
                    tracing::error!(request_id = %self.running[i].job.id, error = %e, "request failed");
                    let _ = self.running[i]
                        .job
                        .events
                        .send(Event::Failed(e.to_string()));
                    done[i] = true;
                }
            }
        }
        for (seq, done) in std::mem::take(&mut self.running).into_iter().zip(done) {
            if done {
                engine.release(seq.slot);
                self.reserved -= seq.reservation;
                self.metrics.running.dec();
            } else {
                self.running.push(seq);
            }
        }
        let cached: usize = self.running.iter().map(|s| s.position).sum();
        self.metrics
            .kv_cache_usage
            .set(cached as f64 / self.kv_positions as f64);
    }
}

/// One job in generation: where it is, and what it has sent.
struct Sequence {
    job: Job,
    slot: usize,
    /// KV positions reserved for it.
    reservation: usize,
    /// Positions fed so far: the prompt first, then each generated token.
    position: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    /// Logprobs of tokens whose text is still held back; they go out with that text.
    pending: Vec<TokenLogprob>,
    /// The prompt and the tokens generated so far (for the repetition penalties).
    history: Vec<u32>,
    generated: Vec<u32>,
    last_token: Option<Instant>,
    hit_stop_string: bool,
    timed_out: bool,
}

impl Sequence {
    fn new(job: Job, slot: usize, reservation: usize) -> Self {
        Sequence {
            slot,
            reservation,
            position: 0,
            sampler: Sampler::new(job.sampler.clone()),
            decoder: StreamDecoder::default(),
            stop: StopMatcher::new(job.stop.clone()),
            pending: Vec::new(),
            history: job.prompt.clone(),
            generated: Vec::new(),
            last_token: None,
            hit_stop_string: false,
            timed_out: false,
            job,
        }
    }

    fn prefilling(&self) -> bool {
        self.position < self.job.prompt.len()
    }

    /// The tokens this sequence feeds next: a chunk of its prompt, or the token it generated last.
    fn input(&self) -> Vec<u32> {
        if self.prefilling() {
            let end = (self.position + PREFILL_CHUNK).min(self.job.prompt.len());
            self.job.prompt[self.position..end].to_vec()
        } else {
            vec![*self
                .generated
                .last()
                .expect("generating after a first token")]
        }
    }

    /// Sends text now safe to send, with the logprobs held for it; false when the client has gone.
    fn send(&mut self, text: String) -> bool {
        text.is_empty()
            || self
                .job
                .events
                .send(Event::Text {
                    text,
                    logprobs: std::mem::take(&mut self.pending),
                })
                .is_ok()
    }

    /// Takes a step's result: `fed` positions went in, and `logits` are its last token's. Returns why the
    /// sequence ends, if it does.
    fn advance(
        &mut self,
        fed: usize,
        logits: &[f32],
        model: &Model,
        metrics: &Metrics,
    ) -> Option<FinishReason> {
        self.position += fed;
        if self.prefilling() {
            return None;
        }
        let tokenizer = &model.tokenizer;
        let id = self.sampler.sample(logits, &self.history, &self.generated);
        if tokenizer.is_end_of_generation(id) {
            return Some(FinishReason::Stop);
        }
        match self.last_token {
            None => metrics
                .time_to_first_token
                .observe(self.job.arrived.elapsed().as_secs_f64()),
            Some(t) => metrics
                .inter_token_latency
                .observe(t.elapsed().as_secs_f64()),
        }
        self.last_token = Some(Instant::now());
        self.generated.push(id);
        self.history.push(id);
        metrics.generation_tokens.inc();
        if let Some(top) = self.job.logprobs {
            self.pending.push(token_logprob(tokenizer, id, logits, top));
        }
        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
        let (text, stopped) = self.stop.push(&self.decoder.push(&bytes));
        self.hit_stop_string = stopped;
        self.timed_out = self.job.deadline.is_some_and(|d| Instant::now() >= d);
        if !self.send(text) {
            Some(FinishReason::Cancelled)
        } else if stopped {
            Some(FinishReason::Stop)
        } else if self.timed_out || self.generated.len() == self.job.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Ends the sequence: releases held-back text (unless a stop string ended it) and reports the outcome.
    fn finish(&mut self, finish: FinishReason, metrics: &Metrics) {
        let (id, completion_tokens) = (self.job.id.clone(), self.generated.len());
        if finish == FinishReason::Cancelled {
            tracing::info!(request_id = %id, completion_tokens, "request cancelled: the client went away");
            return;
        }
        if !self.hit_stop_string {
            let (text, stopped) = self.stop.push(&self.decoder.finish());
            let rest = if stopped {
                String::new()
            } else {
                self.stop.finish()
            };
            if !self.send(text + &rest) {
                return;
            }
        }
        let e2e = self.job.arrived.elapsed();
        if self.timed_out && finish == FinishReason::Length {
            tracing::warn!(request_id = %id, "request timed out (--request-timeout): generation stopped");
        }
        metrics.e2e_latency.observe(e2e.as_secs_f64());
        metrics.finished(finish_reason(finish));
        tracing::info!(
            request_id = %id,
            finish = finish_reason(finish),
            prompt_tokens = self.job.prompt.len(),
            completion_tokens,
            e2e_ms = e2e.as_millis() as u64,
            "request finished"
        );
        let _ = self.job.events.send(Event::Done {
            finish,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens,
        });
    }
}
