//! The memory plan and schedule: every filetest graph (unfused and fused) schedules into a plan that the
//! independent checker `Schedule::verify` accepts, buffers are reused, and a plan that overlaps two live
//! buffers is caught.

use kiln_compiler::passes::{run_pass, schedule};
use kiln_ir::schedule::Slot;
use std::path::Path;

fn graphs() -> Vec<(String, kiln_ir::Graph)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "kir") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let graph = kiln_ir::text::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let fused = run_pass("fuse", graph.clone()).unwrap().unwrap();
            out.push((format!("{name} (unfused)"), graph));
            out.push((format!("{name} (fused)"), fused));
        }
    }
    out
}

#[test]
fn schedules_pass_the_checker_and_reuse_memory() {
    for (name, graph) in graphs() {
        let s = schedule(&graph, &Default::default()).unwrap();
        s.verify(&graph).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs = graph
            .node_ids()
            .filter(|id| matches!(graph.node(*id).op, kiln_ir::Op::Input { .. }))
            .count();
        assert_eq!(s.launches.len() + inputs, graph.len(), "{name}");
        let total: usize = s
            .launches
            .iter()
            .map(|l| match l.output {
                Slot::Arena {
                    bytes_per_token, ..
                } => bytes_per_token,
                Slot::Weight(_) => unreachable!(),
            })
            .sum();
        assert!(
            s.arena_bytes_per_token < total,
            "{name}: no buffer was reused ({} of {total})",
            s.arena_bytes_per_token
        );
    }
}

#[test]
fn equal_layers_share_kernels() {
    let (_, graph) = graphs()
        .into_iter()
        .find(|(n, _)| n == "fuse-llama (fused)")
        .unwrap();
    let s = schedule(&graph, &Default::default()).unwrap();
    // embed, qkv_rope, attention_qkv, two matmul_residual shapes, gated_ffn, norm_matmul.
    assert_eq!(s.kernels.len(), 7, "{:#?}", s.kernels);
    assert!(
        s.kernels.iter().all(|k| !k.attrs.contains("layer=")),
        "per-layer attributes leaked into a spec"
    );
}

#[test]
fn checker_catches_overlapping_live_buffers() {
    let (_, graph) = graphs()
        .into_iter()
        .find(|(n, _)| n == "fuse-llama (fused)")
        .unwrap();
    let mut s = schedule(&graph, &Default::default()).unwrap();
    // Put the gated FFN's output where the residual stream it is added back to still lives.
    let ffn = s
        .launches
        .iter()
        .position(|l| s.kernels[l.kernel].op == "gated_ffn")
        .unwrap();
    let residual = s.launches[ffn].operands[0].clone();
    let Slot::Arena {
        offset_per_token, ..
    } = residual
    else {
        unreachable!()
    };
    if let Slot::Arena {
        offset_per_token: o,
        ..
    } = &mut s.launches[ffn].output
    {
        *o = offset_per_token;
    }
    let err = s.verify(&graph).unwrap_err();
    assert!(
        err.contains("read from the wrong place") || err.contains("live together"),
        "{err}"
    );
}
