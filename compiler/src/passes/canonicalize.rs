//! Canonicalize: remove what computes nothing, so later passes match one form.
//!
//! - a reshape to the shape it already has disappears, and a reshape of a reshape reads the original;
//! - `scale` by 1 disappears;
//! - then nodes no output depends on are dropped (weights nothing reads go with them).

use super::rewrite::Rewriter;
use kiln_ir::{Graph, Op, Operand};

pub fn run(graph: Graph) -> Graph {
    let mut rw = Rewriter::new(&graph);
    for id in graph.node_ids() {
        let node = graph.node(id);
        let forward = match (&node.op, node.operands.first()) {
            (Op::Reshape, Some(&input)) => {
                // The new graph is canonical so far: its reshapes never read reshapes, so one step back
                // reaches the original.
                let mut input = rw.operand(input);
                if let Operand::Value(n) = input {
                    if rw.new.node(n).op == Op::Reshape {
                        input = rw.new.node(n).operands[0];
                    }
                }
                Some(match rw.new.operand_type(input) == &node.ty {
                    true => input,
                    false => Operand::Value(rw.add(Op::Reshape, vec![input], node.ty.clone())),
                })
            }
            (Op::Scale { factor }, Some(&src)) if *factor == 1.0 => Some(rw.operand(src)),
            _ => None,
        };
        match forward {
            Some(to) => rw.replace(id, to),
            None => {
                rw.copy(id);
            }
        }
    }
    drop_dead(rw.finish())
}

/// Keeps only the nodes some output depends on.
pub fn drop_dead(graph: Graph) -> Graph {
    let mut live = vec![false; graph.len()];
    let mut stack: Vec<_> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut live[id.index()], true) {
            continue;
        }
        for operand in &graph.node(id).operands {
            if let Operand::Value(src) = operand {
                stack.push(*src);
            }
        }
    }
    if live.iter().all(|&l| l) {
        return graph;
    }
    let mut rw = Rewriter::new(&graph);
    for id in graph.node_ids().filter(|id| live[id.index()]) {
        rw.copy(id);
    }
    rw.finish()
}
