//! The design experiment behind kiln's TL1/TL2 kernels: bitnet.cpp's (T-MAC's) activation lookup tables against
//! kiln's method, which decodes each weight index with a `pshufb` table and takes int8 dot products.
//! `cargo bench -p kiln-codegen-cpu --bench tl_lookup`.
//!
//! Hand-written 128-bit kernels (the vector width Cranelift gives kiln on x86, so this compares methods, not code
//! generators) of the integer row sums `sum(w * qx)` of TL1 weights and one token's int8 activations:
//! - `decode_vpdpbusd`: kiln's method. Per row and 128-value block, two `pshufb` per 16 pair indices give both
//!   weights' codes, which meet the activations in `vpdpbusd` (four accumulator chains). Needs AVX-512 VNNI.
//! - `decode_pmaddubsw`: the same for CPUs without VNNI (x86-64-v3).
//! - `activation_lut`: T-MAC. Each pair of activations gets a table of its nine possible sums, split into low and
//!   high bytes so the sums stay exact; the weights are transposed so that a vector holds one byte of 16 rows, and
//!   two `pshufb` per 16 rows and pair look the sums up. Building the token's tables is included.
//!
//! Every kernel's sums are checked against scalar ones first. `generated` is kiln's own TL1 matmul on the same
//! weights (activation quantization and scaling included), for scale.

#[path = "../tests/common/mod.rs"]
mod common;

use common::MatMul;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_codegen_cpu::host_isa;
use kiln_ir::cpu_abi::Epilogue;
use kiln_ir::layout::{Layout, Scales};
use kiln_ir::{tl, QuantFormat};
use rand::{Rng, SeedableRng};
use std::arch::x86_64::*;
use std::hint::black_box;
use std::time::Duration;

const ROWS: usize = 4096;
const K: usize = 2048;
/// Values per TL1 row block, and its bytes.
const BLOCK: usize = 128;
const BLOCK_BYTES: usize = 32;

/// kiln's TL1 row blocks: byte `16h + j` holds pair `2h` (high nibble) and `2h + 1` (low), pair `q` being
/// elements `32q + j` and `32q + 16 + j` (`kiln_ir::tl::row_blocks`).
struct Weights {
    rows: Vec<u8>,
    /// The same bytes with 16 rows in the lanes: byte `t` of block `b` of rows `16g..16g + 16` at
    /// `((g * blocks + b) * 32 + t) * 16`.
    transposed: Vec<u8>,
}

impl Weights {
    fn new(w: &[i8]) -> Self {
        let rows = tl::row_blocks(QuantFormat::TL1, w);
        let blocks = K / BLOCK;
        let mut transposed = vec![0u8; rows.len()];
        for (at, &byte) in rows.iter().enumerate() {
            let (r, b, t) = (
                at / (blocks * BLOCK_BYTES),
                at / BLOCK_BYTES % blocks,
                at % BLOCK_BYTES,
            );
            transposed[(((r / 16) * blocks + b) * BLOCK_BYTES + t) * 16 + r % 16] = byte;
        }
        Weights { rows, transposed }
    }
}

/// The codes (`weight + 1`) of each pair index's first and second weight, as `pshufb` tables.
fn code_tables() -> [[u8; 16]; 2] {
    let mut tables = [[0u8; 16]; 2];
    for i in 0..=tl::PAIR_INDEX_MAX {
        let weights = tl::pair_weights(i);
        for (table, w) in tables.iter_mut().zip(weights) {
            table[i as usize] = (w + 1) as u8;
        }
    }
    tables
}

/// Row sums by decoding: `sum(code * qx) - sum(qx)` per row, the codes' offset taken off at the end.
#[target_feature(enable = "avx2,avx512vl,avx512vnni")]
unsafe fn decode_vpdpbusd(w: &Weights, x: &[i8], out: &mut [i32]) {
    decode(w, x, out, |acc, codes, x| _mm_dpbusd_epi32(acc, codes, x))
}

#[target_feature(enable = "avx2")]
unsafe fn decode_pmaddubsw(w: &Weights, x: &[i8], out: &mut [i32]) {
    decode(w, x, out, |acc, codes, x| {
        let pairs = _mm_maddubs_epi16(codes, x);
        _mm_add_epi32(acc, _mm_madd_epi16(pairs, _mm_set1_epi16(1)))
    })
}

