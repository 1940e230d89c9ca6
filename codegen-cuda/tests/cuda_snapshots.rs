//! The generated CUDA C of each kernel kind (every matmul format, every epilogue, every activation format, the
//! small ops), so any change to code generation shows up in review. Bless changes with `INSTA_UPDATE=always`
//! (or `cargo insta`). No NVRTC or GPU is needed: this is the source text.

use kiln_codegen_cuda::kernel_source;
use kiln_ir::cpu_abi::{ActFormat, Epilogue, FloatRound};
use kiln_ir::cuda_abi::{CudaKernel, ElementOp};
use kiln_ir::layout::{Layout, Scales};
use kiln_ir::{Activation, QuantFormat, RopeStyle};

const X4: Layout = Layout {
    scales: Scales::F32,
    interleave: 4,
};

#[test]
fn matmul_per_format() {
    for format in [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q4_K,
        QuantFormat::Q5_K,
        QuantFormat::Q6_K,
        QuantFormat::TQ2_0,
        QuantFormat::TQ1_0,
    ] {
        let kernel = CudaKernel::MatMul {
            format,
            layout: X4,
            k: 256,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), kernel_source(&kernel));
    }
    for format in [QuantFormat::F32, QuantFormat::F16, QuantFormat::BF16] {
        let kernel = CudaKernel::MatMul {
            format,
            layout: Layout::GGUF,
            k: 256,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), kernel_source(&kernel));
    }
}

#[test]
fn i2_s_applies_each_tensor_scale_to_the_row_sums() {
    // Gated, to show both weights' scales.
    let kernel = CudaKernel::MatMul {
        format: QuantFormat::I2_S,
        layout: Layout {
            scales: Scales::Gguf,
            interleave: 4,
        },
        k: 256,
        epilogue: Epilogue::Gated(Activation::Silu),
    };
    insta::assert_snapshot!(kernel_source(&kernel));
}

#[test]
fn tl_formats_decode_through_weight_tables() {
    for format in [QuantFormat::TL1, QuantFormat::TL2] {
        let kernel = CudaKernel::MatMul {
            format,
            layout: Layout {
                scales: Scales::Gguf,
                interleave: 4,
            },
            k: 256,
            epilogue: Epilogue::Store,
        };
        insta::assert_snapshot!(format!("matmul_{format}"), kernel_source(&kernel));
    }
}

#[test]
fn gguf_layout_reads_f16_scales_unaligned() {
    let kernel = CudaKernel::MatMul {
        format: QuantFormat::Q4_0,
        layout: Layout::GGUF,
        k: 256,
        epilogue: Epilogue::Store,
    };
    insta::assert_snapshot!(kernel_source(&kernel));
}

#[test]
fn matmul_per_epilogue() {
    for epilogue in [
        Epilogue::Bias,
        Epilogue::Residual,
        Epilogue::Gated(Activation::Silu),
        Epilogue::Gated(Activation::Gelu),
    ] {
        let kernel = CudaKernel::MatMul {
            format: QuantFormat::Q4_1,
            layout: X4,
            k: 256,
            epilogue,
        };
        insta::assert_snapshot!(
            format!("epilogue_{}", epilogue.name()),
            kernel_source(&kernel)
        );
    }
}

#[test]
fn quantize_per_activation_format() {
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
        let kernel = CudaKernel::Quantize { act, k: 512, norm };
        insta::assert_snapshot!(format!("quantize_{}", act.name()), kernel_source(&kernel));
    }
}

#[test]
fn small_ops() {
    let kernels = [
        CudaKernel::Embed {
            format: QuantFormat::Q8_0,
            layout: X4,
            d: 576,
        },
        CudaKernel::RmsNorm { d: 576 },
        CudaKernel::Rope {
            style: RopeStyle::Interleaved,
            head_dim: 64,
            dims: 64,
        },
        CudaKernel::Rope {
            style: RopeStyle::Neox,
            head_dim: 256,
            dims: 256,
        },
        CudaKernel::KvAppend { width: 192 },
        CudaKernel::Attention {
            head_dim: 64,
            group: 3,
        },
        CudaKernel::Elementwise {
            op: ElementOp::Gate(Activation::Gelu),
        },
        CudaKernel::Elementwise {
            op: ElementOp::Act(Activation::ReluSqr),
        },
    ];
    for kernel in kernels {
        insta::assert_snapshot!(kernel.name(), kernel_source(&kernel));
    }
}

#[test]
fn module_has_each_decoder_once() {
    let kernels = [
        CudaKernel::MatMul {
            format: QuantFormat::Q4_1,
            layout: X4,
            k: 576,
            epilogue: Epilogue::Store,
        },
        CudaKernel::MatMul {
            format: QuantFormat::Q4_1,
            layout: X4,
            k: 1536,
            epilogue: Epilogue::Residual,
        },
        CudaKernel::Embed {
            format: QuantFormat::Q4_1,
            layout: X4,
            d: 576,
        },
    ];
    let source = kiln_codegen_cuda::module_source(&kernels);
    assert_eq!(source.matches("Codes32 decode_q4_1_f32s_x4(").count(), 1);
    for k in &kernels {
        assert_eq!(source.matches(&format!(" {}(", k.name())).count(), 1, "{k}");
    }
}
