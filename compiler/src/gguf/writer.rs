//! GGUF writer (version 3): what `kiln quantize` and the synthetic test models use. It writes exactly what the
//! reader reads: the header, metadata in the given order, tensor infos, then each tensor's data at the
//! alignment (`general.alignment`, default 32).

use super::{MetaValue, ValueType};
use kiln_ir::tl::{self, Tiling};
use kiln_ir::QuantFormat;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tensor `{name}` has {len} bytes of data, but {format} {shape:?} takes {expected}")]
    Size {
        name: String,
        format: QuantFormat,
        shape: Vec<usize>,
        len: usize,
        expected: usize,
    },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
}

/// One tensor to write: its name, format and row-major shape (`[rows, cols]` for a matrix).
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub format: QuantFormat,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of its data (the format's tensor trailer included), when its rows are whole blocks.
    pub fn bytes(&self) -> Option<usize> {
        let elems = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.format
            .tensor_bytes(*self.shape.last().unwrap_or(&1), elems)
    }
}

const DEFAULT_ALIGNMENT: usize = 32;

/// How one tensor goes to the file: the bytes `data` gives, and for TL1/TL2 the tiling that turns kiln's row
/// blocks into bitnet.cpp's layout (`kiln_ir::tl`), with the bytes that takes.
struct Placement {
    given: usize,
    tiling: Option<Tiling>,
    stored: usize,
}

fn placement(t: &TensorSpec) -> Result<Placement, GgufWriteError> {
    let err = |reason: String| GgufWriteError::Tensor {
        name: t.name.clone(),
        reason,
    };
    let given = t
        .bytes()
        .ok_or_else(|| err(format!("{:?} is not whole {} blocks", t.shape, t.format)))?;
    if !matches!(t.format, QuantFormat::TL1 | QuantFormat::TL2) {
        return Ok(Placement {
            given,
            tiling: None,
            stored: given,
        });
    }
    let &[m, k] = &t.shape[..] else {
        return Err(err(format!(
            "a {} tensor must be a matrix, is {:?}",
            t.format, t.shape
        )));
    };
    let tiling = Tiling::choose(t.format, m, k)
        .ok_or_else(|| err(format!("a {m} x {k} matrix has no {} tiling", t.format)))?;
    let stored = tl::tensor_file_bytes(t.format, m, k)
        .ok_or_else(|| err(format!("a {m} x {k} {} matrix overflows", t.format)))?;
    Ok(Placement {
        given,
        tiling: Some(tiling),
        stored,
    })
}

/// `metadata` with the TL tilings of `tensors` recorded under `tl::TILING_KEY` (replacing any it had).
fn with_tilings(
    metadata: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    placements: &[Placement],
) -> Vec<(String, MetaValue)> {
    let mut metadata: Vec<_> = metadata
        .iter()
        .filter(|(k, _)| k != tl::TILING_KEY)
        .cloned()
        .collect();
    let mut tilings: tl::Tilings = Vec::new();
    for (t, p) in tensors.iter().zip(placements) {
        let shape = (t.shape[0], *t.shape.last().unwrap_or(&1));
        if let Some(tiling) = p.tiling {
            if !tilings.iter().any(|(s, _)| *s == shape) {
                tilings.push((shape, tiling));
            }
        }
    }
    if !tilings.is_empty() {
        let values = tl::tiling_values(&tilings)
            .into_iter()
            .map(MetaValue::U32)
            .collect();
        metadata.push((
            tl::TILING_KEY.to_string(),
            MetaValue::Array(ValueType::U32, values),
        ));
    }
    metadata
}

/// A TL tensor's row blocks (trailer last) tiled as bitnet.cpp lays it out.
fn tiled(t: &TensorSpec, tiling: Tiling, blocks: &[u8]) -> Vec<u8> {
    let (codes, trailer) = blocks.split_at(blocks.len() - t.format.tensor_trailer_bytes());
    let weights = tl::row_block_weights(t.format, codes);
    let mut out = tl::tile(t.format, tiling, t.shape[0], t.shape[1], &weights);
    out.extend_from_slice(trailer);
    out
}

