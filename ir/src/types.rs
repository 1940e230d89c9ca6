//! Tensor types: a dtype and a shape whose dims are numbers or symbols (`tokens`).

use crate::format::QuantFormat;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a value or weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// A block-quantized format (never a plain float format: those are the variants above).
    Quant(QuantFormat),
}

impl DType {
    /// The dtype of data stored in `format`.
    pub fn of_format(format: QuantFormat) -> Self {
        match format {
            QuantFormat::F32 => DType::F32,
            QuantFormat::F16 => DType::F16,
            QuantFormat::BF16 => DType::BF16,
            quant => DType::Quant(quant),
        }
    }

    /// The storage format of this dtype, when it has one (`i32` has none).
    pub fn format(self) -> Option<QuantFormat> {
        match self {
            DType::F32 => Some(QuantFormat::F32),
            DType::F16 => Some(QuantFormat::F16),
            DType::BF16 => Some(QuantFormat::BF16),
            DType::I32 => None,
            DType::Quant(q) => Some(q),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s == "i32" {
            return Some(DType::I32);
        }
        QuantFormat::from_name(s).map(DType::of_format)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format() {
            Some(format) => f.write_str(format.name()),
            None => f.write_str("i32"),
        }
    }
}

/// One dimension: a known size, or a symbol bound at run time (`tokens`: the tokens in the current step).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    Fixed(usize),
    Sym(String),
}

impl Dim {
    pub fn tokens() -> Self {
        Dim::Sym("tokens".into())
    }

    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Sym(_) => None,
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Dim::Fixed(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// The type of a value: dtype and shape, row-major (the last dim is contiguous).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl IntoIterator<Item = Dim>) -> Self {
        TensorType {
            dtype,
            shape: shape.into_iter().collect(),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The last (contiguous) dim.
    pub fn inner(&self) -> Option<&Dim> {
        self.shape.last()
    }

    /// Product of the fixed dims, and the symbols, sorted: two shapes with equal results hold the same number
    /// of elements for every binding of the symbols.
    pub fn volume(&self) -> (usize, Vec<&str>) {
        let mut fixed = 1usize;
        let mut syms = Vec::new();
        for d in &self.shape {
            match d {
                Dim::Fixed(n) => fixed = fixed.saturating_mul(*n),
                Dim::Sym(s) => syms.push(s.as_str()),
            }
        }
        syms.sort_unstable();
        (fixed, syms)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
