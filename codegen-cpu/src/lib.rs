//! kiln-codegen-cpu: kernel specs to Cranelift IR to native code.
//!
//! Each `CpuFunction` (see `kiln_ir::cpu_abi`) is generated once as a Cranelift function, compiled for the host's
//! ISA flags, and returned as position-independent machine code with no relocations, so a plan can carry it and
//! the runtime can map it executable without Cranelift.

mod attention;
mod builder;
mod embed;
mod formats;
mod isa;
mod kquants;
mod math;
mod matmul;
mod quantize;
mod rms_norm;
mod rope;
mod ternary_row;

pub use isa::{host_isa, isa_with_features, portable_isa, CpuIsa, IsaError};

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{AbiParam, Function, Signature, UserFuncName};
use cranelift_codegen::Context;
use kiln_ir::cpu_abi::CpuFunction;

/// One compiled function: its CLIF (as generated, before optimization) and its machine code.
#[derive(Clone, Debug)]
pub struct CompiledFunction {
    pub function: CpuFunction,
    pub clif: String,
    pub code: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("no CPU kernel for {0}: {1}")]
    Unsupported(String, String),
    #[error("Cranelift rejected {function}: {message} (a kiln bug)")]
    Cranelift { function: String, message: String },
    #[error("{0} needs relocations, which a plan cannot carry (a kiln bug)")]
    Relocations(String),
}

/// Whether `function` can be generated (the executor falls back to reference code for the rest).
pub fn supports(function: &CpuFunction) -> bool {
    match function {
        CpuFunction::Quantize { .. } => true,
        CpuFunction::Attention { head_dim, group } => attention::supports(*head_dim, *group),
        CpuFunction::MatMul { format, layout, .. } => {
            formats::block_dot(*format, *layout).is_some()
        }
        CpuFunction::Rope { head_dim, dims, .. } => rope::supports(*head_dim, *dims),
        CpuFunction::RmsNorm { n, .. } => rms_norm::supports(*n),
        CpuFunction::Embed { format, layout, .. } => {
            formats::block_dot(*format, *layout).is_some_and(|dot| embed::supports(dot.as_ref()))
        }
    }
}

/// The function's CLIF, as generated.
pub fn generate(function: &CpuFunction, isa: &CpuIsa) -> Result<Function, CodegenError> {
    let mut sig = Signature::new(isa.call_conv());
    sig.params.push(AbiParam::new(isa.pointer_type()));
    let mut func = Function::with_name_signature(UserFuncName::testcase(function.to_string()), sig);
    match function {
        CpuFunction::Quantize { act, k, norm } => {
            quantize::build(&mut func, isa.kernel_target(), *act, *k, *norm)
        }
        CpuFunction::Attention { head_dim, group } if !attention::supports(*head_dim, *group) => {
            return Err(CodegenError::Unsupported(
                function.to_string(),
                format!("a head width of {head_dim} (not a multiple of 8) or a group of {group}"),
            ))
        }
        CpuFunction::Attention { head_dim, group } => {
            attention::build(&mut func, isa.kernel_target(), *head_dim, *group)
        }
        CpuFunction::Rope { head_dim, dims, .. } if !rope::supports(*head_dim, *dims) => {
            return Err(CodegenError::Unsupported(
                function.to_string(),
                format!(
                    "{dims} rotated values of {head_dim}: not whole groups of 8 within the head"
                ),
            ))
        }
        CpuFunction::Embed { format, layout, k } => {
            let dot = formats::block_dot(*format, *layout)
                .filter(|dot| embed::supports(dot.as_ref()))
                .ok_or_else(|| {
                    CodegenError::Unsupported(
                        function.to_string(),
                        format!("no generated dequantizer for {format} in the {layout} layout"),
                    )
                })?;
            embed::build(&mut func, isa.kernel_target(), dot.as_ref(), *layout, *k)
        }
        CpuFunction::RmsNorm { n, .. } if !rms_norm::supports(*n) => {
            return Err(CodegenError::Unsupported(
                function.to_string(),
                format!("groups of {n} values, not whole vectors of 4"),
            ))
        }
        &CpuFunction::RmsNorm { n, residual } => {
            rms_norm::build(&mut func, isa.kernel_target(), n, residual)
        }
        &CpuFunction::Rope {
            head_dim,
            dims,
            style,
        } => rope::build(&mut func, isa.kernel_target(), head_dim, dims, style),
        CpuFunction::MatMul {
            format,
            layout,
            k,
            epilogue,
        } => {
            let dot = formats::block_dot(*format, *layout).ok_or_else(|| {
                CodegenError::Unsupported(
                    function.to_string(),
                    format!("{format} weights in the {layout} layout"),
                )
            })?;
            matmul::build(
                &mut func,
                isa.kernel_target(),
                dot.as_ref(),
                *layout,
                *k,
                *epilogue,
            )
        }
    }
    Ok(func)
}

/// Generates and compiles `function` for `isa`.
pub fn compile(function: &CpuFunction, isa: &CpuIsa) -> Result<CompiledFunction, CodegenError> {
    let func = generate(function, isa)?;
    let clif = func.display().to_string();
    let mut ctx = Context::for_function(func);
    let compiled = ctx
        .compile(isa.target(), &mut ControlPlane::default())
        .map_err(|e| CodegenError::Cranelift {
            function: function.to_string(),
            message: format!("{:?}", e.inner),
        })?;
    if !compiled.buffer.relocs().is_empty() {
        return Err(CodegenError::Relocations(function.to_string()));
    }
    Ok(CompiledFunction {
        function: function.clone(),
        clif,
        code: compiled.code_buffer().to_vec(),
    })
}
