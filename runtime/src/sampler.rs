//! Token sampling: greedy, or seeded sampling with repetition penalty, top-k, top-p, min-p and temperature,
//! applied in llama.cpp's default order (penalties, top-k, top-p, min-p, temperature, draw).

use crate::fastmath::{argmax, exp_le0, max, sum};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables. Logits of recently seen tokens are divided by it when positive, multiplied when negative.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// OpenAI's penalties over the tokens generated so far: a logit drops by `presence` if the token appeared
    /// and by `frequency` times its count (0 disables each).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// (token id, bias) pairs added to those tokens' logits first (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: ChaCha8Rng,
    /// Kept from step to step, so that a step allocates (and faults in) no vocabulary-sized buffer.
    penalized: Vec<f32>,
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Sampler {
            config,
            rng,
            penalized: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Picks the next token from one position's logits; `history` is the sequence so far (for the repetition
    /// penalty) and `generated` the tokens sampled so far (for the presence and frequency penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], generated: &[u32]) -> u32 {
        let c = &self.config;
        let penalizes = !c.logit_bias.is_empty()
            || (c.repeat_penalty != 1.0 && !history.is_empty())
            || ((c.presence_penalty != 0.0 || c.frequency_penalty != 0.0) && !generated.is_empty());
        if !penalizes {
            return self.pick(logits);
        }
        let mut penalized = std::mem::take(&mut self.penalized);
        penalized.clear();
        penalized.extend_from_slice(logits);
        self.penalize(&mut penalized, history, generated);
        let id = self.pick(&penalized);
        self.penalized = penalized;
        id
    }

    fn penalize(&self, logits: &mut [f32], history: &[u32], generated: &[u32]) {
        let c = &self.config;
        for &(id, bias) in &c.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if c.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(c.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &id in recent {
                if let Some(l) = logits.get_mut(id as usize).filter(|_| seen.insert(id)) {
                    *l = if *l > 0.0 {
                        *l / c.repeat_penalty
                    } else {
                        *l * c.repeat_penalty
                    };
                }
            }
        }
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::new();
            for &id in generated {
                *counts.entry(id).or_insert(0u32) += 1;
            }
            for (id, count) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= c.presence_penalty + c.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// Top-k, top-p and min-p, then the draw at the temperature (or the most likely token at temperature 0).
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            ..
        } = self.config;
        if temperature <= 0.0 {
            return argmax(logits);
        }
        let truncates = (top_k > 0 && top_k < logits.len()) || top_p < 1.0 || min_p > 0.0;
        if !truncates {
            // Every token stays a candidate: draw over the logits as they are, in id order.
            return self.draw(logits, None);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if top_k > 0 && top_k < cands.len() {
            cands.select_nth_unstable_by(top_k - 1, by_logit);
            cands.truncate(top_k);
        }
        if top_p < 1.0 {
            let keep = self.top_p_prefix(&mut cands);
            cands.truncate(keep);
        }
        if min_p > 0.0 {
            // A token stays if its probability (at temperature 1) is at least `min_p` times the top one's.
            let top = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let floor = top + min_p.ln();
            cands.retain(|&(_, l)| l >= floor);
        }
        let (ids, logits): (Vec<u32>, Vec<f32>) = cands.into_iter().unzip();
        self.draw(&logits, Some(&ids))
    }

    /// Draws one of the candidates (`ids[i]`, or id `i` without `ids`) by its probability at the temperature, as
    /// if walking them in the order given: the walk skips whole chunks by their sums.
    fn draw(&mut self, logits: &[f32], ids: Option<&[u32]>) -> u32 {
        let mut weights = std::mem::take(&mut self.weights);
        fill_weights(&mut weights, logits, self.config.temperature);
        let chunks: Vec<f64> = weights.chunks(DRAW_CHUNK).map(sum).collect();
        let mut left = self.rng.gen::<f32>() as f64 * chunks.iter().sum::<f64>();
        let mut pick = logits.len() - 1;
        'walk: for (c, &chunk) in chunks.iter().enumerate() {
            if left >= chunk {
                left -= chunk;
                continue;
            }
            for (i, &w) in weights[c * DRAW_CHUNK..]
                .iter()
                .take(DRAW_CHUNK)
                .enumerate()
            {
                if left < w as f64 {
                    pick = c * DRAW_CHUNK + i;
                    break 'walk;
                }
                left -= w as f64;
            }
        }
        self.weights = weights;
        ids.map_or(pick as u32, |ids| ids[pick])
    }

    /// How many of the most likely candidates (at temperature 1) it takes for their probabilities to reach
    /// `top_p` (at least one), leaving those first in `cands`, in order. Only that prefix is sorted: it is found
    /// by sorting the top 64, then 4 times as many, until it lies within them, where sorting a vocabulary of
    /// 262144 took milliseconds a token.
    fn top_p_prefix(&mut self, cands: &mut [(u32, f32)]) -> usize {
        let mut weights = std::mem::take(&mut self.weights);
        weights.clear();
        weights.extend(cands.iter().map(|c| c.1));
        let top = max(&weights);
        weights.iter_mut().for_each(|w| *w = exp_le0(*w - top));
        let target = self.config.top_p as f64 * sum(&weights);
        self.weights = weights;
        let (mut sorted, mut cumulative) = (0, 0.0f64);
        while sorted < cands.len() {
            let want = (sorted * 4).max(64).min(cands.len());
            if want < cands.len() {
                cands[sorted..].select_nth_unstable_by(want - sorted - 1, by_logit);
            }
            cands[sorted..want].sort_by(by_logit);
            for (i, &(_, l)) in cands[sorted..want].iter().enumerate() {
                cumulative += exp_le0(l - top) as f64;
                if cumulative >= target {
                    return sorted + i + 1;
                }
            }
            sorted = want;
        }
        cands.len()
    }
}

