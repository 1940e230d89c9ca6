//! The reference executor: a plain interpreter of the graph in f32, with a KV cache.
//!
//! It is the oracle every fused kernel and every target is tested against, so each op is the textbook formula
//! (see `kernels`), each fused op is exactly the composition its definition in `kiln_ir::op` states (see
//! `fused`), values are freed after their last use, and nothing is clever.

mod fused;
#[cfg(test)]
pub(crate) use fused::unpack_qkv as fused_unpack;
pub mod kernels;

use crate::engine::{check_step, Engine, ExecError, Logits};
use kernels::{AttentionShape, KvCache};
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Operand};
use std::borrow::Cow;
use std::collections::HashMap;

enum Value {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I32(Vec<i32>),
}

/// A node's operands, as the values and weights they name.
struct Args<'a, 'w> {
    operands: &'a [Operand],
    values: &'a [Option<Value>],
    weights: &'a [WeightView<'w>],
}

impl<'a> Args<'a, '_> {
    fn value(&self, i: usize) -> &'a Value {
        match self.operands[i] {
            Operand::Value(id) => self.values[id.index()]
                .as_ref()
                .expect("values live until their last use"),
            Operand::Weight(_) => unreachable!("the verifier checked that operand {i} is a value"),
        }
    }

    /// An f32 operand: a value, or a float weight (norm gains, biases) converted.
    fn f32(&self, i: usize) -> Cow<'a, [f32]> {
        match self.operands[i] {
            Operand::Weight(w) => Cow::Owned(kernels::weight_f32(&self.weights[w.0 as usize])),
            Operand::Value(_) => match self.value(i) {
                Value::F32 { data, .. } => Cow::Borrowed(data),
                Value::I32(_) => unreachable!("the verifier checked that operand {i} is f32"),
            },
        }
    }

    fn shape(&self, i: usize) -> Vec<usize> {
        match self.operands[i] {
            Operand::Weight(w) => self.weights[w.0 as usize].shape.to_vec(),
            Operand::Value(_) => match self.value(i) {
                Value::F32 { shape, .. } => shape.clone(),
                Value::I32(data) => vec![data.len()],
            },
        }
    }

    fn i32(&self, i: usize) -> &'a [i32] {
        match self.value(i) {
            Value::I32(data) => data,
            Value::F32 { .. } => unreachable!("the verifier checked that operand {i} is i32"),
        }
    }

    fn weight(&self, i: usize) -> &WeightView<'_> {
        match self.operands[i] {
            Operand::Weight(w) => &self.weights[w.0 as usize],
            Operand::Value(_) => unreachable!("the verifier checked that operand {i} is a weight"),
        }
    }
}

pub struct ReferenceExecutor<'w> {
    graph: Graph,
    /// Indexed by `WeightId`.
    weights: Vec<WeightView<'w>>,
    logits: NodeId,
    vocab: usize,
    /// After which node each value is last read (values are dropped then).
    last_use: Vec<usize>,
    caches: HashMap<usize, KvCache>,
    max_context: usize,
    cached: usize,
}

impl<'w> ReferenceExecutor<'w> {
    /// Binds the graph's weights from `source`, checking each one's format and shape against its declaration.
    pub fn new(
        graph: Graph,
        source: &'w dyn WeightSource,
        max_context: usize,
    ) -> Result<Self, ExecError> {
        let mut weights = Vec::with_capacity(graph.weights().len());
        for decl in graph.weights() {
            let view = source
                .weight(&decl.name)
                .ok_or_else(|| ExecError::MissingWeight(decl.name.clone()))?;
            let shape: Vec<Dim> = view.shape.iter().map(|&d| Dim::Fixed(d)).collect();
            if DType::of_format(view.format) != decl.ty.dtype || shape != decl.ty.shape {
                return Err(ExecError::WeightMismatch {
                    name: decl.name.clone(),
                    expected: decl.ty.to_string(),
                    found: format!("{}{:?}", view.format, view.shape),
                });
            }
            weights.push(view);
        }
        let logits = graph
            .output("logits")
            .ok_or(ExecError::NoOutput("logits"))?;
        let vocab = match graph.node(logits).ty.inner() {
            Some(Dim::Fixed(v)) => *v,
            _ => return Err(ExecError::NoOutput("logits")),
        };
        let mut last_use: Vec<usize> = graph.node_ids().map(|id| id.index()).collect();
        for id in graph.node_ids() {
            for operand in &graph.node(id).operands {
                if let Operand::Value(src) = operand {
                    last_use[src.index()] = id.index();
                }
            }
        }
        last_use[logits.index()] = usize::MAX;
        Ok(ReferenceExecutor {
            graph,
            weights,
            logits,
            vocab,
            last_use,
            caches: HashMap::new(),
            max_context,
            cached: 0,
        })
    }

    /// Cached positions of the current sequence.
    pub fn cached(&self) -> usize {
        self.cached
    }
}

