//! Every generated CUDA kernel against the reference math on a GPU, on random inputs over many shapes (ragged
//! row and token tails included): compiled by NVRTC, loaded by the runtime's device layer, launched with the
//! argument lists the executor uses.
//!
//! These need a GPU, so they are `#[ignore]`d: a machine without one lists them as ignored, never as passed. On
//! a CUDA machine: `cargo test -p kiln-codegen-cuda --test gpu_kernels -- --ignored`.

#[path = "../../codegen-cpu/tests/common/weights.rs"]
mod weights;

use kiln_ir::cpu_abi::{ActFormat, Epilogue};
use kiln_ir::cuda_abi::{CudaKernel, ATTENTION_THREADS, MATMUL_TOKENS, MATMUL_WARPS, ROW_THREADS};
use kiln_ir::layout::{f16_fields, Layout, Scales};
use kiln_ir::weights::WeightView;
use kiln_ir::{Activation, QuantFormat, RopeParams, RopeStyle};
use kiln_runtime::cuda::device::{Arg, Buffer, Device, Launch};
use kiln_runtime::reference::kernels as reference;
use rand::{Rng, SeedableRng};
use weights::{random_weight, reference as matmul_reference, FORMATS};

/// The formats of the CPU kernel tests that the CUDA backend has kernels for; any other is named on stderr, since
/// `kiln compile --target cuda` refuses it with an error.
fn cuda_formats() -> Vec<QuantFormat> {
    let (ours, not): (Vec<_>, Vec<_>) = FORMATS
        .into_iter()
        .partition(|&f| kiln_codegen_cuda::supports_format(f));
    eprintln!("no CUDA kernels for {not:?}: not tested here");
    ours
}

/// Compiles `kernels` and opens GPU 0 with them.
fn device(kernels: &[CudaKernel]) -> Device {
    assert!(
        kiln_runtime::cuda::driver_available(),
        "no CUDA driver: these tests need a GPU"
    );
    let code = kiln_codegen_cuda::compile(kernels, &kiln_codegen_cuda::ARCHS, |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    Device::open(0, Some(&code)).unwrap_or_else(|e| panic!("{e}"))
}

fn upload_f32(dev: &Device, v: &[f32]) -> Buffer {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    dev.upload(&bytes).unwrap()
}

fn read_f32(dev: &Device, b: &Buffer, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; 4 * n];
    dev.read(b, 0, &mut bytes).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The largest difference relative to the expected values' scale.
fn relative_error(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len());
    let scale = expected.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(expected)
        .map(|(a, b)| {
            if a.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs() / scale
            }
        })
        .fold(0.0, f32::max)
}

fn layouts_of(format: QuantFormat) -> Vec<Layout> {
    if f16_fields(format).is_empty() {
        vec![
            Layout::GGUF,
            Layout {
                scales: Scales::Gguf,
                interleave: 4,
            },
        ]
    } else {
        vec![
            Layout::GGUF,
            Layout {
                scales: Scales::F32,
                interleave: 4,
            },
        ]
    }
}

