//! Matrix products `out[t, r] = epilogue(dot(W[r], x[t]))`: for each group of interleaved rows and each token,
//! one pass over the token's quantized activations feeds every row of the group.
//!
//! (Tiling tokens instead, to unpack each weight block once per tile, measured slower on SmolLM2's prefill:
//! 157 vs 206 tok/s at 512 tokens, as the per-token activation loads then repeat for every row.)

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

/// The kernel's arguments, loaded once.
struct Args {
    w: Value,
    w2: Value,
    /// The weights' whole-tensor scale pointers, for formats that have them.
    scales: Option<(Value, Value)>,
    x: Value,
    x_stride: Value,
    out: Value,
    out_stride: Value,
    extra: Value,
    extra_stride: Value,
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
        let a = Args {
            w: kb.arg(arg::W, I64),
            w2: kb.arg(arg::W2, I64),
            x: kb.arg(arg::X, I64),
            x_stride: kb.arg(arg::X_STRIDE, I64),
            out: kb.arg(arg::OUT, I64),
            out_stride: kb.arg(arg::OUT_STRIDE, I64),
            extra: kb.arg(arg::EXTRA, I64),
            extra_stride: kb.arg(arg::EXTRA_STRIDE, I64),
            scales: dot
                .tensor_scaled()
                .then(|| (kb.arg(arg::W_SCALE, I64), kb.arg(arg::W2_SCALE, I64))),
        };
        let row_begin = kb.arg(arg::ROW_BEGIN, I64);
        let row_end = kb.arg(arg::ROW_END, I64);
        let tokens = kb.arg(arg::TOKENS, I64);
        // Row r's group starts at r * blocks * block_bytes: a group of R rows holds R rows' worth of blocks.
        let row_bytes = shape.blocks * dot.block_bytes();
        kb.for_range(row_begin, row_end, shape.rows as i64, |kb, row| {
            let wg = kb.offset(a.w, row, row_bytes);
            let w2g = kb.offset(a.w2, row, row_bytes);
            let zero = kb.i64(0);
            kb.for_range(zero, tokens, 1, |kb, t| {
                let xt = kb.b.ins().imul(t, a.x_stride);
                let xt = kb.b.ins().iadd(a.x, xt);
                let dots = group_dots(kb, &shape, wg, xt, a.scales.map(|s| s.0));
                let dots2 = matches!(epilogue, Epilogue::Gated(_))
                    .then(|| group_dots(kb, &shape, w2g, xt, a.scales.map(|s| s.1)));
                for (lane, &acc) in dots.iter().enumerate() {
                    let r = kb.b.ins().iadd_imm_s(row, lane as i64);
                    store(kb, &a, epilogue, r, t, acc, dots2.as_ref().map(|d| d[lane]));
                }
            });
        });
    });
}

/// Applies the epilogue to the dot product of row `r` and token `t` and stores it.
fn store(
    kb: &mut Kb,
    a: &Args,
    epilogue: Epilogue,
    r: Value,
    t: Value,
    acc: Value,
    acc2: Option<Value>,
) {
    let value = match epilogue {
        Epilogue::Store => acc,
        Epilogue::Bias => {
            let b = kb.offset(a.extra, r, 4);
            let b = kb.load(F32, b, 0);
            kb.b.ins().fadd(acc, b)
        }
        Epilogue::Residual => {
            let i = kb.b.ins().imul(t, a.extra_stride);
            let i = kb.b.ins().iadd(i, r);
            let p = kb.offset(a.extra, i, 4);
            let residual = kb.load(F32, p, 0);
            kb.b.ins().fadd(residual, acc)
        }
        Epilogue::Gated(act) => {
            let gate = kb.activation(act, acc);
            kb.b.ins()
                .fmul(gate, acc2.expect("a gated epilogue has two dot products"))
        }
    };
    let i = kb.b.ins().imul(t, a.out_stride);
    let i = kb.b.ins().iadd(i, r);
    let p = kb.offset(a.out, i, 4);
    kb.store(value, p, 0);
}

/// Fresh zero accumulators.
fn accumulators(kb: &mut Kb, n: usize) -> Vec<RowAcc> {
    let zero_v = kb.f32x4(0.0);
    let zero_s = kb.f32(0.0);
    (0..n)
        .map(|_| RowAcc {
            v: kb.var(F32X4, zero_v),
            s: kb.var(F32, zero_s),
        })
        .collect()
}

fn finish(kb: &mut Kb, accs: &[RowAcc]) -> Vec<Value> {
    accs.iter()
        .map(|acc| {
            let v = kb.b.use_var(acc.v);
            let v = kb.hsum_f32(v);
            let s = kb.b.use_var(acc.s);
            kb.b.ins().fadd(v, s)
        })
        .collect()
}

/// The dot products of the group's rows (starting at `wg`, of the tensor whose scale, if it has one, lies at
/// `w_scale`) with one token's activations at `xt`.
fn group_dots(
    kb: &mut Kb,
    shape: &Shape,
    wg: Value,
    xt: Value,
    w_scale: Option<Value>,
) -> Vec<Value> {
    let accs = accumulators(kb, shape.rows);
    let block_bytes = shape.dot.block_bytes();
    kb.for_count(shape.blocks, |kb, b| {
        let xb = kb.offset(xt, b, shape.act_bytes);
        let x = shape.dot.prepare(kb, xb);
        let wb = kb.offset(wg, b, shape.rows * block_bytes);
        for (lane, &acc) in accs.iter().enumerate() {
            let wl = kb.b.ins().iadd_imm_s(wb, (lane * block_bytes) as i64);
            let w = shape.dot.unpack(kb, wl);
            shape.dot.accumulate(kb, &w, &x, acc);
        }
    });
    let dots = finish(kb, &accs);
    match w_scale {
        Some(scale) => dots
            .into_iter()
            .map(|dot| shape.dot.scale_row(kb, dot, xt, scale))
            .collect(),
        None => dots,
    }
}
