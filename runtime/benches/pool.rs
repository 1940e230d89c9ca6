//! The CPU executor's per-op cost outside the kernels: one fork-join of the persistent pool (wake the workers,
//! run an empty job, wait for all), at 1 thread and at every core: `cargo bench -p kiln-runtime --bench pool`.
//! A SmolLM2 decode step makes about 210 of them (every matmul call and every attention is one; a single token's
//! activations are quantized on the calling thread), so this times what the step pays in synchronisation alone.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_runtime::cpu::pool::Pool;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn fork_join(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("pool_fork_join");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut counts = vec![1, cores];
    counts.dedup();
    for threads in counts {
        let pool = Pool::new(threads);
        let touched = AtomicUsize::new(0);
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter(|| {
                pool.run(&|i| {
                    touched.fetch_add(black_box(i), Ordering::Relaxed);
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fork_join);
criterion_main!(benches);
