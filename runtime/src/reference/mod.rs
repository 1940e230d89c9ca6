//! The reference executor: a plain interpreter of the unfused graph in f32, with a KV cache.
//!
//! It is the oracle every fused kernel and every target is tested against, so each op is the textbook
//! formula (see `kernels`), values are freed after their last use, and nothing is clever.

mod kernels;

use crate::engine::{Engine, ExecError, Logits};
use kernels::{AttentionShape, LayerCache};
use kiln_ir::weights::{WeightSource, WeightView};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Operand};
use std::collections::HashMap;

enum Value {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    I32(Vec<i32>),
}

pub struct ReferenceExecutor<'w> {
    graph: Graph,
    /// Indexed by `WeightId`.
    weights: Vec<WeightView<'w>>,
    logits: NodeId,
    vocab: usize,
    /// After which node each value is last read (values are dropped then).
    last_use: Vec<usize>,
    caches: HashMap<usize, LayerCache>,
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

    fn f32_operand<'v>(
        &self,
        values: &'v [Option<Value>],
        operand: Operand,
    ) -> std::borrow::Cow<'v, [f32]> {
        match operand {
            Operand::Value(id) => match &values[id.index()] {
                Some(Value::F32 { data, .. }) => std::borrow::Cow::Borrowed(data),
                _ => unreachable!(
                    "the verifier checked operand dtypes and values live until their last use"
                ),
            },
            Operand::Weight(w) => {
                std::borrow::Cow::Owned(kernels::weight_f32(&self.weights[w.0 as usize]))
            }
        }
    }

    fn eval(
        &mut self,
        id: NodeId,
        values: &[Option<Value>],
        tokens: &[u32],
        positions: &[i32],
    ) -> Result<Value, ExecError> {
        let node = self.graph.node(id).clone();
        let ops = &node.operands;
        let value_shape = |o: Operand| match o {
            Operand::Value(v) => match &values[v.index()] {
                Some(Value::F32 { shape, .. }) => shape.clone(),
                _ => unreachable!("f32 operand"),
            },
            Operand::Weight(w) => self.weights[w.0 as usize].shape.to_vec(),
        };
        let i32_operand = |o: Operand| match o {
            Operand::Value(v) => match &values[v.index()] {
                Some(Value::I32(data)) => data.clone(),
                _ => unreachable!("i32 operand"),
            },
            Operand::Weight(_) => unreachable!("no i32 weights"),
        };
        let weight = |o: Operand| match o {
            Operand::Weight(w) => self.weights[w.0 as usize],
            Operand::Value(_) => unreachable!("the verifier checked that this operand is a weight"),
        };
        let f32_value = |shape: Vec<usize>, data: Vec<f32>| Ok(Value::F32 { shape, data });
        match &node.op {
            Op::Input { name } => Ok(Value::I32(match name.as_str() {
                "tokens" => tokens.iter().map(|&t| t as i32).collect(),
                _ => positions.to_vec(),
            })),
            Op::Embed => {
                let table = weight(ops[0]);
                let d = table.row_elems();
                let mut data = vec![0f32; tokens.len() * d];
                for (row, &id) in data.chunks_exact_mut(d).zip(&i32_operand(ops[1])) {
                    if id < 0 || id as usize >= table.shape[0] {
                        return Err(ExecError::BadToken {
                            id: id as u32,
                            vocab: table.shape[0],
                        });
                    }
                    kiln_ir::dequant::dequantize(table.format, table.row(id as usize), row);
                }
                f32_value(vec![tokens.len(), d], data)
            }
            Op::RmsNorm { eps } => {
                let x = self.f32_operand(values, ops[0]);
                let w = self.f32_operand(values, ops[1]);
                f32_value(value_shape(ops[0]), kernels::rms_norm(&x, &w, *eps))
            }
            Op::MatMul => {
                let w = weight(ops[1]);
                let mut shape = value_shape(ops[0]);
                let k = *shape.last().expect("rank >= 1");
                let data = kernels::matmul(&self.f32_operand(values, ops[0]), k, &w);
                *shape.last_mut().expect("rank >= 1") = w.shape[0];
                f32_value(shape, data)
            }
            Op::Add | Op::Mul => {
                let a = self.f32_operand(values, ops[0]);
                let b = self.f32_operand(values, ops[1]);
                let data = match node.op {
                    Op::Add => kernels::broadcast(&a, &b, |x, y| x + y),
                    _ => kernels::broadcast(&a, &b, |x, y| x * y),
                };
                f32_value(value_shape(ops[0]), data)
            }
            Op::Scale { factor } => f32_value(
                value_shape(ops[0]),
                self.f32_operand(values, ops[0])
                    .iter()
                    .map(|x| x * factor)
                    .collect(),
            ),
            Op::Silu => f32_value(
                value_shape(ops[0]),
                self.f32_operand(values, ops[0])
                    .iter()
                    .map(|&x| kernels::silu(x))
                    .collect(),
            ),
            Op::Gelu => f32_value(
                value_shape(ops[0]),
                self.f32_operand(values, ops[0])
                    .iter()
                    .map(|&x| kernels::gelu(x))
                    .collect(),
            ),
            Op::Reshape => {
                let shape = node
                    .ty
                    .shape
                    .iter()
                    .map(|d| d.clone().fixed().unwrap_or(tokens.len()))
                    .collect();
                f32_value(shape, self.f32_operand(values, ops[0]).into_owned())
            }
            Op::Rope {
                base,
                dims,
                freq_scale,
                style,
            } => {
                let shape = value_shape(ops[0]);
                let mut data = self.f32_operand(values, ops[0]).into_owned();
                kernels::rope(
                    &mut data,
                    shape[2],
                    &i32_operand(ops[1]),
                    *dims,
                    *base,
                    *freq_scale,
                    *style,
                );
                f32_value(shape, data)
            }
            Op::Attention {
                layer,
                scale,
                window,
            } => {
                let (q_shape, k_shape) = (value_shape(ops[0]), value_shape(ops[1]));
                let shape = AttentionShape {
                    heads: q_shape[1],
                    kv_heads: k_shape[1],
                    head_dim: q_shape[2],
                    scale: *scale,
                    window: *window,
                };
                let (q, k, v) = (
                    self.f32_operand(values, ops[0]),
                    self.f32_operand(values, ops[1]),
                    self.f32_operand(values, ops[2]),
                );
                let cache = self.caches.entry(*layer).or_default();
                let data = kernels::attention(&q, &k, &v, &i32_operand(ops[3]), cache, &shape);
                f32_value(q_shape, data)
            }
        }
    }

    /// Cached positions of the current sequence.
    pub fn cached(&self) -> usize {
        self.cached
    }
}

impl Engine for ReferenceExecutor<'_> {
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Logits, ExecError> {
        if tokens.is_empty() {
            return Err(ExecError::EmptyInput);
        }
        if start > self.cached {
            return Err(ExecError::PositionGap {
                start,
                cached: self.cached,
            });
        }
        if start + tokens.len() > self.max_context {
            return Err(ExecError::ContextFull {
                need: start + tokens.len(),
                max: self.max_context,
            });
        }
        let positions: Vec<i32> = (start..start + tokens.len()).map(|p| p as i32).collect();
        let mut values: Vec<Option<Value>> = (0..self.graph.len()).map(|_| None).collect();
        let ids: Vec<NodeId> = self.graph.node_ids().collect();
        for id in ids {
            let value = self.eval(id, &values, tokens, &positions)?;
            values[id.index()] = Some(value);
            for &operand in &self.graph.node(id).operands {
                if let Operand::Value(src) = operand {
                    if self.last_use[src.index()] == id.index() {
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
