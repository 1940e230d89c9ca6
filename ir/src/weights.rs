//! How executors reach weight data without knowing where it lives (a GGUF mmap, or a plan's repacked weights).

use crate::dequant::dequantize;
use crate::format::QuantFormat;
use crate::layout::{Layout, MAX_BLOCK_BYTES};

/// A borrowed weight: its format, layout, row-major shape (`[out, in]` for matrices) and raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub format: QuantFormat,
    pub layout: Layout,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl WeightView<'_> {
    /// Elements in one row (the last dim).
    pub fn row_elems(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Dequantizes row `r` into `out` (`row_elems` values), whatever the layout.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (elems, stored) = (
            self.format.block_elems(),
            self.layout.block_bytes(self.format),
        );
        let per_row = self.row_elems() / elems;
        if self.layout == Layout::GGUF {
            dequantize(
                self.format,
                &self.data[r * per_row * stored..(r + 1) * per_row * stored],
                out,
            );
            return;
        }
        let mut block = [0u8; MAX_BLOCK_BYTES];
        let block = &mut block[..self.format.block_bytes()];
        for (b, chunk) in out.chunks_exact_mut(elems).enumerate() {
            let at = self.layout.block_index(r, b, per_row) * stored;
            self.layout
                .narrow(self.format, &self.data[at..at + stored], block);
            dequantize(self.format, block, chunk);
        }
    }
}

/// A source of weights by name.
pub trait WeightSource: Sync {
    fn weight(&self, name: &str) -> Option<WeightView<'_>>;
}
