//! Fused ops, each run as exactly the composition of reference kernels its definition in `kiln_ir::op` states,
//! so a fused graph computes what its unfused original computes, bit for bit.

use super::kernels::{self, rms_norm};
use super::Args;
use kiln_ir::weights::WeightView;
use kiln_ir::{Activation, Op};

/// `matmul` on a tensor of any rank: returns the result's shape and data.
pub fn matmul_value(x: &[f32], mut shape: Vec<usize>, w: &WeightView) -> (Vec<usize>, Vec<f32>) {
    let k = *shape.last().expect("rank >= 1");
    let data = kernels::matmul(x, k, w);
    *shape.last_mut().expect("rank >= 1") = w.shape[0];
    (shape, data)
}

pub fn qkv_rope(op: &Op, args: &Args) -> (Vec<usize>, Vec<f32>) {
    let Op::QkvRope {
        eps,
        heads,
        kv_heads,
        head_dim,
        rope,
        bias,
        qk_norm,
    } = op
    else {
        unreachable!("qkv_rope")
    };
    let x_shape = args.shape(0);
    let (t, d) = (x_shape[0], x_shape[1]);
    let h = rms_norm(&args.f32(0), &args.f32(1), *eps);
    let mut parts: Vec<Vec<f32>> = (2..5)
        .map(|i| kernels::matmul(&h, d, args.weight(i)))
        .collect();
    let mut next = 6;
    if *bias {
        for part in parts.iter_mut() {
            *part = kernels::broadcast(part, &args.f32(next), |x, y| x + y);
            next += 1;
        }
    }
    if let Some(qk_eps) = qk_norm {
        for part in parts.iter_mut().take(2) {
            *part = rms_norm(part, &args.f32(next), *qk_eps);
            next += 1;
        }
    }
    for part in parts.iter_mut().take(2) {
        kernels::rope(part, *head_dim, args.i32(5), rope);
    }
    let widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim];
    let mut packed = Vec::with_capacity(t * (heads + 2 * kv_heads) * head_dim);
    for token in 0..t {
        for (part, width) in parts.iter().zip(widths) {
            packed.extend_from_slice(&part[token * width..(token + 1) * width]);
        }
    }
    (vec![t, heads + 2 * kv_heads, *head_dim], packed)
}

/// Splits a packed `[t, heads + 2 kv_heads, hd]` tensor into q `[t, heads, hd]`, k and v `[t, kv_heads, hd]`.
pub fn unpack_qkv(
    qkv: &[f32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for token in qkv.chunks_exact(qw + 2 * kvw) {
        q.extend_from_slice(&token[..qw]);
        k.extend_from_slice(&token[qw..qw + kvw]);
        v.extend_from_slice(&token[qw + kvw..]);
    }
    (q, k, v)
}

pub fn gated_ffn(args: &Args, eps: f32, act: Activation) -> (Vec<usize>, Vec<f32>) {
    let h = rms_norm(&args.f32(0), &args.f32(1), eps);
    let (shape, gate) = matmul_value(&h, args.shape(0), args.weight(2));
    let (_, up) = matmul_value(&h, args.shape(0), args.weight(3));
    let act = kernels::activation(act);
    let gate: Vec<f32> = gate.iter().map(|&g| act(g)).collect();
    (shape, kernels::broadcast(&gate, &up, |a, b| a * b))
}

pub fn matmul_residual(args: &Args, post_norm: Option<f32>) -> (Vec<usize>, Vec<f32>) {
    let (shape, mut y) = matmul_value(&args.f32(0), args.shape(0), args.weight(1));
    if let Some(eps) = post_norm {
        y = rms_norm(&y, &args.f32(2), eps);
    }
    let residual = args.f32(args.operands.len() - 1);
    (shape, kernels::broadcast(&residual, &y, |r, y| r + y))
}
