//! The plan file format: what `kiln compile` writes and the runtime loads.
//!
//! ```text
//! header (32 bytes)   magic "KILNPLAN" | format version u32 | section count u32 | table checksum u64 | 0 u64
//! section table       per section (32 bytes): kind u32 | 0 u32 | offset u64 | length u64 | checksum u64
//! sections            each starting on a 64-byte boundary, in table order
//! ```
//! All integers are little-endian; checksums are xxh3-64. The table checksum covers the header's first 16 bytes
//! and the whole table, so a flipped byte anywhere in the header, the table or a section is detected. The
//! weights section is 64-byte aligned and each weight in it too, so weights are used in place from an mmap.

use crate::cpu_abi::CpuFunction;
use crate::layout::Layout;
use crate::model::ModelInfo;
use crate::QuantFormat;
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"KILNPLAN";
/// Bumped on any change a reader of the previous version would misread.
pub const FORMAT_VERSION: u32 = 7;
pub const HEADER_BYTES: usize = 32;
pub const ENTRY_BYTES: usize = 32;
/// Alignment of every section and of every weight inside the weights section.
pub const ALIGN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    /// JSON `PlanMeta`.
    Meta = 1,
    /// The graph in the IR text form.
    Graph = 2,
    /// JSON `schedule::Schedule`: kernel specs, launches, memory plan.
    Schedule = 3,
    /// JSON `Vec<WeightEntry>`.
    WeightIndex = 4,
    /// Raw weight bytes.
    Weights = 5,
    /// JSON `Vec<CodeEntry>`: the generated functions, with their CLIF.
    Kernels = 6,
    /// Machine code of the generated functions, position-independent and free of relocations.
    Code = 7,
    /// JSON `Option<cuda_abi::CudaCode>`: the CUDA kernels' source and PTX (`null` in a CPU-only plan).
    Cuda = 8,
}

impl SectionKind {
    /// In file order, which is also id order.
    pub const ALL: [SectionKind; 8] = [
        SectionKind::Meta,
        SectionKind::Graph,
        SectionKind::Schedule,
        SectionKind::WeightIndex,
        SectionKind::Weights,
        SectionKind::Kernels,
        SectionKind::Code,
        SectionKind::Cuda,
    ];

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Meta => "meta",
            SectionKind::Graph => "graph",
            SectionKind::Schedule => "schedule",
            SectionKind::WeightIndex => "weight index",
            SectionKind::Weights => "weights",
            SectionKind::Kernels => "kernels",
            SectionKind::Code => "code",
            SectionKind::Cuda => "cuda",
        }
    }
}

/// What a plan was compiled for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A CPU: the architecture (`x86_64`, `aarch64`) and the ISA features its code needs.
    Cpu { arch: String, features: Vec<String> },
    /// NVIDIA GPUs: the virtual architectures the plan carries PTX for (`compute_80`, `compute_90`).
    Cuda { archs: Vec<String> },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cpu { arch, features } if features.is_empty() => write!(f, "cpu ({arch})"),
            Target::Cpu { arch, features } => write!(f, "cpu ({arch}: {})", features.join(", ")),
            Target::Cuda { archs } => write!(f, "cuda ({})", archs.join(", ")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanMeta {
    /// The kiln version that compiled the plan.
    pub compiler: String,
    /// Every target the plan carries code for, CPU first.
    pub targets: Vec<Target>,
    pub model: ModelInfo,
}

impl PlanMeta {
    pub fn cpu_target(&self) -> Option<&Target> {
        self.targets
            .iter()
            .find(|t| matches!(t, Target::Cpu { .. }))
    }

    pub fn has_cuda(&self) -> bool {
        self.targets
            .iter()
            .any(|t| matches!(t, Target::Cuda { .. }))
    }

    /// The targets, for messages: `cpu (x86_64: ...) + cuda (compute_80, compute_90)`.
    pub fn targets_text(&self) -> String {
        let names: Vec<String> = self.targets.iter().map(|t| t.to_string()).collect();
        names.join(" + ")
    }
}

/// Where one weight lies in the weights section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightEntry {
    pub name: String,
    pub format: QuantFormat,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// How the blocks are stored (`Layout::GGUF` when the plan keeps GGUF's layout).
    #[serde(default)]
    pub layout: Layout,
    /// Offset from the start of the weights section (a multiple of `ALIGN`).
    pub offset: usize,
    pub len: usize,
}

/// One generated function: where its machine code lies in the code section (a multiple of `ALIGN`), and its CLIF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeEntry {
    pub function: CpuFunction,
    pub offset: usize,
    pub len: usize,
    pub clif: String,
}

/// One row of the section table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionEntry {
    pub kind: u32,
    pub offset: u64,
    pub len: u64,
    pub checksum: u64,
}

impl SectionEntry {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8; ENTRY_BYTES]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        SectionEntry {
            kind: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            offset: u64_at(8),
            len: u64_at(16),
            checksum: u64_at(24),
        }
    }
}

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The header's first 16 bytes: magic, version, section count.
pub fn header_prefix(section_count: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&section_count.to_le_bytes());
    out
}

/// The checksum stored in the header: over the header prefix and the encoded table.
pub fn table_checksum(prefix: &[u8], table: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(prefix);
    hasher.update(table);
    hasher.digest()
}

pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}