/// Candidates per chunk of a draw's walk.
const DRAW_CHUNK: usize = 1024;

/// Highest logit first; ties by id, so that the order (and a seeded draw) is the same on every run.
pub(crate) fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Each logit's unnormalized probability at `temperature`, `e^((l - max) / temperature)`, into `weights`.
fn fill_weights(weights: &mut Vec<f32>, logits: &[f32], temperature: f32) {
    let top = max(logits);
    let scale = 1.0 / temperature;
    weights.clear();
    weights.extend(logits.iter().map(|&l| exp_le0((l - top) * scale)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sampling at `temperature` with no truncation.
    fn untruncated(temperature: f32, seed: u64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(
            Sampler::new(SamplerConfig::greedy()).sample(&[1.0, 3.0, 3.0, -1.0], &[], &[]),
            1
        );
    }

    #[test]
    fn penalty_moves_greedy_off_a_repeated_token() {
        let config = SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        };
        assert_eq!(Sampler::new(config).sample(&[1.0, 3.0, 2.0], &[1], &[]), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let config = SamplerConfig {
            top_k: 3,
            ..untruncated(1.0, 7)
        };
        let draw = |c: &SamplerConfig| {
            let mut s = Sampler::new(c.clone());
            (0..50)
                .map(|_| s.sample(&logits, &[], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&config);
        assert_eq!(a, draw(&config));
        // The three highest logits (6.0) sit at ids 6, 13, 20.
        assert!(a.iter().all(|id| [6, 13, 20].contains(id)), "{a:?}");
        assert_ne!(a, draw(&SamplerConfig { seed: 8, ..config }));
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let config = SamplerConfig {
            frequency_penalty: 0.6,
            ..SamplerConfig::greedy()
        };
        // Token 1 leads by 1.0; generated twice it loses 1.2 and token 2 wins.
        assert_eq!(
            Sampler::new(config.clone()).sample(&[0.0, 3.0, 2.0], &[], &[1]),
            1
        );
        assert_eq!(
            Sampler::new(config).sample(&[0.0, 3.0, 2.0], &[], &[1, 1]),
            2
        );
        let config = SamplerConfig {
            presence_penalty: 1.5,
            ..SamplerConfig::greedy()
        };
        assert_eq!(Sampler::new(config).sample(&[0.0, 3.0, 2.0], &[], &[1]), 2);
    }

    /// Deterministic pseudo-random logits in [-10, 10).
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-10.0..10.0)).collect()
    }

    #[test]
    fn top_p_keeps_the_shortest_sorted_prefix_that_reaches_p() {
        for n in [1, 5, 63, 64, 65, 300, 5000] {
            let l = logits(n, n as u64);
            // The reference: every candidate sorted, probabilities accumulated from the top.
            let mut sorted: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
            sorted.sort_by(by_logit);
            let max = sorted[0].1;
            let sum: f64 = sorted.iter().map(|c| ((c.1 - max) as f64).exp()).sum();
            for top_p in [0.01, 0.3, 0.9, 0.999, 0.99999] {
                let mut cumulative = 0.0f64;
                let want = sorted
                    .iter()
                    .position(|c| {
                        cumulative += ((c.1 - max) as f64).exp() / sum;
                        cumulative >= top_p as f64
                    })
                    .map_or(n, |i| i + 1);
                let mut cands: Vec<(u32, f32)> =
                    l.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
                let mut sampler = Sampler::new(SamplerConfig {
                    top_p,
                    ..Default::default()
                });
                let keep = sampler.top_p_prefix(&mut cands);
                assert_eq!(keep, want, "{n} candidates, top_p {top_p}");
                assert_eq!(
                    cands[..keep],
                    sorted[..keep],
                    "{n} candidates, top_p {top_p}"
                );
            }
        }
    }

    #[test]
    fn draws_follow_the_probabilities() {
        // Probabilities 0.5, 0.3 and 0.2 at temperature 1, and with no truncation (drawn in id order) or top-k.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        for top_k in [0, 3] {
            let config = SamplerConfig {
                top_k,
                ..untruncated(1.0, 3)
            };
            let mut s = Sampler::new(config);
            let mut counts = [0usize; 3];
            for _ in 0..20000 {
                counts[s.sample(&logits, &[], &[]) as usize] += 1;
            }
            for (count, p) in counts.iter().zip([0.5, 0.3, 0.2]) {
                let share = *count as f64 / 20000.0;
                assert!((share - p).abs() < 0.015, "top_k {top_k}: {counts:?}");
            }
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_highest() {
        let l = logits(1000, 9);
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let config = SamplerConfig {
            top_k: 10,
            ..untruncated(5.0, 1)
        };
        let mut s = Sampler::new(config);
        let drawn: std::collections::HashSet<u32> =
            (0..2000).map(|_| s.sample(&l, &[], &[])).collect();
        assert!(drawn.iter().all(|id| order[..10].contains(id)), "{drawn:?}");
        assert_eq!(drawn.len(), 10, "at temperature 5 all ten are drawn");
    }

    #[test]
    fn logit_bias_moves_greedy_and_bans_tokens() {
        let config = SamplerConfig {
            logit_bias: vec![(2, 1.5)],
            ..SamplerConfig::greedy()
        };
        assert_eq!(Sampler::new(config).sample(&[0.0, 3.0, 2.0], &[], &[]), 2);
        let config = SamplerConfig {
            temperature: 1.0,
            logit_bias: vec![(1, -100.0)],
            seed: 4,
            ..Default::default()
        };
        let mut s = Sampler::new(config);
        assert!((0..200).all(|_| s.sample(&[0.0, 3.0, 2.0], &[], &[]) != 1));
    }

    #[test]
    fn min_p_keeps_only_near_top_tokens() {
        let logits = [10.0, 9.9, 0.0, -5.0];
        let config = SamplerConfig {
            min_p: 0.5,
            ..untruncated(1.0, 1)
        };
        let mut s = Sampler::new(config);
        assert!((0..50).all(|_| s.sample(&logits, &[], &[]) < 2));
    }
}
