//! The executable form of a compiled graph: distinct kernel specs, a flat launch list, and the memory plan.
//!
//! Every activation has the shape `[tokens, ...]`, so buffers are planned in bytes per token: a step of `t`
//! tokens finds a value at `t * offset_per_token` in an arena of `t * arena_bytes_per_token` bytes. One plan
//! serves every step size.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a kernel computes, independent of which layer's weights it reads and of the target: the op, its
/// attributes (without per-layer ones such as the KV-cache `layer`), operand and result types. Layers with equal
/// specs share one kernel; each target's code generator turns a spec into its own kernels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelSpec {
    pub op: String,
    /// Attributes in the text form, e.g. `{eps=1e-5, act=silu}` (empty when the op has none).
    pub attrs: String,
    /// Operand types in the text form, weights included (`q4_1[576, 576]`).
    pub operands: Vec<String>,
    pub result: String,
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.op, self.operands.join(", "))?;
        if !self.attrs.is_empty() {
            write!(f, " {}", self.attrs)?;
        }
        write!(f, " -> {}", self.result)
    }
}

/// Where a launch reads or writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// A region of the activation arena, in bytes per token.
    Arena {
        offset_per_token: usize,
        bytes_per_token: usize,
    },
    /// A weight, by name.
    Weight(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The graph node this launch computes.
    pub node: usize,
    /// Index into `Schedule::kernels`.
    pub kernel: usize,
    /// The KV-cache layer, for attention kernels.
    pub layer: Option<usize>,
    pub operands: Vec<Slot>,
    pub output: Slot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub kernels: Vec<KernelSpec>,
    /// Graph inputs (`tokens`, `positions`) and where the executor writes them.
    pub inputs: Vec<(String, Slot)>,
    pub launches: Vec<Launch>,
    /// Graph outputs and where they are left.
    pub outputs: Vec<(String, Slot)>,
    pub arena_bytes_per_token: usize,
}

impl Schedule {
    /// Bytes per token of the arena with `apart` left out: the furthest end among the other slots. An executor
    /// that keeps one output (the logits, of which a step wants only its last rows) in a buffer of its own sizes
    /// the arena by this.
    pub fn arena_bytes_per_token_without(&self, apart: &Slot) -> usize {
        let launches = self
            .launches
            .iter()
            .flat_map(|l| l.operands.iter().chain([&l.output]));
        let named = self.inputs.iter().chain(&self.outputs).map(|(_, s)| s);
        launches
            .chain(named)
            .filter(|s| *s != apart)
            .filter_map(|s| match s {
                Slot::Arena {
                    offset_per_token,
                    bytes_per_token,
                } => Some(offset_per_token + bytes_per_token),
                Slot::Weight(_) => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Checks the schedule against its graph: launches follow the graph's nodes in order with matching operand
    /// slots, and no two values that are live at the same time share arena bytes.
    pub fn verify(&self, graph: &crate::Graph) -> Result<(), String> {
        use crate::{Op, Operand};
        let n = graph.len();
        let mut slot: Vec<Option<&Slot>> = vec![None; n];
        let mut inputs = self.inputs.iter();
        let mut launches = self.launches.iter();
        for id in graph.node_ids() {
            let node = graph.node(id);
            if let Op::Input { name } = &node.op {
                let (input_name, s) = inputs
                    .next()
                    .ok_or_else(|| format!("input `{name}` has no slot"))?;
                if input_name != name {
                    return Err(format!(
                        "input slot for `{input_name}` where `{name}` was expected"
                    ));
                }
                slot[id.index()] = Some(s);
                continue;
            }
            let launch = launches
                .next()
                .ok_or_else(|| format!("node %{} has no launch", id.index()))?;
            if launch.node != id.index() || launch.kernel >= self.kernels.len() {
                return Err(format!(
                    "launch for node %{} is out of order or names no kernel",
                    launch.node
                ));
            }
            if launch.operands.len() != node.operands.len() {
                return Err(format!(
                    "launch for node %{} has {} operands, the node {}",
                    launch.node,
                    launch.operands.len(),
                    node.operands.len()
                ));
            }
            for (i, (s, operand)) in launch.operands.iter().zip(&node.operands).enumerate() {
                let expected = match operand {
                    Operand::Value(src) => slot[src.index()].cloned(),
                    Operand::Weight(w) => Some(Slot::Weight(graph.weight(*w).name.clone())),
                };
                if expected.as_ref() != Some(s) {
                    return Err(format!(
                        "launch for node %{}: operand {i} is read from the wrong place",
                        launch.node
                    ));
                }
            }
            slot[id.index()] = Some(&launch.output);
        }
        if inputs.next().is_some() || launches.next().is_some() {
            return Err("more inputs or launches than graph nodes".into());
        }
        // Liveness: a value lives from its node to its last reader (outputs to the end).
        let mut last = (0..n).collect::<Vec<usize>>();
        for id in graph.node_ids() {
            for operand in &graph.node(id).operands {
                if let Operand::Value(src) = operand {
                    last[src.index()] = id.index();
                }
            }
        }
        for (_, id) in graph.outputs() {
            last[id.index()] = usize::MAX;
        }
        let range = |i: usize| match slot[i] {
            Some(Slot::Arena {
                offset_per_token,
                bytes_per_token,
            }) => Ok((*offset_per_token, offset_per_token + bytes_per_token)),
            _ => Err(format!("node %{i} has no arena slot")),
        };
        for (a, &last_a) in last.iter().enumerate() {
            let (a0, a1) = range(a)?;
            if a1 > self.arena_bytes_per_token {
                return Err(format!(
                    "node %{a} lies past the arena ({} bytes per token)",
                    self.arena_bytes_per_token
                ));
            }
            for b in a + 1..n {
                // b is defined after a; they are live together when b is defined before a's last read.
                let (b0, b1) = range(b)?;
                if b <= last_a && a0 < b1 && b0 < a1 {
                    return Err(format!(
                        "nodes %{a} and %{b} are live together but share arena bytes"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(offset_per_token: usize, bytes_per_token: usize) -> Slot {
        Slot::Arena {
            offset_per_token,
            bytes_per_token,
        }
    }

    #[test]
    fn the_arena_without_the_logits_ends_at_the_furthest_other_slot() {
        let logits = arena(64, 4000);
        let schedule = Schedule {
            kernels: Vec::new(),
            inputs: vec![("tokens".into(), arena(0, 4))],
            launches: vec![
                Launch {
                    node: 1,
                    kernel: 0,
                    layer: None,
                    operands: vec![arena(0, 4), Slot::Weight("embed".into())],
                    output: arena(4, 60),
                },
                Launch {
                    node: 2,
                    kernel: 1,
                    layer: None,
                    operands: vec![arena(4, 60)],
                    output: logits.clone(),
                },
            ],
            outputs: vec![("logits".into(), logits.clone())],
            arena_bytes_per_token: 4064,
        };
        assert_eq!(schedule.arena_bytes_per_token_without(&logits), 64);
        assert_eq!(schedule.arena_bytes_per_token_without(&arena(4, 60)), 4064);
    }
}
