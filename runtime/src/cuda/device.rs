//! The GPU as the executor sees it: a context, one stream, the plan's module, and plain device memory. Every
//! absence (no driver, no GPU, PTX the driver cannot load) becomes a `CudaLoadError` before cudarc is asked for
//! anything it would panic on.

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use kiln_ir::cuda_abi::CudaCode;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CudaLoadError {
    #[error("no CUDA driver: libcuda.so is not installed or not on the library path")]
    NoDriver,
    #[error("no CUDA device {ordinal}: this host has {count}")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("the plan has no CUDA code: compile it with `kiln compile MODEL.gguf --target cuda` (or `--target cpu,cuda`)")]
    NoCudaCode,
    #[error("the plan carries PTX for {archs}, none of which runs on this GPU (compute capability {major}.{minor})")]
    NoPtxForDevice {
        archs: String,
        major: u32,
        minor: u32,
    },
    #[error("the CUDA driver cannot load the plan's PTX for {arch} ({source}); the driver may be older than the NVRTC that compiled it: update the driver or compile the plan with an older CUDA")]
    LoadModule { arch: String, source: DriverError },
    #[error("CUDA failed while {doing}: {source}")]
    Driver {
        doing: &'static str,
        source: DriverError,
    },
    #[error("the plan's CUDA module lacks kernel `{0}` (recompile the plan with this kiln)")]
    MissingKernel(String),
    #[error(transparent)]
    Exec(#[from] crate::engine::ExecError),
}

/// Context for a driver call's error.
pub trait DriverContext<T> {
    fn doing(self, doing: &'static str) -> Result<T, CudaLoadError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn doing(self, doing: &'static str) -> Result<T, CudaLoadError> {
        self.map_err(|source| CudaLoadError::Driver { doing, source })
    }
}

/// Whether a CUDA driver library can be loaded here (cudarc panics on first use without one).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One kernel argument, as the `cuda_abi` signatures list them.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    U64(u64),
    I32(i32),
    F32(f32),
}

/// One kernel launch, ready to submit.
pub struct Launch<'k> {
    pub kernel: &'k CudaFunction,
    pub grid: (u32, u32),
    pub block: u32,
    pub args: Vec<Arg>,
}

pub struct Device {
    pub stream: Arc<CudaStream>,
    kernels: HashMap<String, CudaFunction>,
    pub name: String,
    pub arch: String,
}

impl Device {
    pub fn open(ordinal: usize, code: Option<&CudaCode>) -> Result<Self, CudaLoadError> {
        if !driver_available() {
            return Err(CudaLoadError::NoDriver);
        }
        let count = CudaContext::device_count().doing("counting devices")?;
        if ordinal as i32 >= count {
            return Err(CudaLoadError::NoDevice { ordinal, count });
        }
        let code = code.ok_or(CudaLoadError::NoCudaCode)?;
        let ctx = CudaContext::new(ordinal).doing("creating a context")?;
        // One stream and raw pointers: no per-buffer events to record (which graph capture would also record).
        // SAFETY: no CudaSlice is shared across streams.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .doing("reading the compute capability")?;
        let ptx = code.ptx_for(major as u32, minor as u32).ok_or_else(|| {
            CudaLoadError::NoPtxForDevice {
                archs: code
                    .ptx
                    .iter()
                    .map(|p| p.arch.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                major: major as u32,
                minor: minor as u32,
            }
        })?;
        let module = ctx
            .load_module(Ptx::from_src(ptx.ptx.clone()))
            .map_err(|source| CudaLoadError::LoadModule {
                arch: ptx.arch.clone(),
                source,
            })?;
        let mut kernels = HashMap::new();
        for kernel in &code.kernels {
            let name = kernel.name();
            let f = module
                .load_function(&name)
                .map_err(|_| CudaLoadError::MissingKernel(name.clone()))?;
            kernels.insert(name, f);
        }
        let name = ctx.name().doing("reading the device name")?;
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().doing("creating a stream")?;
        Ok(Device {
            stream,
            kernels,
            name,
            arch: ptx.arch.clone(),
        })
    }

    pub fn kernel(&self, name: &str) -> Result<&CudaFunction, CudaLoadError> {
        self.kernels
            .get(name)
            .ok_or_else(|| CudaLoadError::MissingKernel(name.to_string()))
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buffer, DriverError> {
        let slice = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buffer { slice, ptr })
    }

    pub fn upload(&self, bytes: &[u8]) -> Result<Buffer, DriverError> {
        let slice = self.stream.clone_htod(bytes)?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buffer { slice, ptr })
    }

    pub fn write(&self, buffer: &mut Buffer, at: usize, bytes: &[u8]) -> Result<(), DriverError> {
        let mut view = buffer.slice.slice_mut(at..at + bytes.len());
        self.stream.memcpy_htod(bytes, &mut view)
    }

    pub fn read(&self, buffer: &Buffer, at: usize, out: &mut [u8]) -> Result<(), DriverError> {
        let view = buffer.slice.slice(at..at + out.len());
        self.stream.memcpy_dtoh(&view, out)?;
        self.stream.synchronize()
    }

    pub fn launch(&self, launch: &Launch) -> Result<(), DriverError> {
        let mut builder = self.stream.launch_builder(launch.kernel);
        for arg in &launch.args {
            match arg {
                Arg::Ptr(v) | Arg::U64(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let config = LaunchConfig {
            grid_dim: (launch.grid.0, launch.grid.1, 1),
            block_dim: (launch.block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument lists follow the `cuda_abi` signatures, and every pointer addresses a live buffer
        // sized for the step (the executor sizes them before building launches).
        unsafe { builder.launch(config) }.map(|_| ())
    }

    /// Records `launches` into a CUDA graph instead of running them.
    pub fn capture(&self, launches: &[Launch]) -> Result<Option<CudaGraph>, DriverError> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = launches.iter().try_for_each(|l| self.launch(l));
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        recorded?;
        graph
    }
}

/// Device memory and its address.
pub struct Buffer {
    slice: CudaSlice<u8>,
    pub ptr: u64,
}
