//! Every failure is one clear line on stderr and a non-zero exit; nothing panics.

mod common;

use common::kiln;
use std::path::PathBuf;

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A GGUF with only `general.architecture` set.
fn gguf_with_architecture(arch: &str) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // key/value pairs
    let key = "general.architecture";
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend((arch.len() as u64).to_le_bytes());
    out.extend(arch.as_bytes());
    out
}

fn assert_one_line_error(args: &[&str], want: &str) {
    let out = kiln(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "kiln {args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "kiln {args:?} printed more than one line: {stderr}"
    );
    assert!(
        stderr.starts_with("error: ") && stderr.contains(want),
        "kiln {args:?}:\n  got:  {stderr}  want: {want}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_model() {
    assert_one_line_error(
        &["inspect", "/nonexistent/model.gguf"],
        "cannot read /nonexistent/model.gguf: No such file or directory",
    );
    assert_one_line_error(
        &["run", "/nonexistent/m.gguf", "-p", "hi"],
        "cannot read /nonexistent/m.gguf",
    );
}

#[test]
fn not_a_gguf() {
    let path = temp_file("text.gguf", b"hello, this is not a model");
    assert_one_line_error(
        &["tokenize", path.to_str().unwrap(), "hi"],
        "text.gguf is neither a GGUF model nor a kiln plan (it starts with [104, 101, 108, 108, 111, 44, 32, 116])",
    );
}

#[test]
fn truncated_gguf() {
    let bytes = gguf_with_architecture("llama");
    let path = temp_file("truncated.gguf", &bytes[..bytes.len() - 3]);
    assert_one_line_error(&["inspect", path.to_str().unwrap()], "malformed GGUF at byte 56: general.architecture: count 5 cannot fit in the 2 bytes that remain");
}

#[test]
fn unknown_architecture() {
    let path = temp_file("mamba.gguf", &gguf_with_architecture("mamba"));
    assert_one_line_error(
        &["run", path.to_str().unwrap(), "-p", "hi"],
        "unsupported architecture `mamba` (kiln knows: llama, qwen2, gemma3, bitnet)",
    );
}

#[test]
fn missing_hyperparameter() {
    let path = temp_file("bare-llama.gguf", &gguf_with_architecture("llama"));
    assert_one_line_error(
        &["inspect", "--ir", path.to_str().unwrap()],
        "metadata `llama.block_count`: missing",
    );
}

#[test]
fn bad_flags() {
    let Some(model) = common::model("smollm2") else {
        return;
    };
    let model = model.to_str().unwrap();
    assert_one_line_error(
        &["run", model, "-p", "hi", "--top-p", "1.5"],
        "--top-p must be in [0, 1], is 1.5",
    );
    assert_one_line_error(
        &[
            "perplexity",
            model,
            "--file",
            "/nonexistent.txt",
            "--ctx",
            "128",
        ],
        "cannot read /nonexistent.txt",
    );
    assert_one_line_error(
        &[
            "perplexity",
            model,
            "--file",
            "/etc/hostname",
            "--ctx",
            "100000",
        ],
        "fewer than one chunk of --ctx 100000",
    );
    assert_one_line_error(
        &["run", model, "-p", "hi", "--ctx", "2", "-n", "8"],
        "context full",
    );
}
