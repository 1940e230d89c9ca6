//! Generation and perplexity on any `Engine`.

use crate::engine::{Engine, ExecError};
use crate::fastmath::{exp_le0, max, sum};
use crate::sampler::{by_logit, Sampler};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The token budget ran out.
    Length,
    /// The model produced an end-of-generation token, or the caller stopped it (a stop string).
    Stop,
    /// The caller gave up (e.g. the client went away).
    Cancelled,
}

pub struct Generation {
    pub ids: Vec<u32>,
    pub finish: FinishReason,
    /// The top raw logits at the first generated position, highest first.
    pub first_top_logits: Vec<(u32, f32)>,
}

/// Feeds `prompt` (continuing a sequence whose first `start` positions are cached), then samples up to
/// `max_tokens`, calling `on_token` with each new id and the logits it was sampled from; it returns
/// `ControlFlow::Break(reason)` to end generation there. End-of-generation tokens stop it and are not returned.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    prompt: &[u32],
    start: usize,
    max_tokens: usize,
    mut on_token: impl FnMut(u32, &[f32]) -> ControlFlow<FinishReason>,
) -> Result<Generation, ExecError> {
    let mut history = prompt.to_vec();
    let mut ids = Vec::new();
    let mut logits = engine.forward_last(prompt, start)?;
    let first_top_logits = top_logits(&logits, 5);
    let mut pos = start + prompt.len();
    while ids.len() < max_tokens {
        let id = sampler.sample(&logits, &history, &ids);
        if tokenizer.is_end_of_generation(id) {
            return Ok(Generation {
                ids,
                finish: FinishReason::Stop,
                first_top_logits,
            });
        }
        ids.push(id);
        if let ControlFlow::Break(finish) = on_token(id, &logits) {
            return Ok(Generation {
                ids,
                finish,
                first_top_logits,
            });
        }
        history.push(id);
        if ids.len() == max_tokens {
            break;
        }
        logits = engine.forward_last(&[id], pos)?;
        pos += 1;
    }
    Ok(Generation {
        ids,
        finish: FinishReason::Length,
        first_top_logits,
    })
}

/// `ln(sum(exp(logits)))`, computed stably in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let top = max(logits);
    let shifted: Vec<f32> = logits.iter().map(|&l| exp_le0(l - top)).collect();
    sum(&shifted).ln() + top as f64
}

/// Log-probabilities of a logits row (log-softmax).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits
        .iter()
        .map(|&l| (l as f64 - log_sum) as f32)
        .collect()
}

/// The `k` highest logits, highest first (ties by id).
pub fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if k < all.len() && k > 0 {
        all.select_nth_unstable_by(k - 1, by_logit);
    }
    all.truncate(k);
    all.sort_by(by_logit);
    all
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// One standard error of the estimate, in perplexity units (as llama-perplexity prints it).
    pub pm: f64,
    pub chunks: usize,
    pub scored_tokens: usize,
}

/// llama-perplexity's method: consecutive chunks of `ctx` tokens, each evaluated alone; only predictions in the
/// second half of a chunk count. When the model adds BOS, each chunk's first token is replaced by BOS, as
/// llama-perplexity does. `on_chunk(i, ppl_so_far)` reports progress.
pub fn perplexity(
    engine: &mut dyn Engine,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, ExecError> {
    let available = tokens.len() / ctx;
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        let logits = engine.forward(&chunk, 0)?;
        for j in first..ctx - 1 {
            let row = logits.row(j);
            let loss = log_sum_exp(row) - row[chunk[j + 1] as usize] as f64;
            nll += loss;
            nll2 += loss * loss;
            count += 1;
        }
        on_chunk(c, (nll / count as f64).exp());
    }
    if count == 0 {
        return Ok(Perplexity {
            ppl: f64::NAN,
            pm: f64::NAN,
            chunks: 0,
            scored_tokens: 0,
        });
    }
    let mean = nll / count as f64;
    let variance = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let pm = if variance > 0.0 && count > 1 {
        (variance / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        pm,
        chunks,
        scored_tokens: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logits_are_the_k_highest_in_order_ties_by_id() {
        let logits = [1.0, 5.0, 3.0, 5.0, -2.0, 3.0, 0.5];
        assert_eq!(top_logits(&logits, 3), [(1, 5.0), (3, 5.0), (2, 3.0)]);
        assert_eq!(top_logits(&logits, 0), []);
        assert_eq!(top_logits(&logits, 20).len(), 7);
        assert_eq!(top_logits(&logits, 20)[6], (4, -2.0));
    }

    #[test]
    fn log_softmax_matches_f64_exp() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        assert!(
            (log_sum_exp(&logits) - exact).abs() < 1e-6,
            "{}",
            log_sum_exp(&logits) - exact
        );
    }
}
