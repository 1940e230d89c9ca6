//! Sampling flags shared by `run` and `chat`.

use clap::Args;
use kiln_runtime::SamplerConfig;

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy (always the most likely token).
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to P (1: all).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: none).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize tokens seen in the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed: the same seed and settings give the same output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn config(&self) -> anyhow::Result<SamplerConfig> {
        anyhow::ensure!(self.temperature.is_finite(), "--temp must be a number");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.top_p),
            "--top-p must be in [0, 1], is {}",
            self.top_p
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_p),
            "--min-p must be in [0, 1], is {}",
            self.min_p
        );
        anyhow::ensure!(
            self.repeat_penalty > 0.0,
            "--repeat-penalty must be positive, is {}",
            self.repeat_penalty
        );
        Ok(SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        })
    }
}
