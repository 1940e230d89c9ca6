//! The whole model through the CPU executor, on every core: `cargo bench --bench end_to_end`.
//! - SmolLM2-135M Q4_1 compiled to a plan: a 128-token prefill and single-token decode steps.
//! - A synthetic BitNet b1.58 model (8 layers, d = 1024, FFN 2816: every projection ternary) quantized to I2_S and
//!   to TL1, TL2 and TQ2_0: decode steps of each, the ternary kernels side by side on the same digits.
//!
//! `kiln bench PLAN` reports the same measurements for any plan, with llama-bench's methodology.

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_runtime::plan::PlanFile;
use kiln_runtime::{CpuExecutor, Engine};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Ordinary vocabulary ids, no special tokens.
fn prompt(len: usize) -> Vec<u32> {
    (0..len).map(|i| 1000 + 37 * i as u32).collect()
}

fn end_to_end(c: &mut Criterion) {
    let Some(gguf) = common::model("smollm2") else {
        return;
    };
    let plan_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2-bench.plan");
    let plan = PlanFile::open(&common::compile(&gguf, Some(&plan_path)))
        .expect("the plan just written loads");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let context = 512;
    let mut engine = CpuExecutor::new(&plan, threads, context).expect("the executor starts");

    let mut group = c.benchmark_group("smollm2_q4_1");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let tokens = prompt(128);
    group.throughput(Throughput::Elements(tokens.len() as u64));
    group.bench_function("prefill_128", |b| {
        b.iter(|| engine.forward_last(&tokens, 0).expect("prefill runs"))
    });

    bench_decode(&mut group, "decode", &mut engine, context);
    group.finish();
}

/// Decode steps after a 16-token prompt; the sequence restarts before it would outgrow the context.
fn bench_decode(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    engine: &mut CpuExecutor,
    context: usize,
) {
    group.throughput(Throughput::Elements(1));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut position = context;
            for _ in 0..iters {
                if position == context {
                    engine.forward_last(&prompt(16), 0).expect("prefill runs");
                    position = 16;
                }
                let started = Instant::now();
                engine.forward_last(&[1234], position).expect("decode runs");
                spent += started.elapsed();
                position += 1;
            }
            spent
        })
    });
}

fn ternary_decode(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let source = dir.join("bitnet-1024.gguf");
    let shape = common::bitnet::Shape {
        layers: 8,
        d: 1024,
        ffn: 2816,
        heads: 16,
        kv_heads: 4,
        rope_dims: 64,
    };
    if common::bitnet::write_synthetic_bitnet(shape, &source).is_none() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let context = 256;
    let mut group = c.benchmark_group("bitnet_1024");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for format in ["i2_s", "tl1", "tl2", "tq2_0"] {
        let gguf = dir.join(format!("bitnet-1024-{format}.gguf"));
        common::quantize(&source, format, &gguf);
        let plan =
            PlanFile::open(&common::compile(&gguf, None)).expect("the plan just written loads");
        let mut engine = CpuExecutor::new(&plan, threads, context).expect("the executor starts");
        bench_decode(
            &mut group,
            &format!("decode_{format}"),
            &mut engine,
            context,
        );
    }
    group.finish();
}

criterion_group!(benches, end_to_end, ternary_decode);
criterion_main!(benches);
