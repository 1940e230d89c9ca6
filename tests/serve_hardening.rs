//! Bad requests get the right 4xx in OpenAI's error shape, and the server keeps serving: malformed JSON, wrong
//! types, bad limits, unknown model or route, a 10 MB body, a client that disconnects mid-stream, a full queue,
//! and API keys.

mod common;

use common::{kiln_ok, model};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(plan: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "serve",
                plan,
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--model-name",
                "m",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut address = String::new();
        while !address.starts_with("kiln serve: listening on http://") {
            address.clear();
            assert!(
                stderr.read_line(&mut address).unwrap() > 0,
                "kiln serve exited before listening"
            );
        }
        let address = address
            .trim()
            .trim_start_matches("kiln serve: listening on http://")
            .to_string();
        std::thread::spawn(move || for _ in stderr.lines() {}); // keep draining
        Server { child, address }
    }

    /// One HTTP/1.1 request; returns (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &[u8],
    ) -> (u16, String, String) {
        let mut stream = TcpStream::connect(&self.address).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.address,
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let _ = stream.write_all(body); // a server may answer (413) before reading a huge body
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }

    fn post_json(&self, path: &str, body: &str) -> (u16, String, String) {
        self.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.as_bytes(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn plan() -> Option<String> {
    let gguf = model("smollm2")?;
    let plan =
        std::env::temp_dir().join(format!("kiln-test-{}-hardening.plan", std::process::id()));
    if !plan.exists() {
        kiln_ok(&[
            "compile",
            gguf.to_str().unwrap(),
            "-o",
            plan.to_str().unwrap(),
        ]);
    }
    Some(plan.to_str().unwrap().to_string())
}

/// The body is OpenAI's error shape with this code.
fn assert_error(response: (u16, String, String), status: u16, code: &str) {
    let (got, head, body) = response;
    assert_eq!(got, status, "{head}\n{body}");
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(json["error"]["code"], code, "{body}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some(plan) = plan() else { return };
    let s = Server::start(&plan, &[], &[]);
    let ok = |s: &Server| {
        let (status, _, body) = s.post_json(
            "/v1/completions",
            r#"{"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}"#,
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(" Paris"), "{body}");
    };
    ok(&s);
    assert_error(
        s.post_json("/v1/completions", r#"{"prompt": "#),
        400,
        "invalid_json",
    );
    assert_error(
        s.post_json("/v1/completions", r#"{"prompt": 5}"#),
        400,
        "invalid_json",
    );
    assert_error(
        s.post_json("/v1/completions", r#"{"prompt": "x", "max_tokens": -1}"#),
        400,
        "invalid_json",
    );
    assert_error(
        s.post_json(
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 100000000}"#,
        ),
        400,
        "invalid_value",
    );
    assert_error(
        s.post_json("/v1/completions", r#"{"prompt": "x", "temperature": 9}"#),
        400,
        "invalid_value",
    );
    assert_error(
        s.post_json("/v1/completions", r#"{"prompt": "x", "n": 3}"#),
        400,
        "invalid_value",
    );
    assert_error(
        s.post_json("/v1/chat/completions", r#"{"messages": []}"#),
        400,
        "invalid_value",
    );
    assert_error(
        s.post_json("/v1/completions", r#"{"model": "gpt-5", "prompt": "x"}"#),
        404,
        "model_not_found",
    );
    assert_error(s.post_json("/v2/everything", "{}"), 404, "not_found");
    assert_error(
        s.request(
            "POST",
            "/v1/completions",
            &["Content-Type: text/plain"],
            b"hello",
        ),
        415,
        "invalid_json",
    );
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(10 << 20));
    assert_error(
        s.post_json("/v1/completions", &huge),
        413,
        "request_too_large",
    );
    ok(&s);

    // A client that disconnects mid-stream: its generation stops and the next request is served at once.
    let mut stream = TcpStream::connect(&s.address).unwrap();
    let body =
        r#"{"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": true}"#;
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 256];
    let n = stream.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    drop(stream);
    let started = std::time::Instant::now();
    ok(&s);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the abandoned generation was not cancelled"
    );
}

#[test]
fn api_keys_and_a_full_queue() {
    let Some(plan) = plan() else { return };
    let s = Server::start(
        &plan,
        &["--max-waiting", "1"],
        &[("KILN_API_KEYS", "sekrit, other")],
    );
    assert_eq!(
        s.request("GET", "/health", &[], b"").0,
        200,
        "probes need no key"
    );
    assert_error(
        s.request("GET", "/v1/models", &[], b""),
        401,
        "invalid_api_key",
    );
    assert_error(
        s.request("GET", "/v1/models", &["Authorization: Bearer wrong"], b""),
        401,
        "invalid_api_key",
    );
    assert_eq!(
        s.request("GET", "/v1/models", &["Authorization: Bearer other"], b"")
            .0,
        200
    );

    // One request runs, one waits, the third is turned away with Retry-After.
    let auth = [
        "Content-Type: application/json",
        "Authorization: Bearer sekrit",
    ];
    let long = br#"{"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0}"#;
    let server = std::sync::Arc::new(s);
    let spawn = |delay: u64| {
        let server = std::sync::Arc::clone(&server);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            server.request("POST", "/v1/completions", &auth, long)
        })
    };
    let (a, b, c) = (spawn(0), spawn(300), spawn(600));
    let (a, b, c) = (a.join().unwrap(), b.join().unwrap(), c.join().unwrap());
    assert_eq!((a.0, b.0), (200, 200), "{}\n{}", a.2, b.2);
    assert!(c.1.to_lowercase().contains("retry-after: 1"), "{}", c.1);
    assert_error(c, 429, "rate_limit_exceeded");
}
