//! The CLIF of one kernel per format and per epilogue, as generated (before Cranelift's optimizations), so any
//! change to code generation shows up in review. Bless changes with `INSTA_UPDATE=always` (or `cargo insta`).

use kiln_codegen_cpu::{generate, isa_with_features, portable_isa, CpuIsa};
use kiln_ir::cpu_abi::{ActFormat, CpuFunction, Epilogue, FloatRound};
use kiln_ir::layout::{Layout, Scales};
use kiln_ir::{Activation, QuantFormat};

/// A fixed target, whatever the host: x86-64 with AVX-VNNI, whose byte dot products are the widening tree that
/// Cranelift folds into `vpdpbusd`.
fn vnni_isa() -> CpuIsa {
    isa_with_features(&[
        "sse3", "ssse3", "sse41", "sse42", "avx", "avx2", "fma", "avx_vnni",
    ])
    .unwrap()
}

fn clif_for(function: CpuFunction, isa: &CpuIsa) -> String {
    generate(&function, isa).unwrap().display().to_string()
}

fn clif(function: CpuFunction) -> String {
    clif_for(function, &vnni_isa())
}

/// Rows interleaved by 4, their scales grouped and widened to f32.
const GROUPED_X4: Layout = Layout {
    scales: Scales::Grouped,
    interleave: 4,
};

/// How a CPU plan stores a 32-value block format: rows interleaved by 4, their scales grouped, kept f16 for the
/// formats with a code offset (Q4_0, Q5_0, Q8_0) and widened for those with a minimum.
fn plan_layout(format: QuantFormat) -> Layout {
    match format {
        QuantFormat::Q4_1 | QuantFormat::Q5_1 => GROUPED_X4,
        _ => Layout {
            scales: Scales::GroupedF16,
            interleave: 4,
        },
    }
}

#[test]
fn matmul_per_format() {
    for format in [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
    ] {
        let f = CpuFunction::MatMul {
            format,
            layout: plan_layout(format),
            k: 64,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), clif(f));
    }
    // A plan with CUDA kernels too keeps the scales at each block's front.
    let f = CpuFunction::MatMul {
        format: QuantFormat::Q4_1,
        layout: Layout {
            scales: Scales::F32,
            interleave: 4,
        },
        k: 64,
        epilogue: Epilogue::Store,
    };
    insta::assert_snapshot!("matmul_q4_1_f32s", clif(f));
    // The k-quants' blocks are 256 values: one row, to keep the snapshot readable.
    for format in [
        QuantFormat::Q4_K,
        QuantFormat::Q5_K,
        QuantFormat::Q6_K,
        QuantFormat::TQ2_0,
        QuantFormat::TQ1_0,
    ] {
        let f = CpuFunction::MatMul {
            format,
            layout: Layout {
                scales: Scales::F32,
                interleave: 1,
            },
            k: 256,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), clif(f));
    }
    // The ternary row formats: no block scales; one block of 128 (I2_S shifts crumbs out, TL1/TL2 look indices up).
    for format in [QuantFormat::I2_S, QuantFormat::TL1, QuantFormat::TL2] {
        let f = CpuFunction::MatMul {
            format,
            layout: Layout::GGUF,
            k: 128,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), clif(f));
    }
    for format in [QuantFormat::F32, QuantFormat::F16, QuantFormat::BF16] {
        let f = CpuFunction::MatMul {
            format,
            layout: Layout::GGUF,
            k: 32,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), clif(f));
    }
}

/// On x86 without VNNI (the portable target) the byte dot products are `pmaddubsw` and `pmaddwd`, and Q8_0 moves
/// its weights' signs onto the activations: one Block32 format with 4-bit codes, Q8_0, and a k-quant.
#[test]
fn matmul_without_vnni() {
    let q4_k = Layout {
        scales: Scales::F32,
        interleave: 1,
    };
    for (format, layout, k) in [
        (QuantFormat::Q4_1, GROUPED_X4, 64),
        (QuantFormat::Q8_0, plan_layout(QuantFormat::Q8_0), 64),
        (QuantFormat::Q4_K, q4_k, 256),
    ] {
        let f = CpuFunction::MatMul {
            format,
            layout,
            k,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(
            format!("matmul_{format}_pmaddubsw"),
            clif_for(f, &portable_isa().unwrap())
        );
    }
}

#[test]
fn matmul_per_epilogue() {
    for epilogue in [
        Epilogue::Bias,
        Epilogue::Residual,
        Epilogue::Gated(Activation::Silu),
        Epilogue::Gated(Activation::Gelu),
    ] {
        let f = CpuFunction::MatMul {
            format: QuantFormat::Q8_0,
            layout: GROUPED_X4,
            k: 32,
            epilogue,
        };
        insta::assert_snapshot!(format!("epilogue_{}", epilogue.name()), clif(f));
    }
}

#[test]
fn activation_quantizers() {
    for (act, norm) in [
        (ActFormat::Q8_0, true),
        (ActFormat::Q8K, false),
        (ActFormat::I8Row, true),
        (
            ActFormat::F32 {
                round: FloatRound::F16,
            },
            false,
        ),
    ] {
        let f = CpuFunction::Quantize { act, k: 256, norm };
        insta::assert_snapshot!(format!("quantize_{}_norm_{norm}", act.name()), clif(f));
    }
}

#[test]
fn attention() {
    // A small head: two vectors per score, one pass of the weighted sum.
    insta::assert_snapshot!(
        "attention_hd8",
        clif(CpuFunction::Attention {
            head_dim: 8,
            group: 1
        })
    );
}

#[test]
fn rope() {
    // One vector of each pairing per head: 8 rotated values of 16.
    for style in [kiln_ir::RopeStyle::Interleaved, kiln_ir::RopeStyle::Neox] {
        let f = CpuFunction::Rope {
            head_dim: 16,
            dims: 8,
            style,
        };
        insta::assert_snapshot!(format!("rope_{}", style.name()), clif(f));
    }
}

#[test]
fn rms_norm() {
    for residual in [false, true] {
        let f = CpuFunction::RmsNorm { n: 8, residual };
        insta::assert_snapshot!(format!("rms_norm_residual_{residual}"), clif(f));
    }
}

#[test]
fn embed() {
    // Q4_1 (codes and a minimum) with rows interleaved by 4: one block per row.
    let f = CpuFunction::Embed {
        format: QuantFormat::Q4_1,
        layout: GROUPED_X4,
        k: 32,
    };
    insta::assert_snapshot!("embed_q4_1", clif(f));
    // A k-quant (sub-block scales and minimums) and a float table (widened in place).
    let widened = Layout {
        scales: Scales::F32,
        interleave: 4,
    };
    for (format, layout, k) in [
        (QuantFormat::Q4_K, widened, 256),
        (QuantFormat::F16, Layout::GGUF, 16),
    ] {
        let f = CpuFunction::Embed { format, layout, k };
        insta::assert_snapshot!(format!("embed_{format}"), clif(f));
    }
}
