//! Bad requests get the right 4xx in OpenAI's error shape, and the server keeps serving: malformed JSON, wrong
//! types, bad limits, unknown model or route, a 10 MB body, a client that disconnects mid-stream, a full queue,
//! API keys; and JSON logs carry the request id.

mod common;

use common::{model, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One HTTP/1.1 request to the server at `address`; returns (status, head, body).
fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
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

fn post_json(s: &Server, path: &str, body: &str) -> (u16, String, String) {
    request(
        &s.address,
        "POST",
        path,
        &["Content-Type: application/json"],
        body.as_bytes(),
    )
}

fn plan() -> Option<String> {
    common::smollm2_plan().map(|p| p.to_str().unwrap().to_string())
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
    let s = Server::start(&[], &plan, &[], &[]);
    let ok = |s: &Server| {
        let (status, _, body) = post_json(
            s,
            "/v1/completions",
            r#"{"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}"#,
        );
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(" Paris"), "{body}");
    };
    ok(&s);
    // Each bad request, and the status and error code it must get.
    let cases: [(&str, &str, u16, &str); 17] = [
        ("/v1/completions", r#"{"prompt": "#, 400, "invalid_json"),
        ("/v1/completions", r#"{"prompt": 5}"#, 400, "invalid_json"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": -1}"#,
            400,
            "invalid_json",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 100000000}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": 9}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 17}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 0}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"model": "gpt-5", "prompt": "x"}"#,
            404,
            "model_not_found",
        ),
        ("/v2/everything", "{}", 404, "not_found"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": null}]}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": [49152], "max_tokens": 1}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logit_bias": {"-1": 5}}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "echo": true, "logprobs": 1}"#,
            400,
            "invalid_value",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 2, "best_of": 4}"#,
            400,
            "invalid_value",
        ),
    ];
    for (path, body, status, code) in cases {
        assert_error(post_json(&s, path, body), status, code);
    }
    assert_error(
        request(
            &s.address,
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
        post_json(&s, "/v1/completions", &huge),
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
        &[],
        &plan,
        &["--max-waiting", "1", "--max-running", "1"],
        &[("KILN_API_KEYS", "sekrit, other")],
    );
    assert_eq!(
        request(&s.address, "GET", "/health", &[], b"").0,
        200,
        "probes need no key"
    );
    assert_error(
        request(&s.address, "GET", "/v1/models", &[], b""),
        401,
        "invalid_api_key",
    );
    assert_error(
        request(
            &s.address,
            "GET",
            "/v1/models",
            &["Authorization: Bearer wrong"],
            b"",
        ),
        401,
        "invalid_api_key",
    );
    assert_eq!(
        request(
            &s.address,
            "GET",
            "/v1/models",
            &["Authorization: Bearer other"],
            b""
        )
        .0,
        200
    );

    // One request runs (one at a time: --max-running 1), one waits, the third is turned away with Retry-After. The
    // first runs for seconds (a count that goes on without an end-of-text token), so the second still waits when
    // the third comes.
    let auth = [
        "Content-Type: application/json",
        "Authorization: Bearer sekrit",
    ];
    let long = br#"{"prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0}"#;
    let server = std::sync::Arc::new(s);
    let spawn = |delay: u64| {
        let server = std::sync::Arc::clone(&server);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            request(&server.address, "POST", "/v1/completions", &auth, long)
        })
    };
    let (a, b, c) = (spawn(0), spawn(300), spawn(600));
    let (a, b, c) = (a.join().unwrap(), b.join().unwrap(), c.join().unwrap());
    assert_eq!((a.0, b.0), (200, 200), "{}\n{}", a.2, b.2);
    assert!(c.1.to_lowercase().contains("retry-after: 1"), "{}", c.1);
    assert_error(c, 429, "rate_limit_exceeded");
}

#[test]
fn json_logs_name_the_request_on_every_request_line() {
    let Some(plan) = plan() else { return };
    let s = Server::start(&["--log-format", "json"], &plan, &[], &[]);
    let (status, _, body) = post_json(
        &s,
        "/v1/completions",
        r#"{"prompt": "Hi", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    let log = s.log.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let about: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("request "))
        })
        .collect();
    assert_eq!(about.len(), 2, "{log:?}");
    assert!(
        about.iter().all(|l| l["request_id"] == id.as_str()),
        "{log:?}"
    );
}

