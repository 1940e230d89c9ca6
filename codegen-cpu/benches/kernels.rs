//! Each generated matmul against the scalar reference math, one thread, in GB/s of weights streamed:
//! `cargo bench -p kiln-codegen-cpu --bench kernels [-- FILTER]`. And attention, a GQA group's query heads in one
//! call against a call per head, in GB/s of cached keys and values read.
//!
//! Shapes: 4096 x 2048 weights (Q4 formats: about 5 MB, inside this machine's L3, so the figures are the kernels'
//! own speed rather than DRAM's), at 1 token (decode: the activations quantized, then every row) and 64 tokens
//! (prefill). The reference dequantizes each row once and dots it with every token.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{reference, Loaded, MatMul, FORMATS};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_codegen_cpu::host_isa;
use kiln_ir::cpu_abi::{AttentionArgs, CpuFunction, Epilogue, KV_PAGE};
use kiln_ir::layout::{f16_fields, Layout, Scales};
use kiln_ir::QuantFormat;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::Duration;

const ROWS: usize = 4096;
const K: usize = 2048;

/// The layout `kiln compile` gives matmul weights of a CPU plan, rows interleaved by 4: the 32-value block formats'
/// scales grouped (f16 where the format has a code offset, else widened to f32), other formats' widened at each
/// block's front (floats stay as GGUF has them).
fn plan_layout(format: QuantFormat) -> Layout {
    let scales = if format.is_float() {
        return Layout::GGUF;
    } else if format.block_elems() == 32 && f16_fields(format).len() == 1 {
        Scales::GroupedF16
    } else if format.block_elems() == 32 {
        Scales::Grouped
    } else if f16_fields(format).is_empty() {
        Scales::Gguf
    } else {
        Scales::F32
    };
    Layout {
        scales,
        interleave: 4,
    }
}

fn matmuls(c: &mut Criterion) {
    let isa = host_isa().expect("this host is supported");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for tokens in [1, 64] {
        let mut group = c.benchmark_group(format!("matmul_{tokens}_tokens"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for format in FORMATS {
            let layout = plan_layout(format);
            let mut m = MatMul::new(
                &isa,
                &mut rng,
                format,
                layout,
                ROWS,
                K,
                tokens,
                Epilogue::Store,
            );
            group.throughput(Throughput::Bytes(m.w.len() as u64));
            group.bench_function(BenchmarkId::new("generated", format), |b| {
                b.iter(|| {
                    m.quantize();
                    m.run(0, ROWS);
                    black_box(&m.out);
                })
            });
            group.bench_function(BenchmarkId::new("reference", format), |b| {
                b.iter(|| black_box(reference(&m.view(&m.w), &m.x, K)))
            });
        }
        group.finish();
    }
}

/// Positions attended: a prompt's last token at 512, or a decode step.
const POSITIONS: usize = 512;

/// Attention of one token's query heads over `POSITIONS` cached positions, for the real models' head widths and
/// groups (Gemma 3: 256-wide heads, 4 per KV head; SmolLM2: 64-wide, 3; Qwen2.5: 64-wide, 7), generated for the
/// whole group and for one head (called once per head, as plans compiled before grouping do).
fn attention(c: &mut Criterion) {
    let isa = host_isa().expect("this host is supported");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut group = c.benchmark_group(format!("attention_{POSITIONS}_positions"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (head_dim, heads) in [(256, 4), (64, 3), (64, 7)] {
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (k, v, q) = (
            values(POSITIONS * head_dim),
            values(POSITIONS * head_dim),
            values(heads * head_dim),
        );
        let pages: Vec<u32> = (0..POSITIONS.div_ceil(KV_PAGE) as u32).collect();
        let mut out = vec![0f32; heads * head_dim];
        let mut scores = vec![0f32; heads * POSITIONS];
        group.throughput(Throughput::Bytes((2 * POSITIONS * head_dim * 4) as u64));
        for per_call in [heads, 1] {
            let f = Loaded::new(
                &isa,
                CpuFunction::Attention {
                    head_dim,
                    group: per_call,
                },
            );
            let name = if per_call == 1 { "per_head" } else { "grouped" };
            let id = BenchmarkId::new(name, format!("hd{head_dim}_x{heads}"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    for h in (0..heads).step_by(per_call) {
                        f.call(&AttentionArgs {
                            q: q[h * head_dim..].as_ptr(),
                            k: k.as_ptr(),
                            v: v.as_ptr(),
                            pages: pages.as_ptr(),
                            page_stride: (KV_PAGE * head_dim) as u64,
                            kv_offset: 0,
                            first: 0,
                            last: POSITIONS as u64 - 1,
                            out: out[h * head_dim..].as_mut_ptr(),
                            scores: scores.as_mut_ptr(),
                            scale: 1.0 / (head_dim as f32).sqrt(),
                        });
                    }
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matmuls, attention);
criterion_main!(benches);
