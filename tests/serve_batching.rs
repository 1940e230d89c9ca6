//! Continuous batching in `kiln serve`: requests that run together give exactly what each gives alone, and they
//! do run together.

mod common;

use common::Server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A greedy completion of `prompt` (24 tokens): its text.
fn complete(address: &str, prompt: &str) -> String {
    let body =
        serde_json::json!({ "prompt": prompt, "max_tokens": 24, "temperature": 0 }).to_string();
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let json = response.split_once("\r\n\r\n").expect("a response").1;
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {response}"));
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{response}"))
        .to_string()
}

#[test]
fn sixteen_concurrent_greedy_requests_answer_as_each_does_alone() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let s = Server::start(&[], plan.to_str().unwrap(), &["--max-running", "16"], &[]);
    // Four prompts of different lengths, each four times among the sixteen.
    let prompts = [
        "The capital of France is",
        "1, 2, 3, 4,",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
    ];
    let alone: Vec<String> = prompts.iter().map(|p| complete(&s.address, p)).collect();

    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let metrics_url = s.metrics_url.clone();
    let flag = std::sync::Arc::clone(&running);
    // While the burst runs, watch how many requests the engine holds at once.
    let watcher = std::thread::spawn(move || {
        let mut most = 0.0f64;
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            let text = common::http_get(&metrics_url);
            if let Some(v) = text
                .lines()
                .find(|l| l.starts_with("kiln:num_requests_running"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            {
                most = most.max(v);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        most
    });
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let address = s.address.clone();
            let prompt = prompts[i % prompts.len()];
            std::thread::spawn(move || complete(&address, prompt))
        })
        .collect();
    let together: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let most_running = watcher.join().unwrap();
    for (i, text) in together.iter().enumerate() {
        assert_eq!(
            text,
            &alone[i % prompts.len()],
            "request {i} ({:?})",
            prompts[i % prompts.len()]
        );
    }
    assert!(
        most_running > 1.0,
        "the requests never ran together (at most {most_running} at once)"
    );
    eprintln!("at most {most_running} requests ran at once");
}

/// `scripts/load_test.py` at 32 concurrent clients for a few seconds: every streamed request completes. (The
/// throughput table it prints is a measurement, reported in the README, not asserted here.)
#[test]
fn the_load_test_sees_no_errors_at_32_clients() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let s = Server::start(&[], plan.to_str().unwrap(), &[], &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/load_test.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            &format!("http://{}", s.address),
            "--clients",
            "32",
            "--seconds",
            "4",
            "--max-tokens",
            "8",
            "--json",
        ])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let level: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(level["errors"], 0, "{level}");
    assert!(level["requests"].as_u64().unwrap() >= 32, "{level}");
    eprintln!("{level}");
}
