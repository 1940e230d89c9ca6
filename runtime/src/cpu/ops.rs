//! The CPU executor's small ops, in Rust: RMSNorm, RoPE, elementwise ops, and attention over the KV cache for
//! plans without a generated attention function. They move a few KB per token, next to the megabytes of weights
//! the generated matmuls stream.

use super::kv::SeqKv;
use crate::reference::kernels as reference;
pub use crate::reference::kernels::AttentionShape;
use kiln_ir::dequant::dot_f32 as dot;
use kiln_ir::{RopeParams, RopeStyle};

/// `x * w / rms(x)` over each row of `w.len()` values, in place.
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        let scale = reference::rms_scale(row, eps);
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// `out += w * v`
pub fn axpy(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

/// cos/sin of each pair's angle at each position of a step: `[positions, dims / 2]` each.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// The angles are `RopeParams::angle`'s, bit for bit, with each pair's `pow` taken once.
    pub fn new(rope: &RopeParams, positions: &[i32]) -> Self {
        let half = rope.dims / 2;
        let frequencies: Vec<f64> = (0..half).map(|i| rope.frequency(i)).collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            let p = rope.scaled_position(pos);
            for f in &frequencies {
                let (s, c) = (p * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        RopeTable { cos, sin, half }
    }

    /// The positions the table holds angles for.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half
    }

    /// The cosines from the `t`-th position on, `[positions - t, dims / 2]`.
    pub fn cos(&self, t: usize) -> &[f32] {
        &self.cos[t * self.half..]
    }

    /// The sines from the `t`-th position on, `[positions - t, dims / 2]`.
    pub fn sin(&self, t: usize) -> &[f32] {
        &self.sin[t * self.half..]
    }

    /// Rotates the heads of one token (`head_dim` values each) at the table's `t`-th position.
    pub fn apply(&self, heads: &mut [f32], head_dim: usize, t: usize, style: RopeStyle) {
        let (cos, sin) = (
            &self.cos[t * self.half..][..self.half],
            &self.sin[t * self.half..][..self.half],
        );
        for head in heads.chunks_exact_mut(head_dim) {
            for i in 0..self.half {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + self.half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// The RoPE tables of the current step's positions, one per distinct `RopeParams`: every layer of a step rotates
/// the same positions, so a table is built once per step rather than once per layer.
#[derive(Default)]
pub struct RopeTables {
    positions: Vec<i32>,
    tables: Vec<(RopeParams, RopeTable)>,
}

impl RopeTables {
    pub fn get(&mut self, rope: &RopeParams, positions: &[i32]) -> &RopeTable {
        if self.positions != positions {
            self.positions.clear();
            self.positions.extend_from_slice(positions);
            self.tables.clear();
        }
        let at = match self.tables.iter().position(|(r, _)| r == rope) {
            Some(at) => at,
            None => {
                self.tables.push((*rope, RopeTable::new(rope, positions)));
                self.tables.len() - 1
            }
        };
        &self.tables[at].1
    }
}

/// Attends one query head at position `pos` to the sequence's cached keys at or before it (within the window),
/// writing `head_dim` values to `out`. `scores` is scratch.
pub fn attend(
    q: &[f32],
    kv: &SeqKv,
    kv_head: usize,
    pos: usize,
    s: &AttentionShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let first = s.first_attended(pos);
    scores.clear();
    scores.extend((first..=pos).map(|j| dot(q, kv.key(j, kv_head)) * s.scale));
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    out.fill(0.0);
    let inv = 1.0 / sum;
    for (j, &p) in (first..=pos).zip(scores.iter()) {
        axpy(out, p * inv, kv.value(j, kv_head));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(base: f32) -> RopeParams {
        RopeParams {
            base,
            dims: 8,
            freq_scale: 0.5,
            style: RopeStyle::Neox,
        }
    }

    /// The table `tables` gives for `rope` at `positions` holds exactly `RopeParams::angle`'s cosines and sines.
    fn assert_table(tables: &mut RopeTables, rope: &RopeParams, positions: &[i32]) {
        let table = tables.get(rope, positions);
        assert_eq!(table.positions(), positions.len());
        for (t, &pos) in positions.iter().enumerate() {
            for i in 0..rope.dims / 2 {
                let (s, c) = rope.angle(pos, i).sin_cos();
                assert_eq!(table.cos(t)[i], c as f32, "cos at {pos}, pair {i}");
                assert_eq!(table.sin(t)[i], s as f32, "sin at {pos}, pair {i}");
            }
        }
    }

    #[test]
    fn rope_tables_follow_the_step_positions_and_params() {
        let mut tables = RopeTables::default();
        let (local, global) = (rope(10_000.0), rope(1_000_000.0));
        assert_table(&mut tables, &local, &[0, 1, 2, 3]);
        assert_table(&mut tables, &global, &[0, 1, 2, 3]);
        assert_table(&mut tables, &local, &[0, 1, 2, 3]);
        // A new step (a decode token) must not see the prompt's tables.
        assert_table(&mut tables, &local, &[4]);
        assert_table(&mut tables, &global, &[4]);
    }
}
