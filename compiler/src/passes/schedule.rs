//! After the graph passes: specialize (a `KernelSpec` per node, deduplicated), plan memory (liveness, first-fit
//! offsets in one arena, reused across layers) and schedule (a flat launch list in program order).

use super::layout::Layouts;
use kiln_ir::schedule::{KernelSpec, Launch, Schedule, Slot};
use kiln_ir::text::print_attrs;
use kiln_ir::{DType, Dim, Graph, NodeId, Op, Operand};
use std::collections::HashMap;

/// Buffers are rounded to this many bytes per token, so every buffer of a step starts 16-byte aligned
/// (Cranelift's vector width) whatever the token count.
const SLOT_ALIGN: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot plan memory for node %{node}: {reason}")]
pub struct ScheduleError {
    pub node: usize,
    pub reason: String,
}

/// The spec of the kernel that computes `id`: the op without per-layer attributes, and operand types.
pub fn specialize(graph: &Graph, id: NodeId, layouts: &Layouts) -> KernelSpec {
    let node = graph.node(id);
    let operand = |o: &Operand| {
        let ty = graph.operand_type(*o).to_string();
        match o {
            Operand::Weight(w) => match layouts.get(&graph.weight(*w).name) {
                Some(layout) => format!("{ty} {layout}"),
                None => ty,
            },
            Operand::Value(_) => ty,
        }
    };
    KernelSpec {
        op: node.op.name().to_string(),
        attrs: print_attrs(&node.op, &["layer"]),
        operands: node.operands.iter().map(operand).collect(),
        result: node.ty.to_string(),
    }
}

/// Bytes per token of a value `[tokens, ...]`, rounded up to `SLOT_ALIGN`.
fn bytes_per_token(graph: &Graph, id: NodeId) -> Result<usize, ScheduleError> {
    let ty = &graph.node(id).ty;
    let fail = |reason: String| ScheduleError {
        node: id.index(),
        reason,
    };
    if ty.shape.first() != Some(&Dim::tokens()) {
        return Err(fail(format!("{ty} does not start with the `tokens` dim")));
    }
    let mut elems = 1usize;
    for d in &ty.shape[1..] {
        elems *= d
            .clone()
            .fixed()
            .ok_or_else(|| fail(format!("{ty} has a second symbolic dim")))?;
    }
    let elem_bytes = match ty.dtype {
        DType::F32 | DType::I32 => 4,
        other => {
            return Err(fail(format!(
                "activations of type {other} are not supported"
            )))
        }
    };
    Ok((elems * elem_bytes).div_ceil(SLOT_ALIGN) * SLOT_ALIGN)
}

/// First-fit allocation over an arena that grows as needed.
#[derive(Default)]
struct Arena {
    /// Free ranges (start, end), sorted and merged.
    free: Vec<(usize, usize)>,
    end: usize,
}

impl Arena {
    fn alloc(&mut self, size: usize) -> usize {
        if let Some(i) = self.free.iter().position(|(s, e)| e - s >= size) {
            let start = self.free[i].0;
            self.free[i].0 += size;
            if self.free[i].0 == self.free[i].1 {
                self.free.remove(i);
            }
            return start;
        }
        // Extend the last free range if it touches the end, else grow.
        if let Some(last) = self.free.last().copied().filter(|(_, e)| *e == self.end) {
            self.free.pop();
            self.end = last.0 + size;
            return last.0;
        }
        self.end += size;
        self.end - size
    }

    fn release(&mut self, start: usize, size: usize) {
        let at = self.free.partition_point(|(s, _)| *s < start);
        self.free.insert(at, (start, start + size));
        // Merge with the neighbours.
        if at + 1 < self.free.len() && self.free[at].1 == self.free[at + 1].0 {
            self.free[at].1 = self.free.remove(at + 1).1;
        }
        if at > 0 && self.free[at - 1].1 == self.free[at].0 {
            self.free[at - 1].1 = self.free.remove(at).1;
        }
    }
}

/// Specializes, plans memory and schedules `graph` (in program order).
pub fn schedule(graph: &Graph, layouts: &Layouts) -> Result<Schedule, ScheduleError> {
    let mut last_use: Vec<usize> = graph.node_ids().map(|id| id.index()).collect();
    for id in graph.node_ids() {
        for operand in &graph.node(id).operands {
            if let Operand::Value(src) = operand {
                last_use[src.index()] = id.index();
            }
        }
    }
    for (_, id) in graph.outputs() {
        last_use[id.index()] = usize::MAX;
    }
    let mut arena = Arena::default();
    let mut slots: Vec<Option<(usize, usize)>> = vec![None; graph.len()];
    let mut kernels: Vec<KernelSpec> = Vec::new();
    let mut kernel_ids: HashMap<KernelSpec, usize> = HashMap::new();
    let (mut inputs, mut launches) = (Vec::new(), Vec::new());
    let slot_of = |slots: &[Option<(usize, usize)>], id: NodeId| {
        let (offset_per_token, bytes_per_token) =
            slots[id.index()].expect("operands are placed before their users");
        Slot::Arena {
            offset_per_token,
            bytes_per_token,
        }
    };
    for id in graph.node_ids() {
        let node = graph.node(id);
        let size = bytes_per_token(graph, id)?;
        // The output is placed before the operands are released: a kernel never writes over its own inputs.
        slots[id.index()] = Some((arena.alloc(size), size));
        let output = slot_of(&slots, id);
        if let Op::Input { name } = &node.op {
            inputs.push((name.clone(), output));
        } else {
            let spec = specialize(graph, id, layouts);
            let kernel = *kernel_ids.entry(spec.clone()).or_insert_with(|| {
                kernels.push(spec);
                kernels.len() - 1
            });
            let layer = match node.op {
                Op::Attention { layer, .. } | Op::AttentionQkv { layer, .. } => Some(layer),
                _ => None,
            };
            let operands = node
                .operands
                .iter()
                .map(|o| match o {
                    Operand::Value(src) => slot_of(&slots, *src),
                    Operand::Weight(w) => Slot::Weight(graph.weight(*w).name.clone()),
                })
                .collect();
            launches.push(Launch {
                node: id.index(),
                kernel,
                layer,
                operands,
                output,
            });
        }
        let mut released: Vec<usize> = Vec::new();
        for operand in &node.operands {
            if let Operand::Value(src) = operand {
                if last_use[src.index()] == id.index() && !released.contains(&src.index()) {
                    released.push(src.index());
                    let (start, size) = slots[src.index()].expect("placed");
                    arena.release(start, size);
                }
            }
        }
        if last_use[id.index()] == id.index() {
            arena.release(slots[id.index()].expect("placed").0, size); // a value nothing reads
        }
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), slot_of(&slots, *id)))
        .collect();
    Ok(Schedule {
        kernels,
        inputs,
        launches,
        outputs,
        arena_bytes_per_token: arena.end,
    })
}
