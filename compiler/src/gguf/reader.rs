//! The byte-level parser. Every read goes through `Cursor`, which checks bounds and reports offsets.

use super::{GgufError, MetaValue, TensorInfo, ValueType};
use kiln_ir::format::unsupported_gguf_type_name;
use kiln_ir::tl::{self, Tiling};
use kiln_ir::QuantFormat;
use std::collections::HashSet;

/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (real files nest at most one level).
const MAX_ARRAY_DEPTH: u32 = 8;
const DEFAULT_ALIGNMENT: u64 = 32;

pub(super) struct Header {
    pub version: u32,
    pub alignment: usize,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: usize,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

fn malformed(offset: usize, field: impl Into<String>, reason: impl Into<String>) -> GgufError {
    GgufError::Malformed {
        offset: offset as u64,
        field: field.into(),
        reason: reason.into(),
    }
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(malformed(
                self.pos,
                field,
                format!(
                    "needs {n} bytes, only {} left (truncated file?)",
                    self.remaining()
                ),
            ));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], GgufError> {
        Ok(self
            .take(N, field)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, field: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A count that must fit in what remains, at `min_size` bytes per item at least.
    fn count(&mut self, field: &str, min_size: u64) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(field)?;
        if n.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(malformed(
                at,
                field,
                format!(
                    "count {n} cannot fit in the {} bytes that remain",
                    self.remaining()
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, field: &str) -> Result<String, GgufError> {
        let len = self.count(field, 1)?;
        let at = self.pos;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(at, field, "string is not valid UTF-8"))
    }

    fn value(&mut self, ty: ValueType, field: &str, depth: u32) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.array::<1>(field)?[0]),
            ValueType::I8 => MetaValue::I8(self.array::<1>(field)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => MetaValue::U32(self.u32(field)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::U64 => MetaValue::U64(self.u64(field)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(field)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => return Err(malformed(at, field, format!("bool must be 0 or 1, is {b}"))),
                }
            }
            ValueType::String => MetaValue::String(self.string(field)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(malformed(
                        self.pos,
                        field,
                        format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem = self.value_type(field)?;
                let n = self.count(field, elem.min_size())?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, field, depth + 1)?);
                }
                MetaValue::Array(elem, items)
            }
        })
    }

    fn value_type(&mut self, field: &str) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let id = self.u32(field)?;
        ValueType::from_id(id)
            .ok_or_else(|| malformed(at, field, format!("unknown value type {id}")))
    }
}