/// Evaluates one node.
fn eval(
    op: &Op,
    declared: &[Dim],
    args: &Args,
    caches: &mut HashMap<usize, KvCache>,
    tokens: &[u32],
    positions: &[i32],
) -> Result<Value, ExecError> {
    let f32_value = |shape: Vec<usize>, data: Vec<f32>| Ok(Value::F32 { shape, data });
    let map =
        |f: fn(f32) -> f32| f32_value(args.shape(0), args.f32(0).iter().map(|&x| f(x)).collect());
    match op {
        Op::Input { name } => Ok(Value::I32(match name.as_str() {
            "tokens" => tokens.iter().map(|&t| t as i32).collect(),
            _ => positions.to_vec(),
        })),
        Op::Embed => {
            let table = args.weight(0);
            let d = table.row_elems();
            let mut data = vec![0f32; tokens.len() * d];
            for (row, &id) in data.chunks_exact_mut(d).zip(args.i32(1)) {
                if id < 0 || id as usize >= table.shape[0] {
                    return Err(ExecError::BadToken {
                        id: id as u32,
                        vocab: table.shape[0],
                    });
                }
                table.dequantize_row(id as usize, row);
            }
            f32_value(vec![tokens.len(), d], data)
        }
        Op::RmsNorm { eps } => f32_value(
            args.shape(0),
            kernels::rms_norm(&args.f32(0), &args.f32(1), *eps),
        ),
        Op::MatMul => {
            let (shape, data) = fused::matmul_value(&args.f32(0), args.shape(0), args.weight(1));
            f32_value(shape, data)
        }
        Op::Add => f32_value(
            args.shape(0),
            kernels::broadcast(&args.f32(0), &args.f32(1), |x, y| x + y),
        ),
        Op::Mul => f32_value(
            args.shape(0),
            kernels::broadcast(&args.f32(0), &args.f32(1), |x, y| x * y),
        ),
        Op::Scale { factor } => f32_value(
            args.shape(0),
            args.f32(0).iter().map(|x| x * factor).collect(),
        ),
        Op::Activation(act) => map(kernels::activation(*act)),
        Op::Reshape => {
            let shape = declared
                .iter()
                .map(|d| d.clone().fixed().unwrap_or(tokens.len()))
                .collect();
            f32_value(shape, args.f32(0).into_owned())
        }
        Op::Rope(rope) => {
            let shape = args.shape(0);
            let mut data = args.f32(0).into_owned();
            kernels::rope(&mut data, shape[2], args.i32(1), rope);
            f32_value(shape, data)
        }
        Op::Attention {
            layer,
            scale,
            window,
        } => {
            let (q_shape, k_shape) = (args.shape(0), args.shape(1));
            let shape = AttentionShape {
                heads: q_shape[1],
                kv_heads: k_shape[1],
                head_dim: q_shape[2],
                scale: *scale,
                window: *window,
            };
            let cache = caches.entry(*layer).or_default();
            let data = kernels::attention(
                &args.f32(0),
                &args.f32(1),
                &args.f32(2),
                args.i32(3),
                cache,
                &shape,
            );
            f32_value(q_shape, data)
        }
        Op::NormMatMul { eps } => {
            let h = kernels::rms_norm(&args.f32(0), &args.f32(1), *eps);
            let (shape, data) = fused::matmul_value(&h, args.shape(0), args.weight(2));
            f32_value(shape, data)
        }
        Op::QkvRope { .. } => {
            let (shape, data) = fused::qkv_rope(op, args);
            f32_value(shape, data)
        }
        Op::AttentionQkv {
            layer,
            scale,
            window,
            heads,
            kv_heads,
        } => {
            let qkv_shape = args.shape(0);
            let head_dim = qkv_shape[2];
            let (q, k, v) = fused::unpack_qkv(&args.f32(0), *heads, *kv_heads, head_dim);
            let shape = AttentionShape {
                heads: *heads,
                kv_heads: *kv_heads,
                head_dim,
                scale: *scale,
                window: *window,
            };
            let cache = caches.entry(*layer).or_default();
            let data = kernels::attention(&q, &k, &v, args.i32(1), cache, &shape);
            f32_value(vec![qkv_shape[0], heads * head_dim], data)
        }
        Op::GatedFfn { eps, act } => {
            let (shape, data) = fused::gated_ffn(args, *eps, *act);
            f32_value(shape, data)
        }
        Op::MatMulResidual { post_norm } => {
            let (shape, data) = fused::matmul_residual(args, *post_norm);
            f32_value(shape, data)
        }
    }
}

impl Engine for ReferenceExecutor<'_> {
    /// Every row is computed: the interpreter runs the graph as it is, `last_only` or not.
    fn step(
        &mut self,
        tokens: &[u32],
        start: usize,
        _last_only: bool,
    ) -> Result<Logits, ExecError> {
        check_step(tokens, start, self.cached, self.max_context)?;
        let positions: Vec<i32> = (start..start + tokens.len()).map(|p| p as i32).collect();
        let mut values: Vec<Option<Value>> = (0..self.graph.len()).map(|_| None).collect();
        let Self {
            graph,
            weights,
            caches,
            last_use,
            ..
        } = self;
        for id in graph.node_ids() {
            let node = graph.node(id);
            let args = Args {
                operands: &node.operands,
                values: &values,
                weights,
            };
            let value = eval(&node.op, &node.ty.shape, &args, caches, tokens, &positions)?;
            values[id.index()] = Some(value);
            for operand in &node.operands {
                if let Operand::Value(src) = operand {
                    if last_use[src.index()] == id.index() {
                        values[src.index()] = None;
                    }
                }
            }
        }
        self.cached = start + tokens.len();
        match values[self.logits.index()].take() {
            Some(Value::F32 { data, .. }) => Ok(Logits {
                vocab: self.vocab,
                data,
            }),
            _ => Err(ExecError::NoOutput("logits")),
        }
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