struct Case {
    format: QuantFormat,
    layout: Layout,
    n: usize,
    k: usize,
    tokens: usize,
    epilogue: Epilogue,
    norm: bool,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let epilogues = [
        Epilogue::Store,
        Epilogue::Bias,
        Epilogue::Residual,
        Epilogue::Gated(Activation::Silu),
        Epilogue::Gated(Activation::Gelu),
        Epilogue::Gated(Activation::ReluSqr),
    ];
    for format in cuda_formats() {
        for layout in layouts_of(format) {
            for (n, k, tokens) in [(4, 256, 1), (36, 512, 3), (20, 768, 11), (8, 256, 17)] {
                for (i, epilogue) in epilogues.into_iter().enumerate() {
                    out.push(Case {
                        format,
                        layout,
                        n,
                        k,
                        tokens,
                        epilogue,
                        norm: i % 2 == 1,
                    });
                }
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a GPU: run with --ignored on a CUDA machine"]
fn matmuls_match_the_reference_over_formats_shapes_and_epilogues() {
    let cases = cases();
    let mut kernels: Vec<CudaKernel> = Vec::new();
    for c in &cases {
        for k in [
            CudaKernel::Quantize {
                act: ActFormat::for_weight(c.format),
                k: c.k,
                norm: c.norm,
            },
            CudaKernel::MatMul {
                format: c.format,
                layout: c.layout,
                k: c.k,
                epilogue: c.epilogue,
            },
        ] {
            if !kernels.contains(&k) {
                kernels.push(k);
            }
        }
    }
    let dev = device(&kernels);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for c in &cases {
        let shape = [c.n, c.k];
        let mut weight = || {
            c.layout.repack(
                c.format,
                &shape,
                &random_weight(&mut rng, c.format, c.n, c.k),
            )
        };
        let (w, w2) = (weight(), weight());
        let x: Vec<f32> = (0..c.tokens * c.k)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect();
        let gain: Vec<f32> = (0..c.k).map(|_| rng.gen_range(0.5..1.5)).collect();
        let extra: Vec<f32> = (0..c.tokens * c.n)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let act = ActFormat::for_weight(c.format);

        let (dw, dw2) = (dev.upload(&w).unwrap(), dev.upload(&w2).unwrap());
        let (dx, dgain, dextra) = (
            upload_f32(&dev, &x),
            upload_f32(&dev, &gain),
            upload_f32(&dev, &extra),
        );
        let dq = dev.alloc(c.tokens * act.row_bytes(c.k)).unwrap();
        let dout = upload_f32(&dev, &vec![f32::NAN; c.tokens * c.n]);
        let quantize = CudaKernel::Quantize {
            act,
            k: c.k,
            norm: c.norm,
        };
        let matmul = CudaKernel::MatMul {
            format: c.format,
            layout: c.layout,
            k: c.k,
            epilogue: c.epilogue,
        };
        dev.launch(&Launch {
            kernel: dev.kernel(&quantize.name()).unwrap(),
            grid: (c.tokens as u32, 1),
            block: ROW_THREADS,
            args: vec![
                Arg::Ptr(dx.ptr),
                Arg::Ptr(if c.norm { dgain.ptr } else { 0 }),
                Arg::Ptr(dq.ptr),
                Arg::F32(1e-5),
            ],
        })
        .unwrap();
        dev.launch(&Launch {
            kernel: dev.kernel(&matmul.name()).unwrap(),
            grid: (
                c.n.div_ceil(MATMUL_WARPS as usize) as u32,
                c.tokens.div_ceil(MATMUL_TOKENS as usize) as u32,
            ),
            block: MATMUL_WARPS * 32,
            args: vec![
                Arg::Ptr(dw.ptr),
                Arg::Ptr(dw2.ptr),
                Arg::Ptr(dq.ptr),
                Arg::Ptr(dout.ptr),
                Arg::U64(c.n as u64),
                Arg::Ptr(dextra.ptr),
                Arg::U64(c.n as u64),
                Arg::I32(c.n as i32),
                Arg::I32(c.tokens as i32),
            ],
        })
        .unwrap();
        let got = read_f32(&dev, &dout, c.tokens * c.n);

        let h = if c.norm {
            reference::rms_norm(&x, &gain, 1e-5)
        } else {
            x.clone()
        };
        let view = |data| WeightView {
            format: c.format,
            layout: c.layout,
            shape: &shape,
            data,
        };
        let acc = matmul_reference(&view(&w), &h, c.k);
        let acc2 = matmul_reference(&view(&w2), &h, c.k);
        let expected: Vec<f32> = (0..c.tokens * c.n)
            .map(|i| match c.epilogue {
                Epilogue::Store => acc[i],
                Epilogue::Bias => acc[i] + extra[i % c.n],
                Epilogue::Residual => extra[i] + acc[i],
                Epilogue::Gated(act) => reference::activation(act)(acc[i]) * acc2[i],
            })
            .collect();
        let err = relative_error(&got, &expected);
        assert!(
            err < 2e-4,
            "{} {} n={} k={} t={} {} norm={}: relative error {err}",
            c.format,
            c.layout,
            c.n,
            c.k,
            c.tokens,
            c.epilogue.name(),
            c.norm
        );
    }
}

#[test]
#[ignore = "needs a GPU: run with --ignored on a CUDA machine"]
fn embeddings_match_the_dequantizer() {
    let d = 512;
    let rows = 12;
    let mut cases = Vec::new();
    for format in cuda_formats() {
        for layout in layouts_of(format) {
            cases.push((format, layout));
        }
    }
    let kernels: Vec<CudaKernel> = cases
        .iter()
        .map(|&(format, layout)| CudaKernel::Embed { format, layout, d })
        .collect();
    let dev = device(&kernels);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (kernel, &(format, layout)) in kernels.iter().zip(&cases) {
        let shape = [rows, d];
        let w = layout.repack(format, &shape, &random_weight(&mut rng, format, rows, d));
        let ids: Vec<i32> = vec![3, 0, 11, 3, 7];
        let dw = dev.upload(&w).unwrap();
        let dids = dev
            .upload(
                &ids.iter()
                    .flat_map(|i| i.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let dout = upload_f32(&dev, &vec![f32::NAN; ids.len() * d]);
        dev.launch(&Launch {
            kernel: dev.kernel(&kernel.name()).unwrap(),
            grid: (ids.len() as u32, 1),
            block: ROW_THREADS,
            args: vec![Arg::Ptr(dw.ptr), Arg::Ptr(dids.ptr), Arg::Ptr(dout.ptr)],
        })
        .unwrap();
        let got = read_f32(&dev, &dout, ids.len() * d);
        let view = WeightView {
            format,
            layout,
            shape: &shape,
            data: &w,
        };
        let mut expected = vec![0f32; ids.len() * d];
        for (row, &id) in expected.chunks_exact_mut(d).zip(&ids) {
            view.dequantize_row(id as usize, row);
        }
        assert_eq!(got, expected, "{format} {layout}");
    }
}

#[test]
#[ignore = "needs a GPU: run with --ignored on a CUDA machine"]
fn norm_rope_and_attention_match_the_reference() {
    let (heads, kv_heads, hd) = (8, 2, 64);
    let rope = RopeParams {
        base: 10000.0,
        dims: hd,
        freq_scale: 1.0,
        style: RopeStyle::Neox,
    };
    let norm = CudaKernel::RmsNorm { d: hd };
    let rope_kernel = CudaKernel::Rope {
        style: rope.style,
        head_dim: hd,
        dims: hd,
    };
    let append = CudaKernel::KvAppend {
        width: kv_heads * hd,
    };
    let attend = CudaKernel::Attention {
        head_dim: hd,
        group: heads / kv_heads,
    };
    let dev = device(&[
        norm.clone(),
        rope_kernel.clone(),
        append.clone(),
        attend.clone(),
    ]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for window in [None, Some(5)] {
        let (qw, kvw) = (heads * hd, kv_heads * hd);
        let stride = qw + 2 * kvw;
        let mut cache = reference::KvCache::default();
        let k_cache = dev.alloc(64 * kvw * 4).unwrap();
        let v_cache = dev.alloc(64 * kvw * 4).unwrap();
        // A prefill of 9 tokens, then two single-token steps.
        let mut start = 0;
        for t in [9usize, 1, 1] {
            let qkv: Vec<f32> = (0..t * stride).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let gain: Vec<f32> = (0..hd).map(|_| rng.gen_range(0.5..1.5)).collect();
            let positions: Vec<i32> = (start..start + t as i32).collect();
            let dqkv = upload_f32(&dev, &qkv);
            let dgain = upload_f32(&dev, &gain);
            let dpos = dev
                .upload(
                    &positions
                        .iter()
                        .flat_map(|p| p.to_le_bytes())
                        .collect::<Vec<u8>>(),
                )
                .unwrap();
            let dout = upload_f32(&dev, &vec![f32::NAN; t * qw]);
            let launches = [
                // QK-norm over the q and k heads in place, then RoPE, then attention.
                Launch {
                    kernel: dev.kernel(&norm.name()).unwrap(),
                    grid: (t as u32, (heads + kv_heads) as u32),
                    block: ROW_THREADS,
                    args: vec![
                        Arg::Ptr(dqkv.ptr),
                        Arg::U64(stride as u64),
                        Arg::Ptr(dgain.ptr),
                        Arg::Ptr(0),
                        Arg::U64(0),
                        Arg::Ptr(dqkv.ptr),
                        Arg::U64(stride as u64),
                        Arg::F32(1e-6),
                    ],
                },
                Launch {
                    kernel: dev.kernel(&rope_kernel.name()).unwrap(),
                    grid: (t as u32, (heads + kv_heads) as u32),
                    block: (hd / 2) as u32,
                    args: vec![
                        Arg::Ptr(dqkv.ptr),
                        Arg::U64(stride as u64),
                        Arg::Ptr(dpos.ptr),
                        Arg::F32(rope.base),
                        Arg::F32(rope.freq_scale),
                    ],
                },
                Launch {
                    kernel: dev.kernel(&append.name()).unwrap(),
                    grid: (t as u32, 1),
                    block: ROW_THREADS,
                    args: vec![
                        Arg::Ptr(dqkv.ptr + 4 * qw as u64),
                        Arg::Ptr(dqkv.ptr + 4 * (qw + kvw) as u64),
                        Arg::U64(stride as u64),
                        Arg::Ptr(dpos.ptr),
                        Arg::Ptr(k_cache.ptr),
                        Arg::Ptr(v_cache.ptr),
                    ],
                },
                Launch {
                    kernel: dev.kernel(&attend.name()).unwrap(),
                    grid: (t as u32, heads as u32),
                    block: ATTENTION_THREADS,
                    args: vec![
                        Arg::Ptr(dqkv.ptr),
                        Arg::U64(stride as u64),
                        Arg::Ptr(k_cache.ptr),
                        Arg::Ptr(v_cache.ptr),
                        Arg::Ptr(dpos.ptr),
                        Arg::Ptr(dout.ptr),
                        Arg::I32(kv_heads as i32),
                        Arg::F32(0.125),
                        Arg::I32(window.map_or(0, |w| w as i32)),
                    ],
                },
            ];
            for l in &launches {
                dev.launch(l).unwrap();
            }
            let got = read_f32(&dev, &dout, t * qw);
            let got_qkv = read_f32(&dev, &dqkv, t * stride);

            // The reference: per-head RMSNorm and RoPE on q and k, then attention over the cache.
            let mut q = Vec::new();
            let mut k = Vec::new();
            let mut v = Vec::new();
            for token in qkv.chunks_exact(stride) {
                q.extend(reference::rms_norm(&token[..qw], &gain, 1e-6));
                k.extend(reference::rms_norm(&token[qw..qw + kvw], &gain, 1e-6));
                v.extend_from_slice(&token[qw + kvw..]);
            }
            reference::rope(&mut q, hd, &positions, &rope);
            reference::rope(&mut k, hd, &positions, &rope);
            let rotated: Vec<f32> = got_qkv
                .chunks_exact(stride)
                .flat_map(|token| token[..qw].to_vec())
                .collect();
            let err = relative_error(&rotated, &q);
            assert!(err < 1e-5, "norm + rope, t={t}: relative error {err}");
            let shape = reference::AttentionShape {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 0.125,
                window,
            };
            let expected = reference::attention(&q, &k, &v, &positions, &mut cache, &shape);
            let err = relative_error(&got, &expected);
            assert!(
                err < 1e-4,
                "attention window={window:?} t={t}: relative error {err}"
            );
            start += t as i32;
        }
    }
}
