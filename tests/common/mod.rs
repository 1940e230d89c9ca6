//! Shared helpers for the end-to-end tests: the real models, and running the `kiln` binary.
#![allow(dead_code)] // each test binary uses its own subset

pub mod bitnet;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

pub const REFERENCE: &str = "../shared/reference/smollm2-135m.json";

/// The models `scripts/fetch-models.sh` knows, by its short name, with their file names in the cache.
const MODELS: [(&str, &str); 3] = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("qwen2", "qwen2.5-coder-0.5b-instruct.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
];

fn cache_dir() -> PathBuf {
    match std::env::var_os("KILN_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/kiln/models")
        }
    }
}

static FETCH: Mutex<()> = Mutex::new(());

/// The path of a real model, fetched on first use. When the fetch is impossible (no network), the test is
/// skipped with a loud message, unless `KILN_REQUIRE_MODELS=1` (CI) makes that a failure.
pub fn model(name: &str) -> Option<PathBuf> {
    let file = MODELS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("unknown model {name}"))
        .1;
    let path = cache_dir().join(file);
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-models.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(name)
            .env("KILN_MODELS", cache_dir())
            .status();
        if !matches!(status, Ok(s) if s.success()) || !path.exists() {
            let message = format!(
                "model `{name}` is not in {} and fetching it failed",
                cache_dir().display()
            );
            if std::env::var("KILN_REQUIRE_MODELS").as_deref() == Ok("1") {
                panic!("{message} (KILN_REQUIRE_MODELS=1)");
            }
            eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
            return None;
        }
    }
    Some(path)
}

pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("the kiln binary runs")
}

/// Runs kiln, expecting success; returns stdout.
pub fn kiln_ok(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// llama.cpp's greedy answer on SmolLM2's chat prompt (`tests/fixtures/llama_cpp_chat.json`).
pub fn llama_cpp_chat() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_cpp_chat.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(REFERENCE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference json")
}

pub fn ids(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect()
}

/// A running `kiln serve`, killed when dropped. Its stderr lines are kept in `log`.
pub struct Server {
    pub child: std::process::Child,
    /// `host:port` of the API.
    pub address: String,
    pub metrics_url: String,
    pub log: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `kiln [global] serve PLAN --port 0 --metrics-port 0 --model-name m [extra]` and waits until it listens
    /// and has loaded its models.
    pub fn start(global: &[&str], plan: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(global)
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
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kiln serve starts");
        let log = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        // The URL ends at a space or, in a JSON log line, at the closing quote.
        let url_after = |line: &str, what: &str| {
            line.split(what).nth(1).map(|rest| {
                rest.chars()
                    .take_while(|c| !matches!(c, '"' | ' '))
                    .collect::<String>()
            })
        };
        let (mut address, mut metrics_url, mut ready) = (None, None, false);
        while address.is_none() || metrics_url.is_none() || !ready {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("kiln serve announces its addresses, then that its models are loaded");
            if line.contains("listening on") {
                address = url_after(&line, "http://");
            } else if line.contains("metrics on") {
                metrics_url = url_after(&line, "http://").map(|u| format!("http://{u}"));
            } else if line.contains("ready") {
                ready = true;
            }
        }
        Server {
            child,
            address: address.unwrap(),
            metrics_url: metrics_url.unwrap(),
            log,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Pipes `input` through an external tool (`dot`, `promtool`) and returns its output. When the tool is not
/// installed, the check is skipped with a loud message, except in CI (`CI` set), where `.ci/run` installs it.
pub fn pipe_through(tool: &str, args: &[&str], input: &str, install: &str) -> Option<Output> {
    use std::process::Stdio;
    let spawned = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = spawned else {
        assert!(
            std::env::var_os("CI").is_none(),
            "`{tool}` is missing in CI (.ci/run installs it)"
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED a `{tool}` check: it is not installed ({install}) !!!!!!!!\n"
        );
        return None;
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .expect("the tool reads its input");
    Some(child.wait_with_output().expect("the tool runs"))
}

/// SmolLM2 compiled to a plan, once per test binary.
pub fn smollm2_plan() -> Option<PathBuf> {
    static PLAN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PLAN.get_or_init(|| {
        let gguf = model("smollm2")?;
        // One file in cargo's scratch directory, replaced (atomically, by the plan writer) by each test binary:
        // nothing accumulates across runs.
        let plan = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2.plan");
        Some(compile(&gguf, Some(&plan)))
    })
    .clone()
}

/// SmolLM2 re-quantized by `kiln quantize --to FORMAT` into the test's scratch directory: (source, output).
pub fn quantized_smollm2(format: &str) -> Option<(PathBuf, PathBuf)> {
    let source = model("smollm2")?;
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("smollm2-{format}.gguf"));
    quantize(&source, format, &out);
    Some((source, out))
}

/// `kiln quantize SOURCE --to FORMAT -o OUT`, which must succeed.
pub fn quantize(source: &Path, format: &str, out: &Path) {
    kiln_ok(&[
        "quantize",
        source.to_str().unwrap(),
        "--to",
        format,
        "-o",
        out.to_str().unwrap(),
    ]);
}

/// `kiln compile GGUF -o PLAN` (the plan beside the model, or at `plan`), which must succeed; returns the plan.
pub fn compile(gguf: &Path, plan: Option<&Path>) -> PathBuf {
    let plan = plan.map_or_else(|| gguf.with_extension("plan"), Path::to_path_buf);
    kiln_ok(&[
        "compile",
        gguf.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    plan
}

/// `kiln run PATH -p "The capital of France is" -n N --temp 0 --json [EXTRA...]`: the reference prompt, greedy,
/// as JSON text.
pub fn greedy_json(path: &Path, n: usize, extra: &[&str]) -> String {
    let n = n.to_string();
    let mut args = vec![
        "run",
        path.to_str().expect("utf-8 path"),
        "-p",
        "The capital of France is",
        "-n",
        &n,
        "--temp",
        "0",
        "--json",
    ];
    args.extend(extra);
    kiln_ok(&args)
}

/// `kiln perplexity PATH --file GPL-3 --ctx 128 --json [EXTRA...]` (llama-perplexity's set-up in the reference
/// measurements), as JSON text.
pub fn perplexity_json(path: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "perplexity",
        path.to_str().expect("utf-8 path"),
        "--file",
        "/usr/share/common-licenses/GPL-3",
        "--ctx",
        "128",
        "--json",
    ];
    args.extend(extra);
    kiln_ok(&args)
}

/// A plain HTTP/1.0 GET (the body only).
pub fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}