/// `configured`: the tilings of TL tensors in a file that records none (`super::TL_CONFIG_VAR`), asked for only
/// when such a tensor comes.
pub(super) fn parse(
    data: &[u8],
    configured: &dyn Fn() -> Result<Option<tl::Tilings>, GgufError>,
) -> Result<Header, GgufError> {
    let mut c = Cursor { data, pos: 0 };
    let magic: [u8; 4] = c.array("magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    // Minimum sizes: a tensor info is name (8) + n_dims (4) + one dim (8) + type (4) + offset (8);
    // a key/value pair is key (8) + type (4) + the smallest value (1).
    let n_tensors = c.count("tensor_count", 32)?;
    let n_kv = c.count("metadata_kv_count", 13)?;

    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(n_kv);
    let mut keys = HashSet::with_capacity(n_kv);
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let key_at = c.pos;
        let key = c.string(&format!("metadata key #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(malformed(
                key_at,
                format!("metadata key `{key}`"),
                "duplicate key",
            ));
        }
        let ty = c.value_type(&key)?;
        let value_at = c.pos;
        let value = c.value(ty, &key, 0)?;
        if key == "general.alignment" {
            alignment = match value.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(malformed(
                        value_at,
                        key,
                        format!("alignment must be a power of two up to 65536, is {value}"),
                    ))
                }
            };
        }
        metadata.push((key, value));
    }

    let mut tilings = recorded_tilings(&metadata)?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info_at = c.pos;
        let name = c.string(&format!("tensor #{i} name"))?;
        let field = |what: &str| format!("tensor `{name}` {what}");
        let dims_at = c.pos;
        let n_dims = c.u32(&field("n_dims"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(malformed(
                dims_at,
                field("n_dims"),
                format!("must be 1..={MAX_DIMS}, is {n_dims}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let at = c.pos;
            let n = c.u64(&field(&format!("dim {d}")))?;
            if n == 0 || n > i64::MAX as u64 {
                return Err(malformed(
                    at,
                    field(&format!("dim {d}")),
                    format!("must be positive, is {n}"),
                ));
            }
            dims.push(n as usize);
        }
        let type_at = c.pos;
        let type_id = c.u32(&field("type"))?;
        let format = QuantFormat::from_gguf_id(type_id).ok_or_else(|| {
            let reason = match unsupported_gguf_type_name(type_id) {
                Some(known) => format!("type {type_id} ({known}) is not supported"),
                None => format!("unknown type id {type_id}"),
            };
            malformed(type_at, field("type"), reason)
        })?;
        let offset_at = c.pos;
        let offset = c.u64(&field("offset"))?;
        if offset % alignment != 0 {
            return Err(malformed(
                offset_at,
                field("offset"),
                format!("{offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        let tiling = match format {
            QuantFormat::TL1 | QuantFormat::TL2 => {
                // Asked at most once: without tilings, the first TL tensor is an error.
                if tilings.is_none() {
                    tilings = configured()?;
                }
                Some(tl_tiling(
                    tilings.as_deref(),
                    format,
                    type_id,
                    &dims,
                    (type_at, dims_at),
                    &field,
                )?)
            }
            _ => None,
        };
        let size = if tiling.is_some() {
            tl::tensor_file_bytes(format, dims[1], dims[0])
        } else {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|elements| format.tensor_bytes(dims[0], elements))
        };
        let Some(size) = size else {
            return Err(malformed(
                dims_at,
                field("dims"),
                format!(
                    "{dims:?} is not a whole number of {format} blocks of {} or overflows",
                    format.block_elems()
                ),
            ));
        };
        if !names.insert(name.clone()) {
            return Err(malformed(info_at, field("name"), "duplicate tensor name"));
        }
        let shape = dims.iter().rev().copied().collect();
        tensors.push(TensorInfo {
            name,
            format,
            dims,
            shape,
            offset: offset as usize,
            size,
            tiling,
        });
    }

    let data_offset = c.pos.div_ceil(alignment as usize) * alignment as usize;
    let data_len = data.len().saturating_sub(data_offset);
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for (i, t) in by_offset.iter().enumerate() {
        // Where the tensor's data would start in the file, for messages (it may lie far past the end).
        let at = data_offset.saturating_add(t.offset);
        if t.offset
            .checked_add(t.size)
            .is_none_or(|end| end > data_len)
        {
            return Err(malformed(at, format!("tensor `{}` data", t.name), format!(
                "{} bytes at data offset {} run past the end of the file ({data_len} data bytes)", t.size, t.offset
            )));
        }
        if let Some(next) = by_offset.get(i + 1) {
            if t.offset + t.size > next.offset {
                return Err(malformed(
                    at,
                    format!("tensor `{}` data", t.name),
                    format!(
                        "overlaps tensor `{}` at data offset {}",
                        next.name, next.offset
                    ),
                ));
            }
        }
    }
    Ok(Header {
        version,
        alignment: alignment as usize,
        metadata,
        tensors,
        data_offset,
    })
}

/// The TL tilings the file records (`tl::TILING_KEY`), or `None` when it records none.
fn recorded_tilings(metadata: &[(String, MetaValue)]) -> Result<Option<tl::Tilings>, GgufError> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == tl::TILING_KEY) else {
        return Ok(None);
    };
    let values: Option<Vec<u64>> = value
        .as_array()
        .map(|items| items.iter().map(MetaValue::as_u64).collect())
        .unwrap_or(None);
    values
        .as_deref()
        .and_then(tl::parse_tilings)
        .map(Some)
        .ok_or_else(|| {
            malformed(
                0,
                tl::TILING_KEY,
                "must be an array of unsigned integers, five per matrix shape (m, k, BM, BK, bm)",
            )
        })
}

/// The tiling a TL1/TL2 tensor of GGUF `dims` was written with. Ids 38 and 39 are read as TL only in files that
/// record their tiling: bitnet.cpp keeps it outside the file, and upstream gives 39 to MXFP4.
fn tl_tiling(
    tilings: Option<&[((usize, usize), Tiling)]>,
    format: QuantFormat,
    type_id: u32,
    dims: &[usize],
    (type_at, dims_at): (usize, usize),
    field: &dyn Fn(&str) -> String,
) -> Result<Tiling, GgufError> {
    let Some(tilings) = tilings else {
        let other = if type_id == 39 {
            " or MXFP4 (upstream)"
        } else {
            ""
        };
        return Err(malformed(
            type_at,
            field("type"),
            format!(
                "type {type_id} is {} (bitnet.cpp){other}, and this file records no TL tiling \
                 (`{}`): bitnet.cpp keeps it in include/kernel_config.ini; set {} to that file to read it",
                format.name().to_uppercase(),
                tl::TILING_KEY,
                super::TL_CONFIG_VAR
            ),
        ));
    };
    let [k, m] = dims else {
        return Err(malformed(
            dims_at,
            field("dims"),
            format!("a {format} tensor must be a matrix, is {dims:?}"),
        ));
    };
    match tilings.iter().find(|(shape, _)| *shape == (*m, *k)) {
        Some(&(_, t)) if t.fits(format, *m, *k) => Ok(t),
        Some(&(_, t)) => Err(malformed(
            dims_at,
            field("dims"),
            format!("the tiling {t} does not fit a {m} x {k} {format} matrix"),
        )),
        None => Err(malformed(
            dims_at,
            field("dims"),
            format!(
                "no TL tiling is given for a {m} x {k} matrix (`{}` or {})",
                tl::TILING_KEY,
                super::TL_CONFIG_VAR
            ),
        )),
    }
}
