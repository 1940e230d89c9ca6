//! Fuse: rewrite the unfused decoder patterns into the fused ops of `kiln_ir::op`.
//!
//! - attention input: `rms_norm` shared by the Q, K, V `matmul`s (+ bias `add`s), `reshape`s to heads, optional
//!   per-head `rms_norm`s, `rope` of Q and K, `attention`, `reshape` back: `qkv_rope` + `attention_qkv`;
//! - gated FFN: `rms_norm` shared by the gate and up `matmul`s, the activation and the `mul`: `gated_ffn`;
//! - residual: `add(residual, matmul(..))`, optionally with a post-`rms_norm`: `matmul_residual`;
//! - any other `matmul` of a `rms_norm` used only by it (the LM head): `norm_matmul`.
//!
//! Each pattern is anchored at its last node; every interior node must have no other user, so nothing a pattern
//! swallows is needed elsewhere. Replaced nodes become dead and are dropped at the end.

use super::canonicalize::drop_dead;
use super::rewrite::{use_counts, Rewriter};
use kiln_ir::{Activation, Graph, NodeId, Op, Operand, RopeParams};

pub fn run(graph: Graph) -> Graph {
    let uses = use_counts(&graph);
    let m = Matcher {
        g: &graph,
        uses: &uses,
    };
    let mut rw = Rewriter::new(&graph);
    for id in graph.node_ids() {
        let fused = match graph.node(id).op {
            Op::Reshape => m.attention(id).map(|a| a.emit(&mut rw)),
            Op::Mul => m.gated_ffn(id).map(|f| f.emit(&mut rw)),
            Op::Add => m.residual(id).map(|r| r.emit(&mut rw)),
            Op::MatMul => m.norm_matmul(id).map(|n| n.emit(&mut rw)),
            _ => None,
        };
        match fused {
            Some(node) => rw.replace(id, Operand::Value(node)),
            None => {
                rw.copy(id);
            }
        }
    }
    drop_dead(rw.finish())
}

struct Matcher<'g> {
    g: &'g Graph,
    uses: &'g [usize],
}

