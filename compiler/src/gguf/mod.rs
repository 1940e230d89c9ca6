//! GGUF reader: header, metadata, tensor infos; tensor data stays in the memory map and is never copied. And the
//! writer that makes GGUF files (`kiln quantize`, test models).
//!
//! Every malformed input is a `GgufError` naming the field and byte offset. Lengths and counts are checked
//! against the bytes that remain before anything is allocated, so no input can make the reader allocate
//! more than a small multiple of the file size, recurse without bound, or loop long.

mod reader;
mod value;
pub mod writer;

pub use value::{MetaValue, ValueType};
pub use writer::{write_gguf, GgufWriteError, TensorSpec};

use kiln_ir::layout::Layout;
use kiln_ir::tl::{self, Tiling};
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::QuantFormat;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:?} at byte 0, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} at byte 4 (kiln reads versions 2 and 3)")]
    UnsupportedVersion { version: u32 },
    #[error("cannot use {path} ({TL_CONFIG_VAR}) for TL tilings: {reason}")]
    TlConfig { path: String, reason: String },
    #[error("malformed GGUF at byte {offset}: {field}: {reason}")]
    Malformed {
        offset: u64,
        field: String,
        reason: String,
    },
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub format: QuantFormat,
    /// GGUF order: `dims[0]` is the contiguous one.
    pub dims: Vec<usize>,
    /// Row-major shape (`dims` reversed): `[out, in]` for a matrix.
    pub shape: Vec<usize>,
    /// Offset relative to the start of the data section.
    pub offset: usize,
    /// Bytes in the file.
    pub size: usize,
    /// For TL1/TL2 tensors, the tiling they were written with (`kiln_ir::tl`).
    pub tiling: Option<Tiling>,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    bytes: Bytes,
    pub version: u32,
    pub alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_offset: usize,
    /// TL1/TL2 tensors in kiln's row blocks, by name: converted once when the file is opened.
    row_blocks: HashMap<String, Vec<u8>>,
}

/// The environment variable naming a bitnet.cpp `kernel_config.ini`: the tilings of TL1/TL2 files that record
/// none (bitnet.cpp's converter writes none; kiln's writer records its own under `tl::TILING_KEY`).
pub const TL_CONFIG_VAR: &str = "KILN_TL_CONFIG";

/// The tilings of the `kernel_config.ini` that `TL_CONFIG_VAR` names, if it names one.
fn configured_tilings() -> Result<Option<tl::Tilings>, GgufError> {
    let Some(path) = std::env::var_os(TL_CONFIG_VAR) else {
        return Ok(None);
    };
    let error = |reason: String| GgufError::TlConfig {
        path: Path::new(&path).display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
    tl::parse_kernel_config(&text).map(Some).map_err(error)
}

impl GgufFile {
    /// Memory-maps and parses a file. TL1/TL2 tensors take their tiling from the file, or where it records none,
    /// from the `kernel_config.ini` that `KILN_TL_CONFIG` names (read only then).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; kiln never writes model files, and a file truncated by another process
        // while mapped is outside what any mmap-based reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Bytes::Mapped(map), &configured_tilings)
    }

    /// Parses a file held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Bytes::Owned(bytes), &|| Ok(None))
    }

    fn parse(
        bytes: Bytes,
        configured: &dyn Fn() -> Result<Option<tl::Tilings>, GgufError>,
    ) -> Result<Self, GgufError> {
        let header = reader::parse(bytes.as_slice(), configured)?;
        // The reader has checked that every tensor's bytes lie inside the file; a file without tensors may end
        // before the aligned start of its data section, so nothing is sliced but the tensors themselves.
        let row_blocks = header
            .tensors
            .iter()
            .filter_map(|t| {
                let file = &bytes.as_slice()[header.data_offset + t.offset..][..t.size];
                Some((t.name.clone(), tl_row_blocks(t, t.tiling?, file)))
            })
            .collect();
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            tensors: header.tensors,
            data_offset: header.data_offset,
            by_name,
            bytes,
            row_blocks,
        })
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's bytes, borrowed from the map; TL1/TL2 tensors in kiln's row blocks (`kiln_ir::tl`), which the
    /// writer tiles back.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        if info.tiling.is_some() {
            return &self.row_blocks[&info.name];
        }
        let start = self.data_offset + info.offset;
        &self.bytes.as_slice()[start..start + info.size]
    }

    pub fn file_size(&self) -> usize {
        self.bytes.as_slice().len()
    }
}

impl WeightSource for GgufFile {
    fn weight(&self, name: &str) -> Option<WeightView<'_>> {
        let info = self.tensor(name)?;
        Some(WeightView {
            format: info.format,
            layout: Layout::GGUF,
            shape: &info.shape,
            data: self.tensor_data(info),
        })
    }
}

/// A TL tensor's file bytes (`tiling` tiles, then the scale trailer) in kiln's row blocks, trailer kept.
fn tl_row_blocks(info: &TensorInfo, tiling: Tiling, file: &[u8]) -> Vec<u8> {
    let (m, k) = (info.shape[0], info.shape[1]);
    let (codes, trailer) = file.split_at(file.len() - info.format.tensor_trailer_bytes());
    let weights = tl::untile(info.format, tiling, m, k, codes);
    let mut blocks = tl::row_blocks(info.format, &weights);
    blocks.extend_from_slice(trailer);
    blocks
}
