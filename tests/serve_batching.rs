//! Continuous batching in `kiln serve`: requests that run together give exactly what each gives alone, and they
//! do run together.

mod common;

use common::Server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A greedy completion of `prompt` (24 tokens): its text.
fn complete(address: &str, prompt: &str) -> String {
    let (status, body) = post(address, prompt, 24);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

/// `POST /v1/completions` of a greedy completion: (status, body).
fn post(address: &str, prompt: &str, max_tokens: usize) -> (u16, String) {
    let body = serde_json::json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 })
        .to_string();
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The most requests `kiln:num_requests_running` shows while `work` runs, sampled every 10 ms.
fn most_running<T>(metrics_url: &str, work: impl FnOnce() -> T) -> (T, f64) {
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (url, flag) = (metrics_url.to_string(), std::sync::Arc::clone(&running));
    let watcher = std::thread::spawn(move || {
        let mut most = 0.0f64;
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            let text = common::http_get(&url);
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
    let result = work();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    (result, watcher.join().unwrap())
}

/// Runs `prompts` as concurrent greedy completions; their texts in order.
fn concurrently(address: &str, prompts: Vec<&'static str>) -> Vec<String> {
    let threads: Vec<_> = prompts
        .into_iter()
        .map(|prompt| {
            let address = address.to_string();
            std::thread::spawn(move || complete(&address, prompt))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
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
    let burst: Vec<&str> = (0..16).map(|i| prompts[i % prompts.len()]).collect();
    let (together, most_running) = most_running(&s.metrics_url, || concurrently(&s.address, burst));
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

/// With a KV cache of 64 positions, requests of 5 prompt tokens and 24 to generate (32 positions, in pages of 16)
/// run two at a time and the others wait for their pages; a request that could never fit gets 400.
#[test]
fn requests_wait_for_kv_pages_and_one_larger_than_the_cache_is_refused() {
    let Some(plan) = common::smollm2_plan() else {
        return;
    };
    let s = Server::start(
        &[],
        plan.to_str().unwrap(),
        &["--kv-cache-tokens", "64"],
        &[],
    );
    let prompt = "The capital of France is";
    let alone = complete(&s.address, prompt);
    let (texts, most) = most_running(&s.metrics_url, || concurrently(&s.address, vec![prompt; 6]));
    assert!(texts.iter().all(|t| *t == alone), "{texts:?}");
    assert!(
        most <= 2.0,
        "{most} requests ran at once in a cache of 64 positions"
    );
    let (status, body) = post(&s.address, prompt, 100);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("KV-cache positions"), "{body}");
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