#[inline(always)]
unsafe fn decode(
    w: &Weights,
    x: &[i8],
    out: &mut [i32],
    dot: impl Fn(__m128i, __m128i, __m128i) -> __m128i,
) {
    let blocks = K / BLOCK;
    let [first, second] = code_tables().map(|t| _mm_loadu_si128(t.as_ptr().cast()));
    let low4 = _mm_set1_epi8(0x0F);
    let offset: i32 = x.iter().map(|&v| v as i32).sum();
    for (r, out) in out.iter_mut().enumerate() {
        let mut chains = [_mm_setzero_si128(); 4];
        for b in 0..blocks {
            let wb = w.rows.as_ptr().add((r * blocks + b) * BLOCK_BYTES);
            let xb = x.as_ptr().add(b * BLOCK);
            for h in 0..2 {
                let bytes = _mm_loadu_si128(wb.add(16 * h).cast());
                let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
                let low = _mm_and_si128(bytes, low4);
                for (n, index) in [high, low].into_iter().enumerate() {
                    let q = 2 * h + n;
                    let xa = _mm_loadu_si128(xb.add(32 * q).cast());
                    let xb2 = _mm_loadu_si128(xb.add(32 * q + 16).cast());
                    let acc = dot(chains[q], _mm_shuffle_epi8(first, index), xa);
                    chains[q] = dot(acc, _mm_shuffle_epi8(second, index), xb2);
                }
            }
        }
        let sum = _mm_add_epi32(
            _mm_add_epi32(chains[0], chains[1]),
            _mm_add_epi32(chains[2], chains[3]),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
        *out = _mm_cvtsi128_si32(sum) - offset;
    }
}

/// The token's tables, in the order the kernel reads them: for each block and byte `t` of it, the low and high
/// bytes of the sums of the pair in the high nibble, then of the pair in the low one (64 bytes).
fn activation_tables(x: &[i8]) -> Vec<u8> {
    let mut tables = vec![0u8; K / BLOCK * BLOCK_BYTES * 64];
    for (at, chunk) in tables.chunks_exact_mut(32).enumerate() {
        let (b, t, nibble) = (at / 64, at / 2 % 32, at % 2);
        let q = 2 * (t / 16) + nibble;
        let e = b * BLOCK + 32 * q + t % 16;
        let (x0, x1) = (x[e] as i16, x[e + 16] as i16);
        for i in 0..=tl::PAIR_INDEX_MAX {
            let [a, c] = tl::pair_weights(i);
            let sum = a as i16 * x0 + c as i16 * x1;
            chunk[i as usize] = sum as u8;
            chunk[16 + i as usize] = (sum >> 8) as u8;
        }
    }
    tables
}

#[target_feature(enable = "avx2")]
unsafe fn activation_lut(w: &Weights, x: &[i8], out: &mut [i32]) {
    let tables = activation_tables(x);
    let blocks = K / BLOCK;
    let low4 = _mm_set1_epi8(0x0F);
    for (g, out) in out.chunks_exact_mut(16).enumerate() {
        let mut totals = [_mm_setzero_si128(); 4];
        for b in 0..blocks {
            // Rows 0..8 and 8..16 as i16 lanes: a block's 64 pair sums stay within i16.
            let mut sums = [_mm_setzero_si128(); 2];
            let wb = w
                .transposed
                .as_ptr()
                .add((g * blocks + b) * BLOCK_BYTES * 16);
            let tb = tables.as_ptr().add(b * BLOCK_BYTES * 64);
            for t in 0..BLOCK_BYTES {
                let bytes = _mm_loadu_si128(wb.add(16 * t).cast());
                let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
                let low = _mm_and_si128(bytes, low4);
                for (n, index) in [high, low].into_iter().enumerate() {
                    let table = tb.add(64 * t + 32 * n);
                    let lo = _mm_shuffle_epi8(_mm_loadu_si128(table.cast()), index);
                    let hi = _mm_shuffle_epi8(_mm_loadu_si128(table.add(16).cast()), index);
                    sums[0] = _mm_add_epi16(sums[0], _mm_unpacklo_epi8(lo, hi));
                    sums[1] = _mm_add_epi16(sums[1], _mm_unpackhi_epi8(lo, hi));
                }
            }
            for (half, &s) in sums.iter().enumerate() {
                let lanes = [
                    _mm_cvtepi16_epi32(s),
                    _mm_cvtepi16_epi32(_mm_srli_si128(s, 8)),
                ];
                for (quarter, lanes) in lanes.into_iter().enumerate() {
                    let total = &mut totals[2 * half + quarter];
                    *total = _mm_add_epi32(*total, lanes);
                }
            }
        }
        for (i, total) in totals.iter().enumerate() {
            _mm_storeu_si128(out.as_mut_ptr().add(4 * i).cast(), *total);
        }
    }
}

type Kernel = unsafe fn(&Weights, &[i8], &mut [i32]);

fn tl_lookup(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let w: Vec<i8> = (0..ROWS * K).map(|_| rng.gen_range(-1..=1)).collect();
    let x: Vec<i8> = (0..K).map(|_| rng.gen_range(-127..=127)).collect();
    let weights = Weights::new(&w);
    let expected: Vec<i32> = w
        .chunks_exact(K)
        .map(|row| row.iter().zip(&x).map(|(&a, &b)| a as i32 * b as i32).sum())
        .collect();

    let mut kernels: Vec<(&str, Kernel)> = Vec::new();
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        kernels.push(("decode_vpdpbusd", decode_vpdpbusd));
    } else {
        eprintln!("SKIPPED decode_vpdpbusd: this CPU has no AVX-512 VNNI");
    }
    assert!(is_x86_feature_detected!("avx2"), "kiln needs AVX2");
    kernels.push(("decode_pmaddubsw", decode_pmaddubsw));
    kernels.push(("activation_lut", activation_lut));

    let mut group = c.benchmark_group("tl1_row_sums");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes(weights.rows.len() as u64));
    let mut out = vec![0i32; ROWS];
    for (name, kernel) in kernels {
        // SAFETY: each kernel's target features were detected above.
        unsafe { kernel(&weights, &x, &mut out) };
        assert_eq!(out, expected, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| unsafe { kernel(&weights, black_box(&x), &mut out) })
        });
    }
    let isa = host_isa().expect("this host is supported");
    let layout = Layout {
        scales: Scales::Gguf,
        interleave: 4,
    };
    let mut m = MatMul::new(
        &isa,
        &mut rng,
        QuantFormat::TL1,
        layout,
        ROWS,
        K,
        1,
        Epilogue::Store,
    );
    group.bench_function("generated", |b| {
        b.iter(|| {
            m.quantize();
            m.run(0, ROWS);
            black_box(&m.out);
        })
    });
    group.finish();
}

criterion_group!(benches, tl_lookup);
criterion_main!(benches);
