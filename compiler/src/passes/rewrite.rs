//! The one way passes build graphs: copy the old graph node by node into a new one, replacing what they match.

use kiln_ir::{Graph, NodeId, Op, Operand, TensorType, WeightId};
use std::collections::HashMap;

/// Copies nodes from `old` into a fresh graph; `map` records what each old node became.
pub struct Rewriter<'g> {
    pub old: &'g Graph,
    pub new: Graph,
    map: HashMap<NodeId, Operand>,
    weights: HashMap<WeightId, WeightId>,
}

impl<'g> Rewriter<'g> {
    pub fn new(old: &'g Graph) -> Self {
        Rewriter {
            old,
            new: Graph::new(old.name.clone()),
            map: HashMap::new(),
            weights: HashMap::new(),
        }
    }

    /// The new graph's operand for an old operand (old nodes must have been copied or replaced already).
    pub fn operand(&mut self, operand: Operand) -> Operand {
        match operand {
            Operand::Value(id) => *self
                .map
                .get(&id)
                .expect("operands are rewritten before their users"),
            Operand::Weight(w) => Operand::Weight(self.weight(w)),
        }
    }

    pub fn weight(&mut self, w: WeightId) -> WeightId {
        if let Some(&new) = self.weights.get(&w) {
            return new;
        }
        let decl = self.old.weight(w);
        let new = self.new.declare_weight(&decl.name, decl.ty.clone());
        self.weights.insert(w, new);
        new
    }

    /// Copies an old node unchanged.
    pub fn copy(&mut self, id: NodeId) -> NodeId {
        let node = self.old.node(id);
        let operands = node.operands.iter().map(|&o| self.operand(o)).collect();
        let new = self.new.add(node.op.clone(), operands, node.ty.clone());
        self.map.insert(id, Operand::Value(new));
        new
    }

    /// Adds a new node (operands already in the new graph).
    pub fn add(&mut self, op: Op, operands: Vec<Operand>, ty: TensorType) -> NodeId {
        self.new.add(op, operands, ty)
    }

    /// Adds a new node whose type follows from its operands (already in the new graph). A type error here is
    /// a bug in the pass that built the node.
    pub fn add_inferred(&mut self, op: Op, operands: Vec<Operand>) -> NodeId {
        let types: Vec<_> = operands.iter().map(|o| self.new.operand_type(*o)).collect();
        let placeholder = TensorType::new(kiln_ir::DType::F32, []);
        let ty = op
            .infer(&types, &placeholder)
            .unwrap_or_else(|e| panic!("{}: {e}", op.name()));
        self.new.add(op, operands, ty)
    }

    /// Records that old node `id` is now `to` in the new graph.
    pub fn replace(&mut self, id: NodeId, to: Operand) {
        self.map.insert(id, to);
    }

    /// Finishes: the old graph's outputs point at what their nodes became.
    pub fn finish(mut self) -> Graph {
        for (name, id) in self.old.outputs() {
            match self.map.get(id) {
                Some(Operand::Value(new)) => self.new.set_output(name, *new),
                other => panic!("output `{name}` was rewritten to {other:?}, not a value"),
            }
        }
        self.new
    }
}

/// How many operand slots read each node (a graph output counts as a reader).
pub fn use_counts(graph: &Graph) -> Vec<usize> {
    let mut uses = vec![0; graph.len()];
    for id in graph.node_ids() {
        for operand in &graph.node(id).operands {
            if let Operand::Value(src) = operand {
                uses[src.index()] += 1;
            }
        }
    }
    for (_, id) in graph.outputs() {
        uses[id.index()] += 1;
    }
    uses
}
