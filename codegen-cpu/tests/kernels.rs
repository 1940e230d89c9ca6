//! Every generated kernel against the reference math, on random inputs over many shapes: compiled for the host,
//! mapped executable by the runtime's loader, called through the ABI the executor uses.

mod common;

use common::{reference, Loaded, MatMul, FORMATS};
use kiln_codegen_cpu::{host_isa, portable_isa, CpuIsa};
use kiln_ir::activation::ActivationFormat;
use kiln_ir::cpu_abi::{ActFormat, CpuFunction, Epilogue, QuantizeArgs};
use kiln_ir::layout::{f16_fields, Layout, Scales};
use kiln_ir::{Activation, QuantFormat};
use rand::{Rng, SeedableRng};

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044715 * x * x)).tanh())
}

struct Case {
    format: QuantFormat,
    layout: Layout,
    n: usize,
    k: usize,
    tokens: usize,
    epilogue: Epilogue,
}

/// Runs one matmul case; returns the largest error relative to the output's scale.
fn run_case(isa: &CpuIsa, rng: &mut impl Rng, c: &Case) -> f32 {
    let mut m = MatMul::new(isa, rng, c.format, c.layout, c.n, c.k, c.tokens, c.epilogue);
    m.quantize();
    // Two calls over halves of the rows, as two threads would make them.
    let half = c.n / 2 / c.layout.interleave * c.layout.interleave;
    m.run(0, half);
    m.run(half, c.n);

    let acc = reference(&m.view(&m.w), &m.x, c.k);
    let acc2 = reference(&m.view(&m.w2), &m.x, c.k);
    let extra = &m.extra;
    let expected: Vec<f32> = (0..c.tokens * c.n)
        .map(|i| match c.epilogue {
            Epilogue::Store => acc[i],
            Epilogue::Bias => acc[i] + extra[i % c.n],
            Epilogue::Residual => extra[i] + acc[i],
            Epilogue::Gated(Activation::Silu) => silu(acc[i]) * acc2[i],
            Epilogue::Gated(Activation::Gelu) => gelu(acc[i]) * acc2[i],
            Epilogue::Gated(Activation::ReluSqr) => acc[i].max(0.0).powi(2) * acc2[i],
        })
        .collect();
    let scale = expected.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    m.out
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

fn layouts_of(format: QuantFormat) -> Vec<Layout> {
    if format.is_float() {
        vec![Layout::GGUF]
    } else if f16_fields(format).is_empty() {
        // I2_S, TL1, TL2: no block scales to widen, rows interleaved or not.
        [1, 4]
            .map(|interleave| Layout {
                scales: Scales::Gguf,
                interleave,
            })
            .to_vec()
    } else {
        let mut layouts = [1, 4]
            .map(|interleave| Layout {
                scales: Scales::F32,
                interleave,
            })
            .to_vec();
        // The 32-value block formats also keep scales grouped four rows at a time, widened or f16.
        if format.block_elems() == 32 {
            layouts.extend([Scales::Grouped, Scales::GroupedF16].map(|scales| Layout {
                scales,
                interleave: 4,
            }));
        }
        layouts
    }
}

/// The host's ISA and the portable one, named: on a host with VNNI, the byte dot products of both `vpdpbusd` and
/// `pmaddubsw` (elsewhere both take `pmaddubsw`).
fn byte_dot_isas() -> [(&'static str, CpuIsa); 2] {
    [
        ("host", host_isa().unwrap()),
        ("portable", portable_isa().unwrap()),
    ]
}

#[test]
fn matmuls_match_the_reference_over_formats_shapes_and_epilogues() {
    for (target, isa) in byte_dot_isas() {
        matmuls_match_the_reference(target, &isa);
    }
}

fn matmuls_match_the_reference(target: &str, isa: &CpuIsa) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let epilogues = [
        Epilogue::Store,
        Epilogue::Bias,
        Epilogue::Residual,
        Epilogue::Gated(Activation::Silu),
        Epilogue::Gated(Activation::Gelu),
        Epilogue::Gated(Activation::ReluSqr),
    ];
    for format in FORMATS {
        for layout in layouts_of(format) {
            let shapes = [
                (4, 32, 1),
                (8, 64, 3),
                (12, 96, 5),
                (36, 576, 2),
                (8, 256, 7),
                (12, 768, 3),
                // Rows too long for the scratch buffer: several tokens take the one-token path.
                (4, 32768, 3),
            ];
            // Every shape with whole blocks (the k-quants' blocks are 256 values).
            for (n, k, tokens) in shapes
                .into_iter()
                .filter(|&(_, k, _)| k % format.block_elems() == 0)
            {
                for epilogue in epilogues {
                    let case = Case {
                        format,
                        layout,
                        n,
                        k,
                        tokens,
                        epilogue,
                    };
                    let err = run_case(isa, &mut rng, &case);
                    assert!(
                        err < 2e-4,
                        "{target}: {format} {layout} n={n} k={k} t={tokens} {}: relative error {err}",
                        epilogue.name()
                    );
                }
            }
        }
    }
}

/// The reference RMSNorm (f64 sum of squares, as ggml).
fn rms_norm(x: &mut [f32], g: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(g.len()) {
        let mean = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / g.len() as f64;
        let scale = 1.0 / (mean as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(g) {
            *v = *v * scale * w;
        }
    }
}

/// The values a quantized row stands for: `d * code` per block.
fn dequantize_act(act: ActFormat, row: &[u8], k: usize) -> Vec<f32> {
    if let ActFormat::F32 { .. } = act {
        return row
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
    }
    let mut out = Vec::with_capacity(k);
    for block in row.chunks_exact(act.block_bytes()) {
        let d = f32::from_le_bytes(block[..4].try_into().unwrap());
        let codes = &block[act.codes_at()..act.codes_at() + act.block_elems()];
        for (g, sums) in codes
            .chunks_exact(16)
            .zip(block[ActFormat::SUMS_AT..].chunks_exact(2))
        {
            let sum: i32 = g.iter().map(|&c| c as i8 as i32).sum();
            assert_eq!(
                sum,
                i16::from_le_bytes([sums[0], sums[1]]) as i32,
                "group sums are stored"
            );
        }
        if let Some(at) = act.scaled_sum_at() {
            let sum: i32 = codes.iter().map(|&c| c as i8 as i32).sum();
            let stored = f32::from_le_bytes(block[at..at + 4].try_into().unwrap());
            assert_eq!(
                stored.to_bits(),
                (d * sum as f32).to_bits(),
                "d * sum is stored"
            );
        }
        out.extend(codes.iter().map(|&c| c as i8 as f32 * d));
    }
    out
}

/// A token's outputs do not depend on the tokens computed beside it: a call over several tokens (a prompt, or a
/// batch of sequences, which reads the weights back from the scratch buffer) gives each token, bit for bit, what a
/// call for that token alone gives. The server relies on it: batching must not change a greedy request's ids.
#[test]
fn matmuls_over_several_tokens_give_each_token_its_one_token_outputs() {
    for (target, isa) in byte_dot_isas() {
        batching_keeps_each_tokens_outputs(target, &isa);
    }
}

fn batching_keeps_each_tokens_outputs(target: &str, isa: &CpuIsa) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for format in FORMATS {
        for layout in layouts_of(format) {
            for epilogue in [Epilogue::Residual, Epilogue::Gated(Activation::Silu)] {
                let (n, k, tokens) = (12, 768, 5);
                let mut m = MatMul::new(isa, &mut rng, format, layout, n, k, tokens, epilogue);
                m.quantize();
                m.run(0, n);
                let batched = m.out.clone();
                m.out.fill(f32::NAN);
                for t in 0..tokens {
                    m.run_token(t);
                }
                let differs = batched
                    .iter()
                    .zip(&m.out)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    differs,
                    None,
                    "{target}: {format} {layout} {}: output {differs:?} of {tokens} tokens computed together differs \
                     from the token computed alone",
                    epilogue.name()
                );
            }
        }
    }
}