impl Matcher<'_> {
    /// The node behind a value operand that has exactly `uses` users, and its op matches `want`.
    fn node(&self, operand: Operand, uses: usize, want: fn(&Op) -> bool) -> Option<NodeId> {
        let Operand::Value(id) = operand else {
            return None;
        };
        (self.uses[id.index()] == uses && want(&self.g.node(id).op)).then_some(id)
    }

    fn operands(&self, id: NodeId) -> &[Operand] {
        &self.g.node(id).operands
    }

    /// `rms_norm(x, g)` with `uses` users: (x, g, eps).
    fn norm(&self, operand: Operand, uses: usize) -> Option<(Operand, Operand, f32)> {
        let id = self.node(operand, uses, |op| matches!(op, Op::RmsNorm { .. }))?;
        let Op::RmsNorm { eps } = self.g.node(id).op else {
            unreachable!()
        };
        Some((self.operands(id)[0], self.operands(id)[1], eps))
    }

    /// One attention projection: `reshape([add(] matmul(h, W) [, b)])`: (h, W, bias).
    fn projection(&self, operand: Operand) -> Option<(Operand, Operand, Option<Operand>)> {
        let reshape = self.node(operand, 1, |op| *op == Op::Reshape)?;
        let mut inner = self.operands(reshape)[0];
        let mut bias = None;
        if let Some(add) = self.node(inner, 1, |op| *op == Op::Add) {
            let [y, b] = self.operands(add) else {
                return None;
            };
            if !matches!(b, Operand::Weight(_)) {
                return None;
            }
            (inner, bias) = (*y, Some(*b));
        }
        let matmul = self.node(inner, 1, |op| *op == Op::MatMul)?;
        Some((self.operands(matmul)[0], self.operands(matmul)[1], bias))
    }

    /// Q or K: `rope([rms_norm(] projection [, n)], positions)`: (projection, qk norm (eps, n), rope, positions).
    #[allow(clippy::type_complexity)]
    fn roped(
        &self,
        operand: Operand,
    ) -> Option<(
        (Operand, Operand, Option<Operand>),
        Option<(f32, Operand)>,
        RopeParams,
        Operand,
    )> {
        let rope_id = self.node(operand, 1, |op| matches!(op, Op::Rope(_)))?;
        let Op::Rope(rope) = self.g.node(rope_id).op else {
            unreachable!()
        };
        let [x, positions] = self.operands(rope_id) else {
            return None;
        };
        let (x, qk_norm) = match self.norm(*x, 1) {
            Some((inner, n, eps)) => (inner, Some((eps, n))),
            None => (*x, None),
        };
        Some((self.projection(x)?, qk_norm, rope, *positions))
    }

    /// Anchored at the `reshape` that flattens an `attention` result.
    fn attention(&self, id: NodeId) -> Option<AttentionBlock> {
        let attn = self.node(self.operands(id)[0], 1, |op| {
            matches!(op, Op::Attention { .. })
        })?;
        let Op::Attention {
            layer,
            scale,
            window,
        } = self.g.node(attn).op
        else {
            unreachable!()
        };
        let [q, k, v, positions] = self.operands(attn) else {
            return None;
        };
        let ((hq, wq, bq), q_norm, rope, q_pos) = self.roped(*q)?;
        let ((hk, wk, bk), k_norm, k_rope, k_pos) = self.roped(*k)?;
        let (hv, wv, bv) = self.projection(*v)?;
        let same_input =
            hq == hk && hk == hv && q_pos == *positions && k_pos == *positions && rope == k_rope;
        let qk_norm = match (q_norm, k_norm) {
            (Some((qe, qn)), Some((ke, kn))) if qe == ke => Some((qe, qn, kn)),
            (None, None) => None,
            _ => return None,
        };
        let bias = match (bq, bk, bv) {
            (Some(bq), Some(bk), Some(bv)) => Some([bq, bk, bv]),
            (None, None, None) => None,
            _ => return None,
        };
        let (x, g, eps) = self.norm(hq, 3)?;
        let head_shape = |o: Operand| {
            self.g
                .operand_type(o)
                .shape
                .get(1)
                .cloned()
                .and_then(|d| d.fixed())
        };
        let q_type = self.g.operand_type(*q);
        let head_dim = q_type.shape.get(2).cloned().and_then(|d| d.fixed())?;
        let (heads, kv_heads) = (head_shape(*q)?, head_shape(*k)?);
        same_input.then_some(AttentionBlock {
            x,
            g,
            eps,
            weights: [wq, wk, wv],
            positions: *positions,
            bias,
            qk_norm,
            rope,
            heads,
            kv_heads,
            head_dim,
            layer,
            scale,
            window,
        })
    }

    /// Anchored at `mul(act(matmul(h, Wgate)), matmul(h, Wup))` with `h = rms_norm(x, g)` used by both.
    fn gated_ffn(&self, id: NodeId) -> Option<GatedFfn> {
        let [a, up] = self.operands(id) else {
            return None;
        };
        let act_id = self.node(*a, 1, |op| matches!(op, Op::Activation(_)))?;
        let Op::Activation(act) = self.g.node(act_id).op else {
            return None;
        };
        let gate = self.node(self.operands(act_id)[0], 1, |op| *op == Op::MatMul)?;
        let up = self.node(*up, 1, |op| *op == Op::MatMul)?;
        let (h, h_up) = (self.operands(gate)[0], self.operands(up)[0]);
        let (x, g, eps) = self.norm(h, 2)?;
        (h == h_up).then_some(GatedFfn {
            x,
            g,
            eps,
            act,
            w_gate: self.operands(gate)[1],
            w_up: self.operands(up)[1],
        })
    }

    /// Anchored at `add(residual, [rms_norm(] matmul(x, W) [, g)])`.
    fn residual(&self, id: NodeId) -> Option<Residual> {
        let [residual, y] = self.operands(id) else {
            return None;
        };
        if !matches!(residual, Operand::Value(_)) {
            return None;
        }
        let (product, post_norm) = match self.norm(*y, 1) {
            Some((inner, g, eps)) => (inner, Some((eps, g))),
            None => (*y, None),
        };
        let matmul = self.node(product, 1, |op| *op == Op::MatMul)?;
        let [x, w] = self.operands(matmul) else {
            return None;
        };
        let same_type = self.g.operand_type(*residual) == self.g.operand_type(*y);
        same_type.then_some(Residual {
            x: *x,
            w: *w,
            post_norm,
            residual: *residual,
        })
    }

    /// Anchored at `matmul(rms_norm(x, g), W)` whose norm has no other user.
    fn norm_matmul(&self, id: NodeId) -> Option<NormMatMul> {
        let [h, w] = self.operands(id) else {
            return None;
        };
        let (x, g, eps) = self.norm(*h, 1)?;
        Some(NormMatMul { x, g, eps, w: *w })
    }
}

