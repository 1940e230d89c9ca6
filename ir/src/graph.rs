//! The graph: weight declarations, SSA nodes in a petgraph DAG, and named outputs.

use crate::op::Op;
use crate::types::TensorType;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

/// A node's id; nodes are numbered in the order they were added, which is a topological order.
pub type NodeId = NodeIndex<u32>;

/// Index into the graph's weight declarations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeightId(pub u32);

/// A weight the graph reads, by its GGUF tensor name; shapes are row-major (`[out, in]` for matrices).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightDecl {
    pub name: String,
    pub ty: TensorType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operand {
    Value(NodeId),
    Weight(WeightId),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub operands: Vec<Operand>,
    pub ty: TensorType,
}

/// The IR graph. Edges run from producer to consumer, weighted by the consumer's operand slot; they mirror the
/// `Value` operands of each node, and `add` is the one place both are written.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    /// The architecture the graph was lowered from (`llama`, `qwen2`, ...).
    pub name: String,
    weights: Vec<WeightDecl>,
    dag: DiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Declares a weight (or returns the existing declaration of that name).
    pub fn declare_weight(&mut self, name: &str, ty: TensorType) -> WeightId {
        if let Some(i) = self.weights.iter().position(|w| w.name == name) {
            return WeightId(i as u32);
        }
        self.weights.push(WeightDecl {
            name: name.to_string(),
            ty,
        });
        WeightId(self.weights.len() as u32 - 1)
    }

    /// Adds a node. Operands must already exist; the type is taken as given (the verifier checks it).
    pub fn add(&mut self, op: Op, operands: Vec<Operand>, ty: TensorType) -> NodeId {
        let id = self.dag.add_node(Node {
            op,
            operands: operands.clone(),
            ty,
        });
        for (slot, operand) in operands.iter().enumerate() {
            if let Operand::Value(src) = operand {
                self.dag.add_edge(*src, id, slot as u32);
            }
        }
        id
    }

    pub fn set_output(&mut self, name: &str, node: NodeId) {
        self.outputs.push((name.to_string(), node));
    }

    pub fn weights(&self) -> &[WeightDecl] {
        &self.weights
    }

    pub fn weight(&self, id: WeightId) -> &WeightDecl {
        &self.weights[id.0 as usize]
    }

    /// A weight's declaration, for passes that change how a weight is stored (its format).
    pub fn weight_mut(&mut self, id: WeightId) -> &mut WeightDecl {
        &mut self.weights[id.0 as usize]
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    /// Node ids in program (topological) order.
    pub fn node_ids(&self) -> impl ExactSizeIterator<Item = NodeId> + '_ {
        self.dag.node_indices()
    }

    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub fn dag(&self) -> &DiGraph<Node, u32> {
        &self.dag
    }

    /// The type of an operand.
    pub fn operand_type(&self, operand: Operand) -> &TensorType {
        match operand {
            Operand::Value(id) => &self.dag[id].ty,
            Operand::Weight(w) => &self.weight(w).ty,
        }
    }
}
