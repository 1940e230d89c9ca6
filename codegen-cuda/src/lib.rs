//! kiln-codegen-cuda: kernel specs to CUDA C source to PTX.
//!
//! Each `CudaKernel` (`kiln_ir::cuda_abi`) becomes one `extern "C"` kernel specialized on its format, layout and
//! shapes; a plan's kernels share one module with the prelude and the format decoders they need, compiled by NVRTC
//! (loaded at run time through cudarc, so kiln builds and runs where CUDA is absent) to PTX for each virtual
//! architecture. The runtime never needs NVRTC: plans carry the PTX.

mod formats;
mod matmul;
mod ops;

use kiln_ir::cuda_abi::{ArchPtx, CudaCode, CudaKernel};

pub use formats::{helper as decoder, supported as supports_format, Helper};

/// The virtual architectures plans carry PTX for: Ampere and Hopper.
pub const ARCHS: [&str; 2] = ["compute_80", "compute_90"];

/// The first part of every module: types, block-field loads and the decoded-codes struct, in plain C++ (plus two
/// CUDA intrinsics) so that hosts compile the format decoders too.
pub const CODES_PRELUDE: &str = include_str!("codes.cu");

/// The module prelude: `CODES_PRELUDE`, then the device helpers.
const PRELUDE: &str = concat!(include_str!("codes.cu"), "\n", include_str!("prelude.cu"));

#[derive(Debug, thiserror::Error)]
pub enum CudaCodegenError {
    #[error("NVRTC (libnvrtc.so) is not installed or not on the library path: install it with `pip install nvidia-cuda-nvrtc-cu12` and add its `nvidia/cuda_nvrtc/lib` directory to LD_LIBRARY_PATH, or compile with `--target cpu`")]
    NvrtcMissing,
    #[error("no CUDA kernel for {0}: the CUDA backend does not support this format yet (compile with `--target cpu`)")]
    Unsupported(String),
    #[error("NVRTC rejected the generated CUDA for {arch} (a kiln bug): {log}")]
    Compile { arch: String, log: String },
}

/// Whether this backend can generate `kernel`.
pub fn supports(kernel: &CudaKernel) -> bool {
    match kernel {
        CudaKernel::MatMul { format, layout, .. } => {
            formats::supported(*format) && !layout.scales.grouped()
        }
        // An embedding kernel reads single rows and never sees a whole-tensor scale (I2_S).
        CudaKernel::Embed { format, layout, .. } => {
            formats::supported(*format)
                && format.tensor_trailer_bytes() == 0
                && !layout.scales.grouped()
        }
        _ => true,
    }
}

/// One kernel's source with the decoders it uses (what the CUDA snapshots hold).
pub fn kernel_source(kernel: &CudaKernel) -> String {
    let (helpers, code) = parts(kernel);
    let mut out = String::new();
    for h in helpers {
        out.push_str(&h.code);
        out.push('\n');
    }
    out.push_str(&code);
    out
}

fn parts(kernel: &CudaKernel) -> (Vec<formats::Helper>, String) {
    let name = kernel.name();
    match kernel {
        CudaKernel::Quantize { act, k, norm } => {
            (Vec::new(), matmul::quantize(&name, *act, *k, *norm))
        }
        CudaKernel::MatMul {
            format,
            layout,
            k,
            epilogue,
        } => matmul::matmul(&name, *format, *layout, *k, *epilogue),
        CudaKernel::Embed { format, layout, d } => matmul::embed(&name, *format, *layout, *d),
        CudaKernel::RmsNorm { d } => (Vec::new(), ops::rms_norm(&name, *d)),
        CudaKernel::Rope {
            style,
            head_dim,
            dims,
        } => (Vec::new(), ops::rope(&name, *style, *head_dim, *dims)),
        CudaKernel::KvAppend { width } => (Vec::new(), ops::kv_append(&name, *width)),
        CudaKernel::Attention { head_dim, group } => {
            (Vec::new(), ops::attention(&name, *head_dim, *group))
        }
        CudaKernel::Elementwise { op } => (Vec::new(), ops::elementwise(&name, *op)),
    }
}

/// The module of `kernels`: the prelude, each decoder once, then the kernels.
pub fn module_source(kernels: &[CudaKernel]) -> String {
    let mut helpers: Vec<formats::Helper> = Vec::new();
    let mut bodies = String::new();
    for kernel in kernels {
        let (hs, code) = parts(kernel);
        for h in hs {
            if !helpers.iter().any(|seen| seen.name == h.name) {
                helpers.push(h);
            }
        }
        bodies.push('\n');
        bodies.push_str(&code);
    }
    let mut out = String::from(PRELUDE);
    for h in &helpers {
        out.push('\n');
        out.push_str(&h.code);
    }
    out.push_str(&bodies);
    out
}

/// Whether NVRTC can be loaded here.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Generates the module of `kernels` and compiles it to PTX for each of `archs`. `on_arch(done, total)` reports
/// progress.
pub fn compile(
    kernels: &[CudaKernel],
    archs: &[&'static str],
    mut on_arch: impl FnMut(usize, usize),
) -> Result<CudaCode, CudaCodegenError> {
    if let Some(k) = kernels.iter().find(|k| !supports(k)) {
        return Err(CudaCodegenError::Unsupported(k.name()));
    }
    if !nvrtc_available() {
        return Err(CudaCodegenError::NvrtcMissing);
    }
    let source = module_source(kernels);
    let mut ptx = Vec::with_capacity(archs.len());
    for (i, &arch) in archs.iter().enumerate() {
        ptx.push(ArchPtx {
            arch: arch.to_string(),
            ptx: compile_ptx(&source, arch)?,
        });
        on_arch(i + 1, archs.len());
    }
    Ok(CudaCode {
        source,
        kernels: kernels.to_vec(),
        ptx,
    })
}

/// NVRTC on one module for one architecture. Callers check `nvrtc_available` first: cudarc panics without it.
pub fn compile_ptx(source: &str, arch: &'static str) -> Result<String, CudaCodegenError> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    let options = CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++17".into()],
        name: Some("kiln.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, options)
        .map(|ptx| ptx.to_src())
        .map_err(|e| CudaCodegenError::Compile {
            arch: arch.to_string(),
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => other.to_string(),
            },
        })
}
