//! The engine thread: it owns one model's executor and runs one job at a time, streaming text back as it is
//! generated. (Continuous batching across requests comes with the batched executor.)

use super::handlers::finish_reason;
use super::metrics::Metrics;
use crate::commands::EngineArgs;
use crate::model::Model;
use kiln_runtime::generate::{generate, log_softmax, top_logits, FinishReason};
use kiln_runtime::stop::StopMatcher;
use kiln_runtime::tokenizer::StreamDecoder;
use kiln_runtime::{Sampler, SamplerConfig, Tokenizer};
use std::ops::ControlFlow;
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

/// Starts the engine thread; jobs sent on the returned channel run in order.
pub fn spawn(
    model: Arc<Model>,
    ctx: usize,
    engine_args: EngineArgs,
    metrics: Arc<Metrics>,
) -> anyhow::Result<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    // The executor is built once, on the engine thread (it owns it; a GPU executor is not `Send`), and start-up
    // waits for the outcome so that a model that cannot run fails `kiln serve`, not its first request.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("kiln-engine".into())
        .spawn(move || {
            let mut engine = match model.executor(ctx, &engine_args) {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    engine
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            for job in rx {
                metrics.waiting.dec();
                metrics.running.inc();
                metrics
                    .queue_time
                    .observe(job.arrived.elapsed().as_secs_f64());
                metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                run(&model, engine.as_mut(), job, &metrics, ctx);
                metrics.running.dec();
                metrics.kv_cache_usage.set(0.0);
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(tx),
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

fn run(
    model: &Model,
    engine: &mut dyn kiln_runtime::Engine,
    job: Job,
    metrics: &Metrics,
    ctx: usize,
) {
    let tokenizer = &model.tokenizer;
    let mut sampler = Sampler::new(job.sampler);
    let (mut decoder, mut stop) = (StreamDecoder::default(), StopMatcher::new(job.stop));
    let events = &job.events;
    // Logprobs of tokens whose text is still held back; they go out with that text.
    let mut pending: Vec<TokenLogprob> = Vec::new();
    let send = |text: String, pending: &mut Vec<TokenLogprob>| {
        text.is_empty()
            || events
                .send(Event::Text {
                    text,
                    logprobs: std::mem::take(pending),
                })
                .is_ok()
    };
    let (mut last_token, mut generated, mut hit_stop_string) = (None::<Instant>, 0, false);
    let mut timed_out = false;
    let result = generate(
        engine,
        tokenizer,
        &mut sampler,
        &job.prompt,
        0,
        job.max_tokens,
        |id, logits| {
            match last_token {
                None => metrics
                    .time_to_first_token
                    .observe(job.arrived.elapsed().as_secs_f64()),
                Some(t) => metrics
                    .inter_token_latency
                    .observe(t.elapsed().as_secs_f64()),
            }
            last_token = Some(Instant::now());
            generated += 1;
            metrics.generation_tokens.inc();
            metrics
                .kv_cache_usage
                .set((job.prompt.len() + generated) as f64 / ctx as f64);
            if let Some(top) = job.logprobs {
                pending.push(token_logprob(tokenizer, id, logits, top));
            }
            let bytes = tokenizer.token_bytes(id).unwrap_or_default();
            let (text, stopped) = stop.push(&decoder.push(&bytes));
            hit_stop_string = stopped;
            timed_out = job.deadline.is_some_and(|d| Instant::now() >= d);
            match (send(text, &mut pending), stopped) {
                (false, _) => ControlFlow::Break(FinishReason::Cancelled),
                (true, true) => ControlFlow::Break(FinishReason::Stop),
                (true, false) if timed_out => ControlFlow::Break(FinishReason::Length),
                (true, false) => ControlFlow::Continue(()),
            }
        },
    );
    let event = match result {
        Ok(generation) if generation.finish == FinishReason::Cancelled => {
            tracing::info!(request_id = %job.id, completion_tokens = generation.ids.len(), "request cancelled: the client went away");
            return;
        }
        Ok(generation) => {
            // Unless a stop string ended it, release what was held back (an unfinished character, or text that
            // could have begun a stop string).
            if !hit_stop_string {
                let (text, stopped) = stop.push(&decoder.finish());
                let rest = if stopped {
                    String::new()
                } else {
                    stop.finish()
                };
                if !send(text + &rest, &mut pending) {
                    return;
                }
            }
            let e2e = job.arrived.elapsed();
            if timed_out && generation.finish == FinishReason::Length {
                tracing::warn!(request_id = %job.id, "request timed out (--request-timeout): generation stopped");
            }
            metrics.e2e_latency.observe(e2e.as_secs_f64());
            metrics.finished(finish_reason(generation.finish));
            tracing::info!(
                request_id = %job.id,
                finish = finish_reason(generation.finish),
                prompt_tokens = job.prompt.len(),
                completion_tokens = generation.ids.len(),
                e2e_ms = e2e.as_millis() as u64,
                "request finished"
            );
            Event::Done {
                finish: generation.finish,
                prompt_tokens: job.prompt.len(),
                completion_tokens: generation.ids.len(),
            }
        }
        Err(e) => {
            tracing::error!(request_id = %job.id, error = %e, "request failed");
            Event::Failed(e.to_string())
        }
    };
    let _ = events.send(event);
}
