//! Writes plan files (format: `kiln_ir::plan`).

use crate::passes::Compiled;
use kiln_ir::cuda_abi::CudaCode;
use kiln_ir::layout::Layout;
use kiln_ir::plan::{
    self, CodeEntry, PlanMeta, SectionEntry, SectionKind, WeightEntry, ALIGN, ENTRY_BYTES,
    HEADER_BYTES,
};
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::{QuantFormat, WeightDecl};
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlanWriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("weight `{0}` is declared by the graph but missing from the model")]
    MissingWeight(String),
    #[error(
        "weight `{name}` cannot be stored in the {layout} layout (a kiln bug in the layout pass)"
    )]
    Layout { name: String, layout: Layout },
    #[error("weight `{name}` is {found} in the model, and the graph stores it as {stored}, which kiln cannot convert it to (a kiln bug in the transcoding pass)")]
    Transcode {
        name: String,
        found: QuantFormat,
        stored: String,
    },
}

/// Rewrites a weight's bytes from one format into another, exactly.
type Conversion = fn(&[u8]) -> Vec<u8>;

/// The exact conversion from one format to another that a pass may store a weight in
/// (`passes::transcode_weights`: TQ1_0 as TQ2_0).
fn conversion(from: QuantFormat, to: QuantFormat) -> Option<Conversion> {
    match (from, to) {
        (QuantFormat::TQ1_0, QuantFormat::TQ2_0) => Some(kiln_ir::quantize::tq1_0_to_tq2_0),
        _ => None,
    }
}

/// The format the graph stores a weight in: the source's own, or one the source converts to (`conversion`).
fn stored_format(decl: &WeightDecl, view: &WeightView) -> Result<QuantFormat, PlanWriteError> {
    match decl.ty.dtype.format() {
        Some(stored) if stored == view.format || conversion(view.format, stored).is_some() => {
            Ok(stored)
        }
        _ => Err(PlanWriteError::Transcode {
            name: decl.name.clone(),
            found: view.format,
            stored: decl.ty.dtype.to_string(),
        }),
    }
}

/// A weight's bytes in `format`, which `stored_format` chose.
fn converted<'a>(format: QuantFormat, view: &WeightView<'a>) -> Cow<'a, [u8]> {
    match conversion(view.format, format) {
        Some(convert) => Cow::Owned(convert(view.data)),
        None => Cow::Borrowed(view.data),
    }
}

/// What was written.
pub struct PlanSummary {
    pub bytes: u64,
    pub weights: usize,
    pub weight_bytes: u64,
}

/// Generated code: CPU machine code (an index and the bytes it points into) and the CUDA module, each present
/// when the plan targets it.
#[derive(Default)]
pub struct PlanCode {
    pub index: Vec<CodeEntry>,
    pub bytes: Vec<u8>,
    pub cuda: Option<CudaCode>,
}

impl PlanCode {
    /// Appends one function's code at the next aligned offset.
    pub fn push(&mut self, function: kiln_ir::cpu_abi::CpuFunction, clif: String, code: &[u8]) {
        let offset = plan::align_up(self.bytes.len());
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(code);
        self.index.push(CodeEntry {
            function,
            offset,
            len: code.len(),
            clif,
        });
    }
}

