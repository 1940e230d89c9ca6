//! `kiln serve` against the official `openai` Python client (`tests/openai_client.py`), then a graceful stop.

mod common;

use common::Server;
use std::process::Command;

#[test]
fn openai_client_gets_what_kiln_run_gets() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let run = common::greedy_json(&plan, 16, &[]);
    let expected: serde_json::Value = serde_json::from_str(&run).unwrap();

    let mut server = Server::start(&[], plan.to_str().unwrap(), &[], &[]);
    let (address, metrics_url) = (
        format!("http://{}", server.address),
        server.metrics_url.clone(),
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let client = Command::new("python3")
        .args([
            script,
            &format!("{address}/v1"),
            "m",
            expected["text"].as_str().unwrap(),
            common::llama_cpp_chat()["agreed_prefix"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );
    if report.contains("No module named 'openai'") && std::env::var_os("CI").is_none() {
        // The metrics count the client's requests, so they are skipped with it.
        eprintln!("\n!!!!!!!! SKIPPED: the `openai` Python package is missing (pip install openai) !!!!!!!!\n");
        return;
    }
    assert!(client.status.success(), "openai client: {report}");
    eprintln!("{report}");

    check_metrics(&metrics_url);

    // SIGTERM: the server drains and exits cleanly.
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "kiln serve exited with {status}");
}

/// The metrics reflect the requests just made, and promtool finds nothing wrong but the `kiln:` prefix.
fn check_metrics(url: &str) {
    let text = common::http_get(url);
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(
        value("kiln:request_success_total{finished_reason=\"length\"}") >= 2.0,
        "{text}"
    );
    assert!(
        value("kiln:request_success_total{finished_reason=\"stop\"}") >= 1.0,
        "{text}"
    );
    assert!(value("kiln:generation_tokens_total") >= 32.0, "{text}");
    assert!(value("kiln:prompt_tokens_total") >= 10.0, "{text}");
    assert!(
        // Nineteen requests of one choice and three of 3, 4 and 2 generate, each choice a generation of its own
        // (the seven refused requests never reach the engine).
        value("kiln:time_to_first_token_seconds_count") == 28.0,
        "{text}"
    );
    assert_eq!(value("kiln:num_requests_running"), 0.0);
    let plan_info = format!(
        r#"kiln:plan_info{{format_version="{}",model="m",target="cpu ("#,
        kiln_ir::plan::FORMAT_VERSION
    );
    assert!(text.contains(&plan_info), "{text}");
    let Some(out) = common::pipe_through(
        "promtool",
        &["check", "metrics"],
        &text,
        "apt-get install prometheus",
    ) else {
        return;
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // vLLM-style `prefix:name` metrics always draw this lint (vLLM's own `vllm:` names do too); anything else fails.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.ends_with("metric names should not contain ':'"))
        .collect();
    assert!(problems.is_empty(), "promtool: {report}");
}