/// Weights whose every code is its format's largest value, with unit scales (Q8_0: -128 in even rows, 127 in odd
/// ones, the extremes of both its byte dot products).
fn extreme_weight(format: QuantFormat, rows: usize, k: usize) -> Vec<u8> {
    let tensor_scale = |mut bytes: Vec<u8>| {
        bytes.extend(1.0f32.to_le_bytes());
        bytes.extend([0u8; 28]);
        bytes
    };
    match format {
        QuantFormat::TL1 | QuantFormat::TL2 => {
            tensor_scale(kiln_ir::tl::row_blocks(format, &vec![1; rows * k]))
        }
        QuantFormat::I2_S => tensor_scale(vec![0xAA; rows * k / 4]),
        _ => {
            let fill = match format {
                QuantFormat::Q8_0 => 0x80,
                QuantFormat::TQ2_0 => 0xAA,
                _ => 0xFF,
            };
            let mut bytes = vec![fill; rows * k / format.block_elems() * format.block_bytes()];
            let row_bytes = k / format.block_elems() * format.block_bytes();
            if format == QuantFormat::Q8_0 {
                bytes
                    .chunks_exact_mut(row_bytes)
                    .skip(1)
                    .step_by(2)
                    .for_each(|row| row.fill(0x7F));
            }
            for block in bytes.chunks_exact_mut(format.block_bytes()) {
                for &f in f16_fields(format) {
                    block[f..f + 2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
                }
            }
            bytes
        }
    }
}

/// The byte dot products stay exact at the extremes: every weight code at its largest and every activation
/// code at +-127, where `pmaddubsw`'s i16 pair sums (and the i16 sums of several of them) are closest to
/// saturating.
/// The 32-value block formats' scales grouped four rows at a time (how a CPU plan stores them), widened or kept f16
/// and widened by the kernel, give every output the bits of scales at each block's front (how a plan with CUDA
/// kernels stores them): the same products in the same order, read from another place.
#[test]
fn grouped_scales_give_the_bits_of_scales_per_block() {
    let isa = host_isa().unwrap();
    let widened = Layout {
        scales: Scales::F32,
        interleave: 4,
    };
    let grouped = [Scales::Grouped, Scales::GroupedF16].map(|scales| Layout {
        scales,
        interleave: 4,
    });
    let block32 = FORMATS.into_iter().filter(|f| f.block_elems() == 32);
    for format in block32 {
        for epilogue in [Epilogue::Store, Epilogue::Gated(Activation::Silu)] {
            for tokens in [1, 3] {
                let outputs = [widened, grouped[0], grouped[1]].map(|layout| {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
                    let mut m =
                        MatMul::new(&isa, &mut rng, format, layout, 12, 320, tokens, epilogue);
                    m.quantize();
                    m.run(0, 12);
                    m.out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                });
                for (layout, output) in grouped.iter().zip(&outputs[1..]) {
                    assert_eq!(
                        &outputs[0], output,
                        "{format} {layout} {epilogue:?}, {tokens} tokens"
                    );
                }
            }
        }
    }
}

#[test]
fn matmuls_are_exact_at_the_largest_codes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for (target, isa) in byte_dot_isas() {
        for format in FORMATS.into_iter().filter(|f| !f.is_float()) {
            for layout in layouts_of(format) {
                let (n, k, tokens) = (8, 512, 3);
                let mut m = MatMul::new(
                    &isa,
                    &mut rng,
                    format,
                    layout,
                    n,
                    k,
                    tokens,
                    Epilogue::Store,
                );
                m.w = layout.repack(format, &[n, k], &extreme_weight(format, n, k));
                for sign in [1.0, -1.0] {
                    m.x.fill(sign);
                    m.quantize();
                    m.run(0, n);
                    let expected = reference(&m.view(&m.w), &m.x, k);
                    for (i, (got, want)) in m.out.iter().zip(&expected).enumerate() {
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{target}: {format} {layout} activations {sign}: output {i} is {got}, not {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Activation quantization is bit-exact with ggml's rounding (`ActivationFormat::round_trip`), with and without
/// the RMSNorm prologue, including rows of zeros and rows with one huge outlier.
#[test]
fn activation_quantization_is_exact() {
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for format in [
        QuantFormat::Q4_1,
        QuantFormat::Q4_K,
        QuantFormat::F16,
        QuantFormat::BF16,
        QuantFormat::F32,
    ] {
        let act = ActFormat::for_weight(format);
        for k in [256, 512, 1536] {
            for norm in [false, true] {
                let rows = 4;
                let mut x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-3.0..3.0)).collect();
                x[..k].fill(0.0);
                x[k + 5] = 900.0;
                x[2 * k + 7] = 1e-6;
                let g: Vec<f32> = (0..k).map(|_| rng.gen_range(0.5..1.5)).collect();
                let row_bytes = act.row_bytes(k);
                let mut out = vec![0u8; rows * row_bytes];
                Loaded::new(&isa, CpuFunction::Quantize { act, k, norm }).call(&QuantizeArgs {
                    x: x.as_ptr(),
                    x_stride: k as u64,
                    gain: g.as_ptr(),
                    out: out.as_mut_ptr(),
                    out_stride: row_bytes as u64,
                    rows: rows as u64,
                    eps: 1e-5,
                });
                let mut expected = x.clone();
                if norm {
                    rms_norm(&mut expected, &g, 1e-5);
                }
                let rounding = ActivationFormat::for_weight(format);
                expected
                    .chunks_exact_mut(k)
                    .for_each(|row| rounding.round_trip(row));
                for (r, (got, want)) in out
                    .chunks_exact(row_bytes)
                    .zip(expected.chunks_exact(k))
                    .enumerate()
                {
                    let got = dequantize_act(act, got, k);
                    let bad = got
                        .iter()
                        .zip(want)
                        .position(|(a, b)| a.to_bits() != b.to_bits() && !(*a == 0.0 && *b == 0.0));
                    assert!(
                        bad.is_none(),
                        "{} k={k} norm={norm} row {r}: element {bad:?} differs",
                        act.name()
                    );
                }
            }
        }
    }
}

/// Attention of a group of query heads over a paged cache whose pages are out of order, for head widths of the real
/// models (64, 256) and a small one, groups of one head and of the real models' sizes (3, 4, 7: tiles of keys and
/// of heads, and a group split into two tiles), over spans that start at 0, start inside a page (a sliding
/// window), hold one position, or cross several pages, with every remainder of the four-position steps; against
/// softmax attention in f64.
#[test]
fn attention_matches_the_reference_over_pages_and_windows() {
    use kiln_ir::cpu_abi::{AttentionArgs, KV_PAGE};
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Three KV heads, each with a region of pages; the queries read the middle one.
    let (kv_heads, kv_head) = (3, 1);
    let pages: Vec<u32> = vec![4, 0, 3, 1, 2];
    let positions = pages.len() * KV_PAGE;
    for (head_dim, group) in [
        (8, 1),
        (8, 7),
        (64, 1),
        (64, 3),
        (64, 7),
        (256, 1),
        (256, 4),
    ] {
        let f = Loaded::new(&isa, CpuFunction::Attention { head_dim, group });
        let page_stride = KV_PAGE * head_dim;
        let pool = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            (0..kv_heads * pages.len() * page_stride)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect()
        };
        let (k, v) = (pool(&mut rng), pool(&mut rng));
        let q: Vec<f32> = (0..group * head_dim)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let kv_offset = kv_head * pages.len() * page_stride;
        let at = |j: usize| {
            pages[j / KV_PAGE] as usize * page_stride + kv_offset + j % KV_PAGE * head_dim
        };
        for (first, last) in [
            (0, 0),
            (0, 15),
            (0, 16),
            (2, 12),
            (5, 37),
            (17, 17),
            (0, positions - 1),
            (30, 79),
        ] {
            let scale = 1.0 / (head_dim as f32).sqrt();
            let expected: Vec<f64> = q
                .chunks(head_dim)
                .flat_map(|q| {
                    let scores: Vec<f64> = (first..=last)
                        .map(|j| {
                            (0..head_dim)
                                .map(|i| q[i] as f64 * k[at(j) + i] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    (0..head_dim)
                        .map(|i| {
                            (first..=last)
                                .zip(&weights)
                                .map(|(j, w)| w * v[at(j) + i] as f64)
                                .sum::<f64>()
                                / total
                        })
                        .collect::<Vec<f64>>()
                })
                .collect();
            let mut out = vec![f32::NAN; group * head_dim];
            let mut scratch = vec![f32::NAN; group * (last - first + 1)];
            f.call(&AttentionArgs {
                q: q.as_ptr(),
                k: k.as_ptr(),
                v: v.as_ptr(),
                pages: pages.as_ptr(),
                page_stride: page_stride as u64,
                kv_offset: kv_offset as u64,
                first: first as u64,
                last: last as u64,
                out: out.as_mut_ptr(),
                scores: scratch.as_mut_ptr(),
                scale,
            });
            let err = out
                .iter()
                .zip(&expected)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err < 1e-6,
                "head_dim {head_dim}, group {group}, positions {first}..={last}: error {err}"
            );
        }
    }
}

/// Generated RoPE against the executor's rotation (`RopeTable::apply`'s arithmetic, written out here): bit for bit,
/// both pairings, whole and partial rotary widths, over rows wider than their rotated heads (as `qkv_rope`'s rows
/// hold the value heads after them).
#[test]
fn rope_matches_the_reference_bit_for_bit() {
    use kiln_ir::cpu_abi::RopeArgs;
    use kiln_ir::RopeStyle;
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (tokens, heads) = (5, 3);
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for (head_dim, dims) in [(8, 8), (64, 64), (128, 64), (256, 256)] {
            let f = Loaded::new(
                &isa,
                CpuFunction::Rope {
                    head_dim,
                    dims,
                    style,
                },
            );
            let half = dims / 2;
            let row = heads * head_dim + 16;
            let x: Vec<f32> = (0..tokens * row)
                .map(|_| rng.gen_range(-4.0..4.0))
                .collect();
            let angles: Vec<f64> = (0..tokens * half)
                .map(|_| rng.gen_range(-9.0..9.0))
                .collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
            let mut expected = x.clone();
            for t in 0..tokens {
                for h in 0..heads {
                    let head = &mut expected[t * row + h * head_dim..][..head_dim];
                    for i in 0..half {
                        let (a, b) = match style {
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                            RopeStyle::Neox => (i, i + half),
                        };
                        let (c, s) = (cos[t * half + i], sin[t * half + i]);
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * c - x1 * s;
                        head[b] = x0 * s + x1 * c;
                    }
                }
            }
            let mut out = x.clone();
            f.call(&RopeArgs {
                x: out.as_mut_ptr(),
                x_stride: row as u64,
                tokens: tokens as u64,
                heads: heads as u64,
                cos: cos.as_ptr(),
                sin: sin.as_ptr(),
            });
            let differs = out
                .iter()
                .zip(&expected)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                differs,
                None,
                "{} head_dim {head_dim} dims {dims}",
                style.name()
            );
        }
    }
}

/// Generated stand-alone RMSNorm against the executor's (`rms_scale`'s f64 sum of squares, then `x * scale *
/// gain`, then the residual added): exact, in place over heads (QK-norms) and into another buffer with the
/// residual (post-norms).
#[test]
fn rms_norm_matches_the_reference() {
    use kiln_ir::cpu_abi::RmsNormArgs;
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let rows = 3;
    for (n, groups) in [(8, 1), (64, 3), (256, 2), (640, 1)] {
        for residual in [false, true] {
            let f = Loaded::new(&isa, CpuFunction::RmsNorm { n, residual });
            let stride = groups * n + 8;
            let mut values = |len: usize, range: f32| -> Vec<f32> {
                (0..len).map(|_| rng.gen_range(-range..range)).collect()
            };
            let x = values(rows * stride, 3.0);
            let res = values(rows * stride, 1.0);
            let gain = values(n, 2.0);
            let eps = 1e-6;
            let mut expected = x.clone();
            for t in 0..rows {
                for g in 0..groups {
                    let at = t * stride + g * n;
                    let group = &x[at..at + n];
                    let mean = group.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let scale = 1.0 / (mean as f32 + eps).sqrt();
                    for i in 0..n {
                        let y = group[i] * scale * gain[i];
                        expected[at + i] = if residual { res[at + i] + y } else { y };
                    }
                }
            }
            // In place without the residual (as QK-norms run), into a copy with it.
            let mut out = x.clone();
            let x_ptr = if residual { x.as_ptr() } else { out.as_ptr() };
            f.call(&RmsNormArgs {
                x: x_ptr,
                x_stride: stride as u64,
                out: out.as_mut_ptr(),
                out_stride: stride as u64,
                residual: res.as_ptr(),
                residual_stride: stride as u64,
                rows: rows as u64,
                groups: groups as u64,
                gain: gain.as_ptr(),
                eps,
            });
            let differs = out
                .iter()
                .zip(&expected)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differs, None, "n {n} groups {groups} residual {residual}");
        }
    }
}

/// Generated embedding lookups against the reference dequantizer (`WeightView::dequantize_row`): bit for bit, for
/// every format kiln generates a lookup for, with rows interleaved or not.
#[test]
fn embedding_lookups_match_the_reference_dequantizer() {
    use kiln_ir::cpu_abi::EmbedArgs;
    use kiln_ir::weights::WeightView;
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let (rows, k) = (12, 512);
    let ids: Vec<i32> = vec![0, 11, 5, 5, 2, 7, 10];
    let mut covered = Vec::new();
    for format in FORMATS {
        for layout in layouts_of(format) {
            let function = CpuFunction::Embed { format, layout, k };
            if !kiln_codegen_cpu::supports(&function) || k % format.block_elems() != 0 {
                continue;
            }
            covered.push(format);
            let shape = [rows, k];
            let table = layout.repack(
                format,
                &shape,
                &common::random_weight(&mut rng, format, rows, k),
            );
            let view = WeightView {
                format,
                layout,
                shape: &shape,
                data: &table,
            };
            let mut expected = vec![0f32; ids.len() * k];
            for (row, &id) in expected.chunks_exact_mut(k).zip(&ids) {
                view.dequantize_row(id as usize, row);
            }
            let mut out = vec![f32::NAN; ids.len() * k];
            Loaded::new(&isa, function).call(&EmbedArgs {
                table: table.as_ptr(),
                ids: ids.as_ptr(),
                tokens: ids.len() as u64,
                out: out.as_mut_ptr(),
                out_stride: k as u64,
            });
            let differs = out
                .iter()
                .zip(&expected)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differs, None, "{format} {layout}");
        }
    }
    covered.dedup();
    assert_eq!(
        covered,
        FORMATS
            .into_iter()
            .filter(|f| !f.has_tensor_scale())
            .collect::<Vec<_>>(),
        "every format but the whole-tensor-scaled ternaries (never embedding tables) has a generated lookup"
    );
}
