//! Qwen2.5 and Gemma 3 give coherent greedy answers; SmolLM2 chats through its ChatML template.

mod common;

use common::{kiln, kiln_ok, model};
use std::io::Write;
use std::process::{Command, Stdio};

fn greedy(path: &std::path::Path, prompt: &str, n: usize) -> String {
    kiln_ok(&[
        "run",
        path.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        &n.to_string(),
        "--temp",
        "0",
    ])
}

#[test]
fn qwen2_writes_a_factorial_function() {
    let Some(path) = model("qwen2") else { return };
    let prompt = "<|im_start|>user\nWrite a Python function that returns the factorial of n.<|im_end|>\n<|im_start|>assistant\n";
    let out = greedy(&path, prompt, 48);
    eprintln!("qwen2: {out}");
    assert!(out.contains("def factorial(n)"), "{out}");
}

#[test]
fn qwen2_knows_a_capital() {
    let Some(path) = model("qwen2") else { return };
    let prompt = "<|im_start|>user\nWhat is the capital of Japan? Answer in one word.<|im_end|>\n<|im_start|>assistant\n";
    let out = greedy(&path, prompt, 8);
    eprintln!("qwen2: {out}");
    assert!(out.contains("Tokyo"), "{out}");
}

#[test]
fn gemma3_answers_plain_questions() {
    let Some(path) = model("gemma3") else { return };
    let out = greedy(
        &path,
        "Question: What is the boiling point of water in Celsius?\nAnswer:",
        6,
    );
    eprintln!("gemma3: {out}");
    assert!(out.contains("100"), "{out}");
    let out = greedy(&path, "The capital of France is", 6);
    eprintln!("gemma3: {out}");
    assert!(out.contains("capital") || out.contains("Paris"), "{out}");
}

#[test]
fn gemma3_chat_without_template_is_a_clear_error() {
    let Some(path) = model("gemma3") else { return };
    let out = kiln(&["chat", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: this model has no chat template (tokenizer.chat_template); pass one with --chat-template FILE"), "{stderr}");
}

#[test]
fn smollm2_chats_with_its_template() {
    let Some(path) = model("smollm2") else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["chat", path.to_str().unwrap(), "--temp", "0", "-n", "24"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Germany?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("smollm2 chat: {text}");
    assert!(text.contains("Paris"), "{text}");
    assert!(text.contains("Berlin"), "{text}");
}