/// Writes a GGUF file at `path`: `metadata` in order, then `tensors`, whose data `data(i)` returns one at a time
/// (so a whole model never sits in memory). The file appears only when complete: it is written beside `path`
/// and renamed.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, GgufWriteError>,
) -> Result<u64, GgufWriteError> {
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .map_or(DEFAULT_ALIGNMENT, |a| a as usize);
    let placements = tensors
        .iter()
        .map(placement)
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = &with_tilings(metadata, tensors, &placements)[..];
    let tmp = path.with_extension("gguf.tmp");
    let io = |source| GgufWriteError::Io {
        path: tmp.display().to_string(),
        source,
    };
    let result = (|| {
        let mut out = Counted::new(BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp).map_err(io)?,
        ));
        out.put(b"GGUF").map_err(io)?;
        out.put(&3u32.to_le_bytes()).map_err(io)?;
        out.put(&(tensors.len() as u64).to_le_bytes()).map_err(io)?;
        out.put(&(metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (key, value) in metadata {
            put_string(&mut out, key).map_err(io)?;
            out.put(&(value_type(value) as u32).to_le_bytes())
                .map_err(io)?;
            put_value(&mut out, value).map_err(io)?;
        }
        let mut offset = 0usize;
        for (t, p) in tensors.iter().zip(&placements) {
            put_string(&mut out, &t.name).map_err(io)?;
            out.put(&(t.shape.len() as u32).to_le_bytes()).map_err(io)?;
            // GGUF lists dims innermost first.
            for &d in t.shape.iter().rev() {
                out.put(&(d as u64).to_le_bytes()).map_err(io)?;
            }
            out.put(&t.format.info().gguf_id.to_le_bytes())
                .map_err(io)?;
            out.put(&(offset as u64).to_le_bytes()).map_err(io)?;
            offset = (offset + p.stored).div_ceil(alignment) * alignment;
        }
        out.pad(alignment).map_err(io)?;
        for (i, (t, p)) in tensors.iter().zip(&placements).enumerate() {
            let mut bytes = data(i)?;
            if bytes.len() != p.given {
                return Err(GgufWriteError::Size {
                    name: t.name.clone(),
                    format: t.format,
                    shape: t.shape.clone(),
                    len: bytes.len(),
                    expected: p.given,
                });
            }
            if let Some(tiling) = p.tiling {
                bytes = tiled(t, tiling, &bytes);
            }
            out.put(&bytes).map_err(io)?;
            out.pad(alignment).map_err(io)?;
        }
        let written = out.written;
        let file = out.inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(written as u64)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, path).map_err(|source| GgufWriteError::Io {
                path: path.display().to_string(),
                source,
            })?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A writer that counts bytes, for alignment padding.
struct Counted<W> {
    inner: W,
    written: usize,
}

impl<W: Write> Counted<W> {
    fn new(inner: W) -> Self {
        Counted { inner, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len();
        self.inner.write_all(bytes)
    }

    fn pad(&mut self, alignment: usize) -> std::io::Result<()> {
        let aligned = self.written.div_ceil(alignment) * alignment;
        self.put(&vec![0u8; aligned - self.written])
    }
}

fn put_string<W: Write>(out: &mut Counted<W>, s: &str) -> std::io::Result<()> {
    out.put(&(s.len() as u64).to_le_bytes())?;
    out.put(s.as_bytes())
}

fn value_type(value: &MetaValue) -> ValueType {
    match value {
        MetaValue::U8(_) => ValueType::U8,
        MetaValue::I8(_) => ValueType::I8,
        MetaValue::U16(_) => ValueType::U16,
        MetaValue::I16(_) => ValueType::I16,
        MetaValue::U32(_) => ValueType::U32,
        MetaValue::I32(_) => ValueType::I32,
        MetaValue::F32(_) => ValueType::F32,
        MetaValue::Bool(_) => ValueType::Bool,
        MetaValue::String(_) => ValueType::String,
        MetaValue::Array(..) => ValueType::Array,
        MetaValue::U64(_) => ValueType::U64,
        MetaValue::I64(_) => ValueType::I64,
        MetaValue::F64(_) => ValueType::F64,
    }
}

fn put_value<W: Write>(out: &mut Counted<W>, value: &MetaValue) -> std::io::Result<()> {
    match value {
        MetaValue::U8(v) => out.put(&[*v]),
        MetaValue::I8(v) => out.put(&v.to_le_bytes()),
        MetaValue::U16(v) => out.put(&v.to_le_bytes()),
        MetaValue::I16(v) => out.put(&v.to_le_bytes()),
        MetaValue::U32(v) => out.put(&v.to_le_bytes()),
        MetaValue::I32(v) => out.put(&v.to_le_bytes()),
        MetaValue::F32(v) => out.put(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.put(&[*v as u8]),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(elem, items) => {
            out.put(&(*elem as u32).to_le_bytes())?;
            out.put(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| put_value(out, item))
        }
        MetaValue::U64(v) => out.put(&v.to_le_bytes()),
        MetaValue::I64(v) => out.put(&v.to_le_bytes()),
        MetaValue::F64(v) => out.put(&v.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let path = std::env::temp_dir().join(format!("kiln-writer-{}.gguf", std::process::id()));
        let metadata = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            ("general.alignment".to_string(), MetaValue::U32(64)),
            (
                "tokenizer.ggml.tokens".to_string(),
                MetaValue::Array(
                    ValueType::String,
                    vec![MetaValue::String("a".into()), MetaValue::String("b".into())],
                ),
            ),
            ("x.f".to_string(), MetaValue::F64(0.5)),
        ];
        let tensors = vec![
            TensorSpec {
                name: "w".into(),
                format: QuantFormat::Q8_0,
                shape: vec![3, 64],
            },
            TensorSpec {
                name: "g".into(),
                format: QuantFormat::F32,
                shape: vec![5],
            },
        ];
        let datas: Vec<Vec<u8>> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (0..t.bytes().unwrap()).map(|b| (b * 7 + i) as u8).collect())
            .collect();
        write_gguf(&path, &metadata, &tensors, |i| Ok(datas[i].clone())).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.metadata(), &metadata[..]);
        assert_eq!(file.alignment, 64);
        for (t, data) in tensors.iter().zip(&datas) {
            let info = file.tensor(&t.name).unwrap();
            assert_eq!((info.format, &info.shape), (t.format, &t.shape));
            assert_eq!(file.tensor_data(info), &data[..]);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_tensor_of_the_wrong_size_is_an_error_and_leaves_no_file() {
        let path =
            std::env::temp_dir().join(format!("kiln-writer-bad-{}.gguf", std::process::id()));
        let tensors = vec![TensorSpec {
            name: "w".into(),
            format: QuantFormat::Q8_0,
            shape: vec![1, 32],
        }];
        let err = write_gguf(&path, &[], &tensors, |_| Ok(vec![0u8; 5])).unwrap_err();
        assert!(
            err.to_string()
                .contains("has 5 bytes of data, but q8_0 [1, 32] takes 34"),
            "{err}"
        );
        assert!(!path.exists() && !path.with_extension("gguf.tmp").exists());
    }
}
