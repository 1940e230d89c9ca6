//! Each generated matmul against the scalar reference math, one thread, in GB/s of weights streamed:
//! `cargo bench -p kiln-codegen-cpu --bench kernels [-- FILTER]`.
//!
//! Shapes: 4096 x 2048 weights (Q4 formats: about 5 MB, inside this machine's L3, so the figures are the kernels'
//! own speed rather than DRAM's), at 1 token (decode: the activations quantized, then every row) and 64 tokens
//! (prefill). The reference dequantizes each row once and dots it with every token.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{reference, MatMul, FORMATS};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln_codegen_cpu::host_isa;
use kiln_ir::cpu_abi::Epilogue;
use kiln_ir::layout::{f16_fields, Layout};
use kiln_ir::QuantFormat;
use rand::SeedableRng;
use std::hint::black_box;
use std::time::Duration;

const ROWS: usize = 4096;
const K: usize = 2048;

/// The layout `kiln compile` gives matmul weights: f32 scales where the format has f16 ones, rows interleaved by 4
/// (floats stay as GGUF has them).
fn plan_layout(format: QuantFormat) -> Layout {
    if format.is_float() {
        Layout::GGUF
    } else {
        Layout {
            f32_scales: !f16_fields(format).is_empty(),
            interleave: 4,
        }
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

criterion_group!(benches, matmuls);
criterion_main!(benches);
