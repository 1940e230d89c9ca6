//! Layout: choose how the plan stores each weight, for the kernels that read it (see `kiln_ir::layout`).
//!
//! Weights that a matmul-family kernel or `embed` reads block by block get f32 scales (where the format has f16
//! ones) and rows interleaved by `INTERLEAVE` (where the row count allows). Plain-float matrices, norm gains and
//! biases stay as they are.

use kiln_ir::layout::{f16_fields, Layout};
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

pub fn choose_layouts(graph: &Graph) -> Layouts {
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
            let f32_scales = !f16_fields(format).is_empty();
            let interleave = if shape.len() == 2 && shape[0].is_multiple_of(INTERLEAVE) {
                INTERLEAVE
            } else {
                1
            };
            let layout = Layout {
                f32_scales,
                interleave,
            };
            if layout != Layout::GGUF && layout.fits(format, &shape) {
                layouts.insert(decl.name.clone(), layout);
            }
        }
    }
    layouts
}
