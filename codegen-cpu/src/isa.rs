//! The host's instruction set, as Cranelift sees it.

use crate::builder::{ByteDot, Target};
use cranelift_codegen::ir::Type;
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};

#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("Cranelift does not support this host: {0}")]
    Unsupported(String),
}

/// A Cranelift target with the host's ISA flags (FMA, AVX2, AVX-512, VNNI where present).
pub struct CpuIsa {
    isa: OwnedTargetIsa,
}

/// The features of the portable x86-64 target (the x86-64-v3 level: AVX2, FMA, BMI, every server CPU since 2015).
const PORTABLE_X86_64: &[&str] = &[
    "sse3", "ssse3", "sse41", "sse42", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "lzcnt",
];

/// The host's ISA, every feature cranelift-native detects turned on, optimizing for speed.
pub fn host_isa() -> Result<CpuIsa, IsaError> {
    let builder = cranelift_native::builder().map_err(|e| IsaError::Unsupported(e.to_string()))?;
    finish(builder)
}

/// This architecture's portable target: what any server CPU of the last decade has, so a plan compiled for it
/// runs on every node of a cluster.
pub fn portable_isa() -> Result<CpuIsa, IsaError> {
    isa_with_features(if cfg!(target_arch = "x86_64") {
        PORTABLE_X86_64
    } else {
        &[]
    })
}

/// This architecture's target with exactly `features` (Cranelift's names without `has_`: `avx2`, `avx_vnni`,
/// ...), whatever the host has: for code to run elsewhere, or only to look at (the CLIF snapshots).
pub fn isa_with_features(features: &[&str]) -> Result<CpuIsa, IsaError> {
    let mut builder = cranelift_native::builder_with_options(false)
        .map_err(|e| IsaError::Unsupported(e.to_string()))?;
    for feature in features {
        builder
            .enable(&format!("has_{feature}"))
            .map_err(|e| IsaError::Unsupported(e.to_string()))?;
    }
    finish(builder)
}

fn finish(builder: cranelift_codegen::isa::Builder) -> Result<CpuIsa, IsaError> {
    let mut flags = settings::builder();
    for (name, value) in [("opt_level", "speed"), ("is_pic", "true")] {
        flags
            .set(name, value)
            .map_err(|e| IsaError::Unsupported(e.to_string()))?;
    }
    let isa = builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| IsaError::Unsupported(e.to_string()))?;
    Ok(CpuIsa { isa })
}

impl CpuIsa {
    pub fn target(&self) -> &dyn TargetIsa {
        &*self.isa
    }

    pub fn call_conv(&self) -> CallConv {
        self.isa.default_call_conv()
    }

    pub fn pointer_type(&self) -> Type {
        self.isa.pointer_type()
    }

    /// What kernels are generated for: the frontend config and the byte dot product the flags make fastest.
    pub(crate) fn kernel_target(&self) -> Target {
        Target {
            frontend: self.isa.frontend_config(),
            byte_dot: self.byte_dot(),
        }
    }

    /// `pmaddubsw` on x86 hosts without VNNI; elsewhere the widening tree (`vpdpbusd` where VNNI has it, as
    /// Cranelift's lowering checks: AVX-VNNI, or AVX512-VNNI with AVX512VL).
    fn byte_dot(&self) -> ByteDot {
        let has = |name: &str| {
            self.isa
                .isa_flags()
                .iter()
                .any(|v| v.name == name && v.as_bool() == Some(true))
        };
        let vnni = (has("has_avx") && has("has_avx_vnni"))
            || (has("has_avx512vl") && has("has_avx512vnni"));
        if self.arch() == "x86_64" && has("has_ssse3") && has("has_sse41") && !vnni {
            ByteDot::Pmaddubsw
        } else {
            ByteDot::Widening
        }
    }

    /// `x86_64`, `aarch64`, ...
    pub fn arch(&self) -> String {
        self.isa.triple().architecture.to_string()
    }

    /// The ISA features the generated code may use, named as Rust's `is_x86_feature_detected!` names them
    /// (`avx2`, `fma`, `sse4.1`, `avx512vnni`, ...): what the plan records and the loader checks.
    pub fn features(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .isa
            .isa_flags()
            .iter()
            .filter(|v| v.as_bool() == Some(true))
            .filter_map(|v| v.name.strip_prefix("has_"))
            .map(|name| match name {
                // The names `is_x86_feature_detected!` uses, which the runtime checks hosts with.
                "sse41" => "sse4.1".to_string(),
                "sse42" => "sse4.2".to_string(),
                "avx_vnni" => "avxvnni".to_string(),
                other => other.to_string(),
            })
            .collect();
        out.sort();
        out
    }
}
