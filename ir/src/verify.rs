//! The verifier: checks every invariant the rest of kiln relies on, and names the node that breaks one.

use crate::graph::{Graph, Operand};
use crate::op::Expect;
use crate::text::{print_node, print_operand};
use crate::types::DType;

/// A broken invariant, with the offending node printed in the text form.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{node}: {message}")]
pub struct VerifyError {
    /// The node's line in the text form (or `graph` / `output NAME` for graph-level errors).
    pub node: String,
    pub message: String,
}

pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    for id in graph.node_ids() {
        let node = graph.node(id);
        let fail = |message: String| VerifyError {
            node: print_node(graph, id),
            message,
        };
        let expected = node.op.operand_kinds();
        if node.operands.len() != expected.len() {
            return Err(fail(format!(
                "{} takes {} operands, has {}",
                node.op.name(),
                expected.len(),
                node.operands.len()
            )));
        }
        for (slot, (operand, want)) in node.operands.iter().zip(&expected).enumerate() {
            if let Operand::Value(src) = operand {
                // Nodes are numbered in insertion order, so a later id would be a use before definition.
                if src.index() >= id.index() {
                    return Err(fail(format!(
                        "operand {slot} (%{}) is used before it is defined",
                        src.index()
                    )));
                }
            }
            let dtype = graph.operand_type(*operand).dtype;
            let ok = match want {
                Expect::Weight => matches!(operand, Operand::Weight(_)),
                Expect::F32 => dtype == DType::F32,
                Expect::I32 => dtype == DType::I32,
            };
            if !ok {
                let what = match want {
                    Expect::Weight => "a weight".to_string(),
                    other => format!("{other:?}").to_lowercase(),
                };
                return Err(fail(format!(
                    "operand {slot} must be {what}, is {}",
                    print_operand(graph, *operand)
                )));
            }
        }
        let operand_types: Vec<_> = node
            .operands
            .iter()
            .map(|o| graph.operand_type(*o))
            .collect();
        let inferred = node.op.infer(&operand_types, &node.ty).map_err(fail)?;
        if inferred != node.ty {
            return Err(fail(format!(
                "declared type {} but the operands give {inferred}",
                node.ty
            )));
        }
    }
    if graph.outputs().is_empty() {
        return Err(VerifyError {
            node: "graph".into(),
            message: "the graph has no outputs".into(),
        });
    }
    Ok(())
}