/// Writes `graph`, its metadata, its generated code and every weight it declares to `path`. The file appears only when complete:
/// it is written beside the destination and renamed. `on_weight_bytes(done, total)` reports progress.
pub fn write_plan(
    path: &Path,
    meta: &PlanMeta,
    compiled: &Compiled,
    code: &PlanCode,
    weights: &dyn WeightSource,
    mut on_weight_bytes: impl FnMut(u64, u64),
) -> Result<PlanSummary, PlanWriteError> {
    let Compiled {
        graph,
        layouts,
        schedule,
    } = compiled;
    let mut index = Vec::with_capacity(graph.weights().len());
    let mut cursor = 0;
    for decl in graph.weights() {
        let view = weights
            .weight(&decl.name)
            .ok_or_else(|| PlanWriteError::MissingWeight(decl.name.clone()))?;
        let offset = plan::align_up(cursor);
        let layout = layouts.get(&decl.name).copied().unwrap_or(Layout::GGUF);
        let format = stored_format(decl, &view)?;
        let len =
            layout
                .stored_bytes(format, view.shape)
                .ok_or_else(|| PlanWriteError::Layout {
                    name: decl.name.clone(),
                    layout,
                })?;
        index.push(WeightEntry {
            name: decl.name.clone(),
            format,
            shape: view.shape.to_vec(),
            layout,
            offset,
            len,
        });
        cursor = offset + len;
    }
    let weights_len = cursor;
    let meta_json = serde_json::to_vec(meta).expect("plan metadata serializes");
    let graph_text = kiln_ir::text::print(graph).into_bytes();
    let index_json = serde_json::to_vec(&index).expect("weight index serializes");
    let schedule_json = serde_json::to_vec(schedule).expect("schedule serializes");
    let kernels_json = serde_json::to_vec(&code.index).expect("code index serializes");
    let cuda_json = serde_json::to_vec(&code.cuda).expect("CUDA code serializes");

    let tmp = temp_path(path);
    let written = write_sections(
        &tmp,
        &index,
        weights_len,
        [&meta_json, &graph_text, &schedule_json, &index_json],
        [&kernels_json, &code.bytes, &cuda_json],
        weights,
        &mut on_weight_bytes,
    );
    let bytes = match written {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path).map_err(|source| PlanWriteError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(PlanSummary {
        bytes,
        weights: index.len(),
        weight_bytes: weights_len as u64,
    })
}

/// Writes the whole file at `tmp`; returns its length.
fn write_sections(
    tmp: &Path,
    index: &[WeightEntry],
    weights_len: usize,
    [meta_json, graph_text, schedule_json, index_json]: [&Vec<u8>; 4],
    [kernels_json, code, cuda_json]: [&Vec<u8>; 3],
    weights: &dyn WeightSource,
    on_weight_bytes: &mut impl FnMut(u64, u64),
) -> Result<u64, PlanWriteError> {
    let io = |source| PlanWriteError::Io {
        path: tmp.display().to_string(),
        source,
    };
    let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp).map_err(io)?);
    let table_len = HEADER_BYTES + SectionKind::ALL.len() * ENTRY_BYTES;
    out.write_all(&vec![0u8; plan::align_up(table_len)])
        .map_err(io)?;
    let mut pos = plan::align_up(table_len);
    let mut entries = Vec::new();
    for (kind, bytes) in [
        (SectionKind::Meta, meta_json),
        (SectionKind::Graph, graph_text),
        (SectionKind::Schedule, schedule_json),
        (SectionKind::WeightIndex, index_json),
    ] {
        pos = write_section(&mut out, &mut entries, kind, bytes, pos).map_err(io)?;
    }
    // Weights: streamed from the source (an mmap) and hashed on the way.
    pos = pad_to_alignment(&mut out, pos).map_err(io)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let start = pos;
    for entry in index {
        let padding = vec![0u8; start + entry.offset - pos];
        hasher.update(&padding);
        out.write_all(&padding).map_err(io)?;
        let view = weights.weight(&entry.name).expect("looked up above");
        let bytes = converted(entry.format, &view);
        let data = match entry.layout {
            Layout::GGUF => bytes,
            layout => Cow::Owned(layout.repack(entry.format, view.shape, &bytes)),
        };
        hasher.update(&data);
        out.write_all(&data).map_err(io)?;
        pos = start + entry.offset + data.len();
        on_weight_bytes((pos - start) as u64, weights_len as u64);
    }
    entries.push(SectionEntry {
        kind: SectionKind::Weights as u32,
        offset: start as u64,
        len: weights_len as u64,
        checksum: hasher.digest(),
    });
    for (kind, bytes) in [
        (SectionKind::Kernels, kernels_json),
        (SectionKind::Code, code),
        (SectionKind::Cuda, cuda_json),
    ] {
        pos = write_section(&mut out, &mut entries, kind, bytes, pos).map_err(io)?;
    }

    let table: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
    let prefix = plan::header_prefix(entries.len() as u32);
    let mut header = prefix.to_vec();
    header.extend(plan::table_checksum(&prefix, &table).to_le_bytes());
    header.extend(0u64.to_le_bytes());
    header.extend(&table);
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(pos as u64)
}

/// Writes one section at the next aligned position after `pos` and records it; returns the position after it.
fn write_section(
    out: &mut impl Write,
    entries: &mut Vec<SectionEntry>,
    kind: SectionKind,
    bytes: &[u8],
    pos: usize,
) -> std::io::Result<usize> {
    let pos = pad_to_alignment(out, pos)?;
    out.write_all(bytes)?;
    entries.push(SectionEntry {
        kind: kind as u32,
        offset: pos as u64,
        len: bytes.len() as u64,
        checksum: plan::checksum(bytes),
    });
    Ok(pos + bytes.len())
}

fn pad_to_alignment(out: &mut impl Write, pos: usize) -> std::io::Result<usize> {
    let aligned = plan::align_up(pos);
    out.write_all(&[0u8; ALIGN][..aligned - pos])?;
    Ok(aligned)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
