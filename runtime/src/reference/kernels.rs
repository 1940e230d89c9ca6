//! The reference math of each op, on plain f32 slices. Clarity over speed; only the matmul is parallel.

use kiln_ir::activation::ActivationFormat;
use kiln_ir::dequant::{dequantize, dot_f32};
use kiln_ir::weights::WeightView;
use kiln_ir::{Activation, RopeParams, RopeStyle};
use rayon::prelude::*;

/// `x[t, k] @ W[n, k]^T -> [t, n]`: the activations are rounded to the weight's activation format, then each
/// weight row is dequantized once and dotted with every token's row.
pub fn matmul(x: &[f32], k: usize, w: &WeightView) -> Vec<f32> {
    let n = w.shape[0];
    let t = x.len() / k;
    let mut rounded = x.to_vec();
    let activation = ActivationFormat::for_weight(w.format);
    rounded
        .chunks_exact_mut(k)
        .for_each(|row| activation.round_trip(row));
    let x = &rounded;
    let mut out_t = vec![0f32; n * t]; // [n, t]: one contiguous chunk per weight row, filled in parallel
    out_t.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0f32; k],
        |row, (j, out)| {
            w.dequantize_row(j, row);
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot_f32(row, &x[i * k..(i + 1) * k]);
            }
        },
    );
    let mut out = vec![0f32; t * n];
    for j in 0..n {
        for i in 0..t {
            out[i * n + j] = out_t[j * t + i];
        }
    }
    out
}

/// RMSNorm over rows of `w.len()`: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let scale = rms_scale(row, eps);
        out.extend(row.iter().zip(w).map(|(&v, &g)| v * scale * g));
    }
    out
}

/// `1 / sqrt(mean(x^2) + eps)` with the sum of squares in f64, as ggml computes it: each square is exact in
/// f64, so the sum's order hardly matters, and normalized activations round to the same Q8 codes as llama.cpp's
/// (an f32 sum flips codes of outlier tokens, which moves logits by tenths).
pub fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
    1.0 / (mean as f32 + eps).sqrt()
}

/// Elementwise `a op b`, with `b` repeated over `a` when it is shorter (a bias or per-channel weight).
pub fn broadcast(a: &[f32], b: &[f32], op: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    a.chunks_exact(b.len())
        .flat_map(|row| row.iter().zip(b).map(|(&x, &y)| op(x, y)))
        .collect()
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (as ggml and `gelu_pytorch_tanh`).
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// `max(x, 0)^2`.
pub fn relu_sqr(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// The function of an activation.
pub fn activation(act: Activation) -> fn(f32) -> f32 {
    match act {
        Activation::Silu => silu,
        Activation::Gelu => gelu,
        Activation::ReluSqr => relu_sqr,
    }
}

/// Rotates `x[t, heads, head_dim]` in place by each token's position.
pub fn rope(x: &mut [f32], head_dim: usize, positions: &[i32], rope: &RopeParams) {
    let RopeParams { dims, style, .. } = *rope;
    let per_token = x.len() / positions.len();
    for (token, &pos) in x.chunks_exact_mut(per_token).zip(positions) {
        for head in token.chunks_exact_mut(head_dim) {
            for i in 0..dims / 2 {
                let (sin, cos) = rope.angle(pos, i).sin_cos();
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + dims / 2),
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
}

/// One layer's cached keys and values, `[position, kv_heads, head_dim]`, grown as positions are written.
/// One layer's keys and values, `[position, kv_heads * head_dim]`, grown as positions are written.
#[derive(Default)]
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvCache {
    pub fn write(&mut self, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * k.len();
        if self.k.len() < at + k.len() {
            let len = (at + k.len()).max(2 * self.k.len());
            self.k.resize(len, 0.0);
            self.v.resize(len, 0.0);
        }
        self.k[at..at + k.len()].copy_from_slice(k);
        self.v[at..at + v.len()].copy_from_slice(v);
    }
}

pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

impl AttentionShape {
    /// The first position a query at `pos` attends to (causal, within the sliding window if there is one).
    pub fn first_attended(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// Writes `k`, `v` at `positions` into the cache, then attends each query to the cached keys at or before its
/// position (and within the window). Returns `[t, heads, head_dim]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    positions: &[i32],
    cache: &mut KvCache,
    s: &AttentionShape,
) -> Vec<f32> {
    let kv_width = s.kv_heads * s.head_dim;
    for ((kr, vr), &pos) in k
        .chunks_exact(kv_width)
        .zip(v.chunks_exact(kv_width))
        .zip(positions)
    {
        cache.write(pos as usize, kr, vr);
    }
    let group = s.heads / s.kv_heads;
    let hd = s.head_dim;
    let mut out = vec![0f32; q.len()];
    let mut scores = Vec::new();
    for (t, &pos) in positions.iter().enumerate() {
        let pos = pos as usize;
        let first = s.first_attended(pos);
        for h in 0..s.heads {
            let kvh = h / group;
            let qh = &q[(t * s.heads + h) * hd..][..hd];
            scores.clear();
            scores.extend(
                (first..=pos)
                    .map(|j| dot_f32(qh, &cache.k[j * kv_width + kvh * hd..][..hd]) * s.scale),
            );
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc as f64;
            }
            let o = &mut out[(t * s.heads + h) * hd..][..hd];
            for (j, &p) in (first..=pos).zip(&scores) {
                let weight = (p as f64 / sum) as f32;
                for (oi, vi) in o.iter_mut().zip(&cache.v[j * kv_width + kvh * hd..][..hd]) {
                    *oi += weight * vi;
                }
            }
        }
    }
    out
}

/// A float weight (norm gains, biases) as f32.
pub fn weight_f32(w: &WeightView) -> Vec<f32> {
    let mut out = vec![0f32; w.shape.iter().product()];
    dequantize(w.format, w.data, &mut out);
    out
}
