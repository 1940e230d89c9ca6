//! How executors reach weight data without knowing where it lives (a GGUF mmap now, a plan file later).

use crate::format::QuantFormat;

/// A borrowed weight: its format, row-major shape (`[out, in]` for matrices) and raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub format: QuantFormat,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl WeightView<'_> {
    /// Bytes of one row (the last dim).
    pub fn row_bytes(&self) -> usize {
        let inner = *self.shape.last().unwrap_or(&1);
        self.format
            .row_bytes(inner)
            .expect("weight rows are whole blocks (checked when the weight was read)")
    }

    /// Elements in one row.
    pub fn row_elems(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    pub fn row(&self, i: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[i * n..(i + 1) * n]
    }
}

/// A source of weights by name.
pub trait WeightSource: Sync {
    fn weight(&self, name: &str) -> Option<WeightView<'_>>;
}
