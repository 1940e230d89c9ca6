//! Layout: choose how the plan stores each weight, for the kernels that read it (see `kiln_ir::layout`).
//!
//! Weights that a matmul-family kernel or `embed` reads block by block get rows interleaved by `INTERLEAVE` (where
//! the row count allows) and their f16 scales moved:
//! - gathered at the front of each row group's block, for the 32-value block formats when only CPU kernels read
//!   the plan: one vector load gives four rows' scales (about 5% fewer instructions in the one-token kernels).
//!   The formats with a code offset (Q4_0, Q5_0, Q8_0) keep them f16 (`Scales::GroupedF16`), GGUF's bytes, which
//!   the kernels widen: one conversion per group block against 6-8% fewer bytes to stream (Qwen2.5's Q8_0 LM head
//!   decoded 7% faster). Those with a minimum (Q4_1, Q5_1) widen them to f32: their one-token kernel is short of
//!   registers already, and the conversion's constants cost more than the bytes saved (measured slower or no
//!   faster). A kernel widens finite values only, so a weight with an infinite or NaN scale keeps f32 ones.
//! - widened to f32 at each block's front otherwise: the CUDA kernels read blocks one by one, and a k-quant has
//!   two scales in 256 values.
//!
//! TQ1_0 matrices of a CPU plan are stored as TQ2_0 (`transcode_weights`). Plain-float matrices, norm gains and
//! biases stay as they are.

use kiln_ir::graph::WeightId;
use kiln_ir::layout::{f16_fields, fields_finite, Layout, Scales};
use kiln_ir::types::DType;
use kiln_ir::weights::WeightSource;
use kiln_ir::QuantFormat;
use kiln_ir::{Graph, Op, Operand};
use std::collections::BTreeMap;

/// Rows per interleaved group: four output rows share one pass over the activations.
pub const INTERLEAVE: usize = 4;

/// The layout of every weight whose storage changes, by name.
pub type Layouts = BTreeMap<String, Layout>;

/// Operand slots of `op` that hold weights read block by block as matrix rows.
fn matrix_slots(op: &Op) -> &'static [usize] {
    match op {
        Op::Embed => &[0],
        Op::MatMul | Op::MatMulResidual { .. } => &[1],
        Op::NormMatMul { .. } => &[2],
        Op::QkvRope { .. } => &[2, 3, 4],
        Op::GatedFfn { .. } => &[2, 3],
        _ => &[],
    }
}

/// Which kernels will read the plan's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readers {
    /// CPU kernels only.
    Cpu,
    /// CUDA kernels too.
    WithCuda,
}

/// Where a weight of `format` gets its scales, interleaved or not, where it has f16 ones; `finite` says whether
/// they are all finite.
fn scales(format: QuantFormat, interleave: usize, readers: Readers, finite: bool) -> Scales {
    use QuantFormat::*;
    match format {
        Q4_0 | Q5_0 | Q8_0 if interleave > 1 && readers == Readers::Cpu && finite => {
            Scales::GroupedF16
        }
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 if interleave > 1 && readers == Readers::Cpu => {
            Scales::Grouped
        }
        _ => Scales::F32,
    }
}

/// Rewrites the type of every TQ1_0 matrix that a matmul-family kernel reads as TQ2_0, for a plan only CPU kernels
/// read: the same ternary digits and scale, 2 bits a digit instead of base 3 (22% more bytes), which the plan
/// writer converts exactly (`kiln_ir::quantize::tq1_0_to_tq2_0`). TQ1_0's kernel spends eight vector instructions
/// on each 16 weights' base-3 digits where TQ2_0's spends four, and on this host it took twice TQ2_0's time per
/// token for SmolLM2's FFN down (374 ms against 180 ms over 258 tokens), a tenth of the whole decode.
pub fn transcode_weights(graph: &mut Graph, readers: Readers) {
    if readers != Readers::Cpu {
        return;
    }
    let matrices: Vec<WeightId> = (graph.node_ids())
        .flat_map(|id| {
            let node = graph.node(id);
            (matrix_slots(&node.op).iter()).filter_map(|&slot| match node.operands[slot] {
                Operand::Weight(w) => Some(w),
                _ => None,
            })
        })
        .collect();
    for w in matrices {
        let decl = graph.weight_mut(w);
        if decl.ty.dtype == DType::Quant(QuantFormat::TQ1_0) {
            decl.ty.dtype = DType::Quant(QuantFormat::TQ2_0);
        }
    }
}

/// The layouts of `graph`'s weights, whose bytes `weights` holds (as GGUF stores them).
pub fn choose_layouts(graph: &Graph, readers: Readers, weights: &dyn WeightSource) -> Layouts {
    let mut layouts = Layouts::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        for &slot in matrix_slots(&node.op) {
            let Operand::Weight(w) = node.operands[slot] else {
                continue;
            };
            let decl = graph.weight(w);
            let Some(format) = decl.ty.dtype.format() else {
                continue;
            };
            // Plain floats have no blocks to widen, and their kernels read rows as GGUF stores them.
            if format.is_float() {
                continue;
            }
            let shape: Vec<usize> = decl
                .ty
                .shape
                .iter()
                .filter_map(|d| d.clone().fixed())
                .collect();
            let interleave = if shape.len() == 2 && shape[0].is_multiple_of(INTERLEAVE) {
                INTERLEAVE
            } else {
                1
            };
            let scales = if f16_fields(format).is_empty() {
                Scales::Gguf
            } else {
                let finite =
                    (weights.weight(&decl.name)).is_some_and(|w| fields_finite(format, w.data));
                scales(format, interleave, readers, finite)
            };
            let layout = Layout { scales, interleave };
            if layout != Layout::GGUF && layout.fits(format, &shape) {
                layouts.insert(decl.name.clone(), layout);
            }
        }
    }
    layouts
}
