//! Embedding lookup: each token's row of the table dequantized into the activations, block by block, by the
//! format's `Dequantize` (the reference dequantizer's arithmetic, so the rows are the reference's bit for bit).
//! Rows interleaved by the layout are found group by group: row `r`'s block `b` lies in group block
//! `r / interleave * blocks + b`, as row `r % interleave` of it.

use crate::builder::{Kb, Target};
use crate::formats::BlockDot;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{Function, InstBuilder};

use kiln_ir::cpu_abi::offsets::embed as arg;
use kiln_ir::layout::Layout;

/// Whether a table stored in this form has a generated lookup.
pub fn supports(dot: &dyn BlockDot) -> bool {
    dot.dequantizer().is_some()
}

pub fn build(func: &mut Function, target: Target, dot: &dyn BlockDot, layout: Layout, k: usize) {
    let dequantizer = dot
        .dequantizer()
        .expect("`generate` refuses tables it cannot dequantize");
    let (elems, block_bytes) = (dot.elems(), dot.block_bytes());
    let blocks = k / elems;
    let interleave = layout.interleave as i64;
    Kb::build(func, target, |kb| {
        let table = kb.arg(arg::TABLE, I64);
        let ids = kb.arg(arg::IDS, I64);
        let tokens = kb.arg(arg::TOKENS, I64);
        let out = kb.arg(arg::OUT, I64);
        let out_stride = kb.arg(arg::OUT_STRIDE, I64);
        let zero = kb.i64(0);
        kb.for_range(zero, tokens, 1, |kb, t| {
            let id = kb.offset(ids, t, 4);
            let id = kb.load(I32, id, 0);
            let id = kb.b.ins().uextend(I64, id);
            let group = kb.b.ins().udiv_imm_u(id, interleave);
            let lane = kb.b.ins().urem_imm_u(id, interleave);
            // The row's first group block, and the bytes from one group block to the next.
            let group_bytes = block_bytes * interleave as usize;
            let first = kb.b.ins().imul_imm_s(group, blocks as i64);
            let first = kb.offset(table, first, group_bytes);
            let row = kb.b.ins().imul(t, out_stride);
            let row = kb.offset(out, row, 4);
            kb.for_count(blocks, |kb, b| {
                let group = kb.offset(first, b, group_bytes);
                let y = kb.offset(row, b, 4 * elems);
                for (i, v) in dequantizer
                    .dequantize(kb, group, lane)
                    .into_iter()
                    .enumerate()
                {
                    kb.store(v, y, 16 * i);
                }
            });
        });
    });
}
