//! `kiln serve` against the official `openai` Python client (`tests/openai_client.py`), then a graceful stop.

mod common;

use common::{kiln_ok, model};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The server process, killed if the test fails before stopping it.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[test]
fn openai_client_gets_what_kiln_run_gets() {
    let Some(gguf) = model("smollm2") else { return };
    let plan = std::env::temp_dir().join(format!("kiln-test-{}-serve.plan", std::process::id()));
    kiln_ok(&[
        "compile",
        gguf.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    let run = kiln_ok(&[
        "run",
        plan.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "16",
        "--temp",
        "0",
        "--json",
    ]);
    let expected: serde_json::Value = serde_json::from_str(&run).unwrap();

    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "serve",
                plan.to_str().unwrap(),
                "--port",
                "0",
                "--model-name",
                "smollm2",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(server.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("kiln serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_string();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let client = Command::new("python3")
        .args([
            script,
            &format!("{address}/v1"),
            "smollm2",
            expected["text"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    if report.contains("No module named 'openai'") && std::env::var_os("CI").is_none() {
        eprintln!("\n!!!!!!!! SKIPPED: the `openai` Python package is missing (pip install openai) !!!!!!!!\n");
    } else {
        assert!(client.status.success(), "openai client: {report}");
        eprintln!("{report}");
    }

    // SIGTERM: the server drains and exits cleanly.
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    let status = server.0.wait().unwrap();
    assert!(status.success(), "kiln serve exited with {status}");
    std::fs::remove_file(plan).unwrap();
}
