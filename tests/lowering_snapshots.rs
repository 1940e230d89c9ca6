//! The lowered IR of each real architecture, and its IR after the compiler's passes, snapshotted (structure
//! only: weights are declarations, no data).
//! Bless changes with `INSTA_UPDATE=always cargo test --release --test lowering_snapshots` (or cargo insta review).

mod common;

use kiln_compiler::{lower, GgufFile};

fn lowered_text(name: &str) -> Option<String> {
    lowered_text_of(common::model(name)?)
}

fn lowered_text_of(path: std::path::PathBuf) -> Option<String> {
    let gguf = GgufFile::open(path).unwrap();
    let lowered = lower(&gguf).unwrap();
    let text = kiln_ir::text::print(&lowered.graph);
    // The text form round-trips and re-verifies.
    let reparsed = kiln_ir::text::parse(&text).unwrap();
    kiln_ir::verify(&reparsed).unwrap();
    assert_eq!(kiln_ir::text::print(&reparsed), text);
    Some(text)
}

#[test]
fn llama_smollm2() {
    let Some(text) = lowered_text("smollm2") else {
        return;
    };
    insta::assert_snapshot!(text);
}

#[test]
fn qwen2_qwen25_coder() {
    let Some(text) = lowered_text("qwen2") else {
        return;
    };
    insta::assert_snapshot!(text);
}

#[test]
fn gemma3_270m() {
    let Some(text) = lowered_text("gemma3") else {
        return;
    };
    insta::assert_snapshot!(text);
}

fn compiled_text(name: &str) -> Option<String> {
    compiled_text_of(common::model(name)?)
}

/// The synthetic BitNet b1.58 model (`common::bitnet`): sub-norms before the attention output and the FFN down
/// projection, a squared-ReLU gate.
#[test]
fn bitnet_synthetic() {
    let Some(text) = common::bitnet::synthetic_bitnet().and_then(lowered_text_of) else {
        return;
    };
    insta::assert_snapshot!(text);
}

#[test]
fn compiled_bitnet_synthetic() {
    let Some(text) = common::bitnet::synthetic_bitnet().and_then(compiled_text_of) else {
        return;
    };
    insta::assert_snapshot!(text);
}

fn compiled_text_of(path: std::path::PathBuf) -> Option<String> {
    let gguf = GgufFile::open(path).unwrap();
    let graph =
        kiln_compiler::passes::run_pipeline(lower(&gguf).unwrap().graph, |_, _, _| {}).unwrap();
    Some(kiln_ir::text::print(&graph))
}

#[test]
fn compiled_llama_smollm2() {
    let Some(text) = compiled_text("smollm2") else {
        return;
    };
    insta::assert_snapshot!(text);
}

#[test]
fn compiled_qwen2_qwen25_coder() {
    let Some(text) = compiled_text("qwen2") else {
        return;
    };
    insta::assert_snapshot!(text);
}

#[test]
fn compiled_gemma3_270m() {
    let Some(text) = compiled_text("gemma3") else {
        return;
    };
    insta::assert_snapshot!(text);
}
