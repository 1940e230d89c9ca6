//! Token sampling: greedy, or seeded sampling with repetition penalty, top-k, top-p, min-p and temperature,
//! applied in llama.cpp's default order (penalties, top-k, top-p, min-p, temperature, draw).

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
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// Picks the next token from one position's logits; `history` is the sequence so far (for the repetition
    /// penalty) and `generated` the tokens sampled so far (for the presence and frequency penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], generated: &[u32]) -> u32 {
        let c = &self.config;
        let mut logits = logits.to_vec();
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
        if c.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, highest first (ties by id for determinism).
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            cands.truncate(c.top_k.max(1));
        }
        if c.top_p < 1.0 {
            let probs = softmax(&cands, 1.0);
            let mut cumulative = 0.0;
            let keep = probs.iter().position(|p| {
                cumulative += p;
                cumulative >= c.top_p
            });
            cands.truncate(keep.map_or(cands.len(), |k| k + 1));
        }
        if c.min_p > 0.0 {
            let probs = softmax(&cands, 1.0);
            let floor = probs[0] * c.min_p;
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            cands.truncate(keep);
        }
        let probs = softmax(&cands, c.temperature);
        let mut r: f32 = self.rng.gen();
        for (p, (id, _)) in probs.iter().zip(&cands) {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        cands.last().expect("at least one candidate").0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(cands: &[(u32, f32)], temperature: f32) -> Vec<f32> {
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = cands
        .iter()
        .map(|c| (((c.1 - max) / temperature) as f64).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
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

    #[test]
    fn min_p_keeps_only_near_top_tokens() {
        let logits = [10.0, 9.9, 0.0, -5.0];
        let config = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(config);
        assert!((0..50).all(|_| s.sample(&logits, &[], &[]) < 2));
    }
}
