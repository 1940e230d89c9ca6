//! How executors reach weight data without knowing where it lives (a GGUF mmap, or a plan's repacked weights).

use crate::dequant::{dequantize_blocks, tensor_scale};
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
            dequantize_blocks(
                self.format,
                &self.data[r * per_row * stored..(r + 1) * per_row * stored],
                out,
            );
        } else {
            let mut block = [0u8; MAX_BLOCK_BYTES];
            let block = &mut block[..self.format.block_bytes()];
            for (b, chunk) in out.chunks_exact_mut(elems).enumerate() {
                self.layout
                    .read_block(self.format, self.data, r, b, per_row, block);
                dequantize_blocks(self.format, block, chunk);
            }
        }
        if let Some(scale) = self.tensor_scale() {
            out.iter_mut().for_each(|y| *y *= scale);
        }
    }

    /// The scale of the whole tensor, for formats that keep one after their blocks (I2_S, TL1, TL2), in every layout.
    pub fn tensor_scale(&self) -> Option<f32> {
        self.trailer().map(tensor_scale)
    }

    /// Where the tensor's scale lies (for kernels that read it), or null for formats without one.
    pub fn tensor_scale_ptr(&self) -> *const f32 {
        self.trailer()
            .map_or(std::ptr::null(), |t| t.as_ptr().cast())
    }

    fn trailer(&self) -> Option<&[u8]> {
        let trailer = self.format.tensor_trailer_bytes();
        (trailer > 0).then(|| &self.data[self.data.len() - trailer..])
    }
}

/// A source of weights by name.
pub trait WeightSource: Sync {
    fn weight(&self, name: &str) -> Option<WeightView<'_>>;
}