struct AttentionBlock {
    x: Operand,
    g: Operand,
    eps: f32,
    weights: [Operand; 3],
    positions: Operand,
    bias: Option<[Operand; 3]>,
    qk_norm: Option<(f32, Operand, Operand)>,
    rope: RopeParams,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layer: usize,
    scale: f32,
    window: Option<usize>,
}

impl AttentionBlock {
    fn emit(self, rw: &mut Rewriter) -> NodeId {
        let mut operands = vec![self.x, self.g];
        operands.extend(self.weights);
        operands.push(self.positions);
        operands.extend(self.bias.into_iter().flatten());
        operands.extend(self.qk_norm.iter().flat_map(|(_, qn, kn)| [*qn, *kn]));
        let operands = operands.into_iter().map(|o| rw.operand(o)).collect();
        let qkv = rw.add_inferred(
            Op::QkvRope {
                eps: self.eps,
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
                rope: self.rope,
                bias: self.bias.is_some(),
                qk_norm: self.qk_norm.map(|(eps, _, _)| eps),
            },
            operands,
        );
        let positions = rw.operand(self.positions);
        let op = Op::AttentionQkv {
            layer: self.layer,
            scale: self.scale,
            window: self.window,
            heads: self.heads,
            kv_heads: self.kv_heads,
        };
        rw.add_inferred(op, vec![Operand::Value(qkv), positions])
    }
}

struct GatedFfn {
    x: Operand,
    g: Operand,
    eps: f32,
    act: Activation,
    w_gate: Operand,
    w_up: Operand,
}

impl GatedFfn {
    fn emit(self, rw: &mut Rewriter) -> NodeId {
        let operands = [self.x, self.g, self.w_gate, self.w_up]
            .map(|o| rw.operand(o))
            .to_vec();
        rw.add_inferred(
            Op::GatedFfn {
                eps: self.eps,
                act: self.act,
            },
            operands,
        )
    }
}

struct Residual {
    x: Operand,
    w: Operand,
    post_norm: Option<(f32, Operand)>,
    residual: Operand,
}

impl Residual {
    fn emit(self, rw: &mut Rewriter) -> NodeId {
        let mut operands = vec![self.x, self.w];
        operands.extend(self.post_norm.map(|(_, g)| g));
        operands.push(self.residual);
        let operands = operands.into_iter().map(|o| rw.operand(o)).collect();
        rw.add_inferred(
            Op::MatMulResidual {
                post_norm: self.post_norm.map(|(eps, _)| eps),
            },
            operands,
        )
    }
}

struct NormMatMul {
    x: Operand,
    g: Operand,
    eps: f32,
    w: Operand,
}

impl NormMatMul {
    fn emit(self, rw: &mut Rewriter) -> NodeId {
        let operands = [self.x, self.g, self.w].map(|o| rw.operand(o)).to_vec();
        rw.add_inferred(Op::NormMatMul { eps: self.eps }, operands)
    }
}
