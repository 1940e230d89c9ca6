//! Matrix products `out[t, r] = epilogue(dot(W[r], x[t]))`: for each group of interleaved rows and each token,
//! one pass over the token's quantized activations feeds every row of the group.

use crate::builder::Kb;
use crate::formats::{BlockDot, RowAcc};
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{Function, InstBuilder, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use kiln_ir::cpu_abi::offsets::matmul as arg;
use kiln_ir::cpu_abi::Epilogue;
use kiln_ir::layout::Layout;

struct Shape<'d> {
    dot: &'d dyn BlockDot,
    rows: usize,
    blocks: usize,
    /// Bytes of activations per weight block.
    act_bytes: usize,
}

pub fn build(
    func: &mut Function,
    config: TargetFrontendConfig,
    dot: &dyn BlockDot,
    layout: Layout,
    k: usize,
    epilogue: Epilogue,
) {
    let act = dot.act();
    let shape = Shape {
        dot,
        rows: layout.interleave,
        blocks: k / dot.elems(),
        act_bytes: dot.elems() / act.block_elems() * act.block_bytes(),
    };
    Kb::build(func, config, |kb| {
        let w = kb.arg(arg::W, I64);
        let w2 = kb.arg(arg::W2, I64);
        let x = kb.arg(arg::X, I64);
        let x_stride = kb.arg(arg::X_STRIDE, I64);
        let out = kb.arg(arg::OUT, I64);
        let out_stride = kb.arg(arg::OUT_STRIDE, I64);
        let extra = kb.arg(arg::EXTRA, I64);
        let extra_stride = kb.arg(arg::EXTRA_STRIDE, I64);
        let row_begin = kb.arg(arg::ROW_BEGIN, I64);
        let row_end = kb.arg(arg::ROW_END, I64);
        let tokens = kb.arg(arg::TOKENS, I64);
        // Row r's group starts at r * blocks * block_bytes: a group of R rows holds R rows' worth of blocks.
        let row_bytes = shape.blocks * dot.block_bytes();
        kb.for_range(row_begin, row_end, shape.rows as i64, |kb, row| {
            let wg = kb.offset(w, row, row_bytes);
            let w2g = kb.offset(w2, row, row_bytes);
            let zero = kb.i64(0);
            kb.for_range(zero, tokens, 1, |kb, t| {
                let xt = kb.b.ins().imul(t, x_stride);
                let xt = kb.b.ins().iadd(x, xt);
                let dots = group_dots(kb, &shape, wg, xt);
                let dots2 =
                    matches!(epilogue, Epilogue::Gated(_)).then(|| group_dots(kb, &shape, w2g, xt));
                let out_row = kb.b.ins().imul(t, out_stride);
                let out_row = kb.b.ins().iadd(out_row, row);
                let out_row = kb.offset(out, out_row, 4);
                for (lane, &acc) in dots.iter().enumerate() {
                    let value = match epilogue {
                        Epilogue::Store => acc,
                        Epilogue::Bias => {
                            let b = kb.offset(extra, row, 4);
                            let b = kb.load(F32, b, 4 * lane);
                            kb.b.ins().fadd(acc, b)
                        }
                        Epilogue::Residual => {
                            let r = kb.b.ins().imul(t, extra_stride);
                            let r = kb.b.ins().iadd(r, row);
                            let r = kb.offset(extra, r, 4);
                            let r = kb.load(F32, r, 4 * lane);
                            kb.b.ins().fadd(r, acc)
                        }
                        Epilogue::Gated(act) => {
                            let gate = kb.activation(act, acc);
                            let up = dots2.as_ref().expect("gated")[lane];
                            kb.b.ins().fmul(gate, up)
                        }
                    };
                    kb.store(value, out_row, 4 * lane);
                }
            });
        });
    });
}

/// The dot products of the group's rows (starting at `wg`) with the token's activations at `xt`.
fn group_dots(kb: &mut Kb, shape: &Shape, wg: Value, xt: Value) -> Vec<Value> {
    let zero_v = kb.f32x4(0.0);
    let zero_s = kb.f32(0.0);
    let accs: Vec<RowAcc> = (0..shape.rows)
        .map(|_| RowAcc {
            v: kb.var(F32X4, zero_v),
            s: kb.var(F32, zero_s),
        })
        .collect();
    let block_bytes = shape.dot.block_bytes();
    let group_block_bytes = shape.rows * block_bytes;
    kb.for_count(shape.blocks, |kb, b| {
        let xb = kb.offset(xt, b, shape.act_bytes);
        let shared = shape.dot.prepare(kb, xb);
        let wb = kb.offset(wg, b, group_block_bytes);
        for (lane, &acc) in accs.iter().enumerate() {
            let wl = kb.b.ins().iadd_imm_s(wb, (lane * block_bytes) as i64);
            shape.dot.accumulate(kb, wl, xb, &shared, acc);
        }
    });
    accs.iter()
        .map(|acc| {
            let v = kb.b.use_var(acc.v);
            let v = kb.hsum_f32(v);
            let s = kb.b.use_var(acc.s);
            kb.b.ins().fadd(v, s)
        })
        .collect()
}
