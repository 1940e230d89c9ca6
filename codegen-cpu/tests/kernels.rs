//! Every generated kernel against the reference math, on random inputs over many shapes: compiled for the host,
//! mapped executable by the runtime's loader, called through the ABI the executor uses.

use half::f16;
use kiln_codegen_cpu::{compile, host_isa, CpuIsa};
use kiln_ir::activation::ActivationFormat;
use kiln_ir::cpu_abi::{ActFormat, CpuFunction, Epilogue, MatMulArgs, QuantizeArgs};
use kiln_ir::dequant::dot_f32;
use kiln_ir::layout::{f16_fields, Layout};
use kiln_ir::plan::CodeEntry;
use kiln_ir::weights::WeightView;
use kiln_ir::{Activation, QuantFormat};
use kiln_runtime::cpu::code::NativeCode;
use rand::{Rng, SeedableRng};

/// One function compiled and mapped.
struct Loaded {
    code: NativeCode,
    function: CpuFunction,
}

impl Loaded {
    fn new(isa: &CpuIsa, function: CpuFunction) -> Self {
        let compiled = compile(&function, isa).unwrap();
        let entry = CodeEntry {
            function: function.clone(),
            offset: 0,
            len: compiled.code.len(),
            clif: String::new(),
        };
        Loaded {
            code: NativeCode::load(&[entry], &compiled.code).unwrap(),
            function,
        }
    }

    fn call<T>(&self, args: &T) {
        let f = self.code.get(&self.function).unwrap();
        unsafe { f(args as *const T as *const u8) }
    }
}

/// Random GGUF bytes for `rows` rows of `k` values: random codes, scales and minimums small and positive-ish.
fn random_weight(rng: &mut impl Rng, format: QuantFormat, rows: usize, k: usize) -> Vec<u8> {
    let blocks = rows * k / format.block_elems();
    let mut bytes: Vec<u8> = (0..blocks * format.block_bytes())
        .map(|_| rng.gen())
        .collect();
    if matches!(
        format,
        QuantFormat::F32 | QuantFormat::F16 | QuantFormat::BF16
    ) {
        let values: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        return match format {
            QuantFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            QuantFormat::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
    }
    for block in bytes.chunks_exact_mut(format.block_bytes()) {
        for &f in f16_fields(format) {
            let v = f16::from_f32(rng.gen_range(-0.02..0.02));
            block[f..f + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// `dot(dequantize(W[r]), round_trip(x[t]))`: the reference `matmul`.
fn reference(w: &WeightView, x: &[f32], k: usize) -> Vec<f32> {
    let n = w.shape[0];
    let mut rounded = x.to_vec();
    let act = ActivationFormat::for_weight(w.format);
    rounded
        .chunks_exact_mut(k)
        .for_each(|row| act.round_trip(row));
    let mut row = vec![0f32; k];
    let mut out = vec![0f32; rounded.len() / k * n];
    for r in 0..n {
        w.dequantize_row(r, &mut row);
        for (t, xt) in rounded.chunks_exact(k).enumerate() {
            out[t * n + r] = dot_f32(&row, xt);
        }
    }
    out
}

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
    let shape = [c.n, c.k];
    let gguf = random_weight(rng, c.format, c.n, c.k);
    let gguf2 = random_weight(rng, c.format, c.n, c.k);
    let stored = c.layout.repack(c.format, &shape, &gguf);
    let stored2 = c.layout.repack(c.format, &shape, &gguf2);
    let view = |data| WeightView {
        format: c.format,
        layout: c.layout,
        shape: &shape,
        data,
    };
    let x: Vec<f32> = (0..c.tokens * c.k)
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let extra: Vec<f32> = (0..c.tokens * c.n)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();

    let act = ActFormat::for_weight(c.format);
    let quantize = Loaded::new(
        isa,
        CpuFunction::Quantize {
            act,
            k: c.k,
            norm: false,
        },
    );
    let row_bytes = act.row_bytes(c.k);
    let mut xq = vec![0u8; c.tokens * row_bytes];
    quantize.call(&QuantizeArgs {
        x: x.as_ptr(),
        x_stride: c.k as u64,
        gain: std::ptr::null(),
        out: xq.as_mut_ptr(),
        out_stride: row_bytes as u64,
        rows: c.tokens as u64,
        eps: 0.0,
    });
    let matmul = Loaded::new(
        isa,
        CpuFunction::MatMul {
            format: c.format,
            layout: c.layout,
            k: c.k,
            epilogue: c.epilogue,
        },
    );
    let mut out = vec![f32::NAN; c.tokens * c.n];
    // Two calls over halves of the rows, as two threads would make them.
    let half = c.n / 2 / c.layout.interleave * c.layout.interleave;
    for (begin, end) in [(0, half), (half, c.n)] {
        matmul.call(&MatMulArgs {
            w: stored.as_ptr(),
            w2: stored2.as_ptr(),
            x: xq.as_ptr(),
            x_stride: row_bytes as u64,
            out: out.as_mut_ptr(),
            out_stride: c.n as u64,
            extra: extra.as_ptr(),
            extra_stride: c.n as u64,
            row_begin: begin as u64,
            row_end: end as u64,
            tokens: c.tokens as u64,
        });
    }

    let acc = reference(&view(&stored), &x, c.k);
    let acc2 = reference(&view(&stored2), &x, c.k);
    let expected: Vec<f32> = (0..c.tokens * c.n)
        .map(|i| match c.epilogue {
            Epilogue::Store => acc[i],
            Epilogue::Bias => acc[i] + extra[i % c.n],
            Epilogue::Residual => extra[i] + acc[i],
            Epilogue::Gated(Activation::Silu) => silu(acc[i]) * acc2[i],
            Epilogue::Gated(Activation::Gelu) => gelu(acc[i]) * acc2[i],
        })
        .collect();
    let scale = expected.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    out.iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f32::max)
}

const FORMATS: [QuantFormat; 8] = [
    QuantFormat::Q4_0,
    QuantFormat::Q4_1,
    QuantFormat::Q5_0,
    QuantFormat::Q5_1,
    QuantFormat::Q8_0,
    QuantFormat::F32,
    QuantFormat::F16,
    QuantFormat::BF16,
];

fn layouts_of(format: QuantFormat) -> Vec<Layout> {
    if f16_fields(format).is_empty() {
        vec![Layout::GGUF]
    } else {
        [1, 4]
            .map(|interleave| Layout {
                f32_scales: true,
                interleave,
            })
            .to_vec()
    }
}

#[test]
fn matmuls_match_the_reference_over_formats_shapes_and_epilogues() {
    let isa = host_isa().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let epilogues = [
        Epilogue::Store,
        Epilogue::Bias,
        Epilogue::Residual,
        Epilogue::Gated(Activation::Silu),
        Epilogue::Gated(Activation::Gelu),
    ];
    for format in FORMATS {
        for layout in layouts_of(format) {
            for (n, k, tokens) in [
                (4, 32, 1),
                (8, 64, 3),
                (12, 96, 5),
                (36, 576, 2),
                (8, 256, 7),
            ] {
                for epilogue in epilogues {
                    let case = Case {
                        format,
                        layout,
                        n,
                        k,
                        tokens,
                        epilogue,
                    };
                    let err = run_case(&isa, &mut rng, &case);
                    assert!(
                        err < 2e-4,
                        "{format} {layout} n={n} k={k} t={tokens} {}: relative error {err}",
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
        let codes = &block[act.codes_at()..];
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
        out.extend(codes.iter().map(|&c| c as i8 as f32 * d));
    }
    out
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
