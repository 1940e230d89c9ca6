//! One sampling step over a vocabulary of Gemma 3's size (262144), per sampler setting: greedy; OpenAI's defaults
//! (temperature 1, no truncation); top-p 0.95 alone; and `kiln run`'s defaults (temperature 0.8, top-k 40, top-p
//! 0.95, min-p 0.05): `cargo bench -p kiln-runtime --bench sampler`. The logits are drawn like a model's: most
//! between -10 and 10, a few dozen standing out.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_runtime::{Sampler, SamplerConfig};
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::Duration;

const VOCAB: usize = 262_144;

fn logits() -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    (0..VOCAB)
        .map(|i| {
            let base: f32 = rng.gen_range(-10.0..10.0);
            if i % 8191 == 0 {
                base + 15.0
            } else {
                base
            }
        })
        .collect()
}

fn sample(c: &mut Criterion) {
    let logits = logits();
    let mut group = c.benchmark_group("sample_262144");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let settings = [
        ("greedy", SamplerConfig::greedy()),
        (
            "temperature_1",
            SamplerConfig {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..Default::default()
            },
        ),
        (
            "top_p_0.95",
            SamplerConfig {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.95,
                min_p: 0.0,
                ..Default::default()
            },
        ),
        ("kiln_run_defaults", SamplerConfig::default()),
    ];
    for (name, config) in settings {
        let mut sampler = Sampler::new(config);
        group.bench_function(name, |b| {
            b.iter(|| black_box(sampler.sample(black_box(&logits), &[], &[])))
        });
    }
    group.finish();
}

criterion_group!(benches, sample);
criterion_main!(benches);
