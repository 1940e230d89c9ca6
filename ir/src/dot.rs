//! Graphviz rendering of a graph: one box per node labelled with its text-form line, edges for data flow.

use crate::graph::{Graph, Operand};
use crate::text::print_node;
use std::fmt::Write;

pub fn print(graph: &Graph) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  node [shape=box, fontname=monospace, fontsize=10];\n",
        graph.name
    );
    for id in graph.node_ids() {
        let label = print_node(graph, id)
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        writeln!(out, "  n{} [label=\"{label}\"];", id.index()).unwrap();
        for operand in &graph.node(id).operands {
            if let Operand::Value(src) = operand {
                writeln!(out, "  n{} -> n{};", src.index(), id.index()).unwrap();
            }
        }
    }
    for (name, id) in graph.outputs() {
        writeln!(
            out,
            "  \"out_{name}\" [label=\"{name}\", shape=ellipse];\n  n{} -> \"out_{name}\";",
            id.index()
        )
        .unwrap();
    }
    out.push_str("}\n");
    out
}