#[test]
fn several_models_are_routed_by_name_and_alias() {
    let (Some(plan), Some(gemma)) = (plan(), model("gemma3")) else {
        return;
    };
    let gemma = format!("gemma={}", gemma.display());
    let s = Server::start(
        &[],
        &plan,
        &[
            "--model",
            &gemma,
            "--alias",
            "default=m",
            "--alias",
            "small=gemma",
        ],
        &[],
    );
    let (status, _, body) = request(&s.address, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m", "gemma", "default", "small"]);
    assert_eq!(listed["data"][3]["parent"], "gemma");
    let complete = |model: &str| {
        let body = format!(
            r#"{{"model": "{model}", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}}"#
        );
        let (status, _, body) = post_json(&s, "/v1/completions", &body);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // SmolLM2 and Gemma 3 continue differently; an alias reaches the model it names.
    assert_eq!(complete("m"), " Paris.\n");
    assert_eq!(complete("default"), " Paris.\n");
    assert_eq!(complete("gemma"), " the capital of");
    assert_eq!(complete("small"), " the capital of");
    assert_error(
        post_json(&s, "/v1/completions", r#"{"prompt": "x"}"#),
        400,
        "invalid_value",
    );
    assert_error(
        post_json(&s, "/v1/completions", r#"{"model": "big", "prompt": "x"}"#),
        404,
        "model_not_found",
    );
}

/// Starts `kiln serve` without waiting for it; returns the child and its stderr lines as they come.
fn spawn_serve(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .args(args)
        .args(["--port", "0", "--metrics-port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// A request with a JSON body (or none): (status, body).
fn http(address: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = request(
        address,
        method,
        path,
        &["Content-Type: application/json"],
        body.as_bytes(),
    );
    (status, body)
}

#[test]
fn health_is_503_while_the_models_load_and_a_failed_load_stops_the_server() {
    // Qwen2.5's plan (half a gigabyte, checksummed at load) takes long enough to load to be caught loading.
    let Some(gguf) = model("qwen2") else {
        return;
    };
    let plan = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen-serve.plan");
    common::kiln_ok(&[
        "compile",
        gguf.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    let (mut child, lines) = spawn_serve(&[plan.to_str().unwrap()]);
    let wait = |what: &str| loop {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("kiln serve never said {what:?}"));
        if line.contains(what) {
            break line;
        }
    };
    let line = wait("listening on");
    let address = line.split("http://").nth(1).unwrap().trim().to_string();
    let (status, body) = http(&address, "GET", "/health", "");
    assert_eq!((status, body.as_str()), (503, r#"{"status":"loading"}"#));
    let (status, body) = http(&address, "POST", "/v1/completions", r#"{"prompt": "hi"}"#);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("model_loading"), "{body}");
    wait("ready");
    for path in ["/health", "/ready"] {
        assert_eq!(
            http(&address, "GET", path, ""),
            (200, r#"{"status":"ok"}"#.to_string())
        );
    }
    let _ = child.kill();

    // A plan that cannot load ends the server with that error, after it started listening.
    let missing = std::env::temp_dir().join("kiln-no-such.plan");
    let (mut child, lines) = spawn_serve(&[missing.to_str().unwrap()]);
    let status = child.wait().unwrap();
    let stderr: Vec<String> = lines.iter().collect();
    assert!(!status.success());
    let last = stderr.last().unwrap();
    assert!(
        last.starts_with("error: ") && last.contains("kiln-no-such.plan"),
        "{stderr:?}"
    );
}

#[test]
fn a_request_past_its_timeout_stops_with_finish_reason_length() {
    let Some(plan) = plan() else { return };
    let s = Server::start(&[], &plan, &["--request-timeout", "0.3"], &[]);
    let (status, _, body) = post_json(
        &s,
        "/v1/completions",
        r#"{"prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..3000).contains(&tokens), "{tokens} tokens");
    // The server's log lines arrive through a pipe, after the response: wait for the warning.
    let logged = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        s.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("request timed out"))
    });
    assert!(logged, "{:?}", s.log.lock().unwrap());
    drop(s);
    // A negative timeout is refused at start-up, in one line.
    let out = common::kiln(&["serve", &plan, "--request-timeout=-1", "--port", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--request-timeout takes seconds"),
        "{stderr}"
    );
}

/// Waits (up to 30 s) for a server log line containing `text`.
fn wait_for_log(s: &Server, text: &str) {
    let logged = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        s.log.lock().unwrap().iter().any(|l| l.contains(text))
    });
    assert!(
        logged,
        "no log line with {text:?}: {:?}",
        s.log.lock().unwrap()
    );
}

#[test]
fn sighup_reloads_the_plans_and_a_failed_reload_keeps_the_old_ones() {
    let (Some(first), Some((_, ternary))) = (plan(), common::quantized_smollm2("tq2_0")) else {
        return;
    };
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let second = common::compile(&ternary, Some(&dir.join("reload-second.plan")));
    // The server serves whatever lies at this path; it is replaced by renaming, as a deployment would.
    let served = dir.join("reload-served.plan");
    let replace = |from: &std::path::Path| {
        let staged = dir.join("reload-staged.plan");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, &served).unwrap();
    };
    replace(std::path::Path::new(&first));
    let s = Server::start(&[], served.to_str().unwrap(), &[], &[]);
    let greedy = |max_tokens: usize| {
        let (status, _, body) = post_json(
            &s,
            "/v1/completions",
            &format!(
                r#"{{"prompt": "The capital of France is", "max_tokens": {max_tokens}, "temperature": 0}}"#
            ),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
        (
            v["choices"][0]["text"].as_str().unwrap().to_string(),
            tokens,
        )
    };
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &s.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let (before, _) = greedy(8);

    // A request in flight across the reload finishes on the model it started with.
    let address = s.address.clone();
    let in_flight = std::thread::spawn(move || {
        request(
            &address,
            "POST",
            "/v1/completions",
            &["Content-Type: application/json"],
            br#"{"prompt": "1, 2, 3, 4,", "max_tokens": 200, "temperature": 0, "stop": ["never"]}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    replace(&second);
    hangup();
    wait_for_log(&s, "reloaded");
    let (after, _) = greedy(8);
    assert_ne!(after, before, "the reloaded plan answers differently");
    let (status, _, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 200, "{body}");

    // A plan that cannot load changes nothing: the error is logged and the loaded model keeps answering.
    std::fs::write(dir.join("reload-staged.plan"), b"not a plan").unwrap();
    std::fs::rename(dir.join("reload-staged.plan"), &served).unwrap();
    hangup();
    wait_for_log(&s, "reload failed");
    assert_eq!(greedy(8).0, after);
}
