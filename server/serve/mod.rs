//! `kiln serve PLAN`: an OpenAI-compatible HTTP server (axum). Handlers validate and tokenize; the engine thread
//! (`engine`) generates; text streams back over a channel per request.

mod api;
mod engine;
mod metrics;

use crate::model::{Model, Source};
use anyhow::Context;
use api::{
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, Sampling, TokenizeRequest,
};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use engine::{Event, Job};
use kiln_runtime::chat::ChatTemplate;
use kiln_runtime::generate::FinishReason;
use kiln_runtime::SamplerConfig;
use metrics::Metrics;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::UnboundedReceiverStream;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A compiled plan (or a GGUF model, compiled in memory at start).
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port; 0 picks a free one (the chosen address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Port of the Prometheus `/metrics` endpoint (on --host); 0 picks a free one.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Requests allowed to wait for the engine; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: i64,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// A file of API keys, one per line; clients must then send `Authorization: Bearer KEY`. The environment
    /// variable KILN_API_KEYS (comma-separated) works the same way. Without either, no key is needed.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model's name in the API (default: the file name without its extension).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Context size per request in tokens (0: the model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
}

struct AppState {
    model: Arc<Model>,
    name: String,
    ctx: usize,
    template: Option<ChatTemplate>,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    metrics: Arc<Metrics>,
    max_waiting: i64,
    api_keys: Vec<String>,
}

type Shared = Arc<AppState>;

/// Serves until SIGTERM or Ctrl-C. With `json_logs`, the start-up announcements are JSON log events too.
pub fn run(args: &ServeArgs, json_logs: bool) -> anyhow::Result<()> {
    let announce = |what: &str, url: String| match json_logs {
        true => tracing::info!(url = %url, "{what}"),
        false => eprintln!("kiln serve: {what} {url}"),
    };
    let model = Arc::new(Model::open(&args.model)?);
    let ctx = if args.ctx == 0 {
        model.info.context_length.min(4096)
    } else {
        args.ctx
    };
    let name = match &args.model_name {
        Some(name) => name.clone(),
        None => args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let tokenizer = &model.tokenizer;
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_text(i))
            .unwrap_or("")
            .to_string()
    };
    let template = match &model.info.chat_template {
        Some(source) => Some(ChatTemplate::new(
            source,
            &token_text(tokenizer.bos()),
            &token_text(tokenizer.spec().eos),
        )?),
        None => None,
    };
    let (plan_format, target) = match &model.source {
        Source::Plan(plan) => (
            kiln_ir::plan::FORMAT_VERSION.to_string(),
            plan.meta.target.to_string(),
        ),
        Source::Gguf(_) => (
            "gguf".to_string(),
            kiln_runtime::plan::host_target().to_string(),
        ),
    };
    let metrics = Arc::new(Metrics::new(&plan_format, &target));
    let jobs = engine::spawn(Arc::clone(&model), ctx, Arc::clone(&metrics))?;
    let api_keys = api_keys(args.api_key_file.as_deref())?;
    if !api_keys.is_empty() {
        tracing::info!(
            keys = api_keys.len(),
            "API keys loaded; requests must carry one"
        );
    }
    let jobs = std::sync::Mutex::new(jobs);
    let state = Arc::new(AppState {
        model,
        name,
        ctx,
        template,
        jobs,
        metrics: Arc::clone(&metrics),
        max_waiting: args.max_waiting,
        api_keys,
    });
    let metrics_app = Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(metrics);
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(|uri: axum::http::Uri| async move { ApiError::no_route(uri.path()) })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(args.max_body_bytes))
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let metrics_listener =
            tokio::net::TcpListener::bind((args.host.as_str(), args.metrics_port))
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {}:{} for metrics",
                        args.host, args.metrics_port
                    )
                })?;
        announce("listening on", format!("http://{}", listener.local_addr()?));
        announce(
            "metrics on",
            format!("http://{}/metrics", metrics_listener.local_addr()?),
        );
        tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = interrupt => {}, _ = terminate => {} }
    tracing::info!("shutting down after the requests in flight");
}

/// API keys from `--api-key-file` and `KILN_API_KEYS`.
fn api_keys(file: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    let mut keys: Vec<String> = std::env::var("KILN_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(|k| k.trim().to_string())
        .collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API key file {}", path.display()))?;
        keys.extend(text.lines().map(|l| l.trim().to_string()));
    }
    keys.retain(|k| !k.is_empty());
    Ok(keys)
}

/// Checks `Authorization: Bearer KEY` when keys are configured; health checks stay open for probes.
async fn require_api_key(
    State(s): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let open = s.api_keys.is_empty() || matches!(request.uri().path(), "/health" | "/ready");
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if open || presented.is_some_and(|key| s.api_keys.iter().any(|k| k == key)) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(
        json!({ "object": "list", "data": [{ "id": s.name, "object": "model", "created": 0, "owned_by": "kiln" }] }),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A request id: unique within this process, and across restarts in practice.
fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{prefix}-{:x}{n:04x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0)
    )
}

/// Validates the sampling fields and builds the job's settings.
fn sampler(
    s: &Shared,
    p: &Sampling,
    prompt_tokens: usize,
) -> Result<(SamplerConfig, usize), ApiError> {
    if let Some(model) = p.model.as_deref().filter(|m| *m != s.name) {
        return Err(ApiError::not_found(format!(
            "The model `{model}` does not exist; this server serves `{}`.",
            s.name
        )));
    }
    if p.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("n", "only n=1 is supported"));
    }
    let room = s.ctx.saturating_sub(prompt_tokens);
    if room == 0 {
        return Err(ApiError::bad_request(
            "prompt",
            format!(
                "the prompt has {prompt_tokens} tokens; the context holds {}",
                s.ctx
            ),
        ));
    }
    let max_tokens = p.max_completion_tokens.or(p.max_tokens).unwrap_or(room);
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError::bad_request(
            "max_tokens",
            format!("max_tokens must be between 1 and {room} ({prompt_tokens} prompt tokens in a context of {})", s.ctx),
        ));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        return Err(ApiError::bad_request("top_p", "top_p must be in (0, 1]"));
    }
    let min_p = p.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_request("min_p", "min_p must be in [0, 1]"));
    }
    let seed = p.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let penalty = |value: Option<f32>, param: &'static str| match value.unwrap_or(0.0) {
        p if (-2.0..=2.0).contains(&p) => Ok(p),
        _ => Err(ApiError::bad_request(
            param,
            format!("{param} must be between -2 and 2"),
        )),
    };
    let config = SamplerConfig {
        temperature,
        top_k: p.top_k.unwrap_or(0),
        top_p,
        min_p,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        presence_penalty: penalty(p.presence_penalty, "presence_penalty")?,
        frequency_penalty: penalty(p.frequency_penalty, "frequency_penalty")?,
        seed,
    };
    Ok((config, max_tokens))
}

fn parse<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    // Axum's rejections carry the right status (400, 413, 415, 422); keep it, in OpenAI's shape.
    body.map(|Json(v)| v).map_err(|e| {
        let status = if e.status() == axum::http::StatusCode::UNPROCESSABLE_ENTITY {
            axum::http::StatusCode::BAD_REQUEST
        } else {
            e.status()
        };
        ApiError::body(status, e.body_text())
    })
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// The receiving end of a started request's events.
type Started = tokio::sync::mpsc::UnboundedReceiver<Event>;

/// Queues a request. Returns its id, its events, and `Some(include_usage)` when the client asked to stream.
fn start(
    s: &Shared,
    kind: &str,
    prompt: Vec<u32>,
    p: Sampling,
) -> Result<(String, Started, Option<bool>), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt", "the prompt is empty"));
    }
    let (sampler, max_tokens) = sampler(s, &p, prompt.len())?;
    let stop = p.stop.into_vec();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("stop", "at most 4 stop sequences"));
    }
    let waiting = s.metrics.waiting.get();
    if waiting >= s.max_waiting {
        return Err(ApiError::busy(waiting));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let id = request_id(kind);
    tracing::info!(request_id = %id, prompt_tokens = prompt.len(), max_tokens, stream = p.stream, "request queued");
    let job = Job {
        id: id.clone(),
        arrived: std::time::Instant::now(),
        prompt,
        max_tokens,
        sampler,
        stop,
        events: tx,
    };
    s.metrics.waiting.inc();
    s.jobs
        .lock()
        .map_err(|_| ApiError::internal("engine lock poisoned"))?
        .send(job)
        .map_err(|_| ApiError::internal("the engine has stopped"))?;
    Ok((
        id,
        rx,
        p.stream
            .then(|| p.stream_options.is_some_and(|o| o.include_usage)),
    ))
}

/// Runs a request to the end: its text, finish reason and usage.
async fn collect(mut started: Started) -> Result<(String, &'static str, Value), ApiError> {
    let mut text = String::new();
    while let Some(event) = started.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok((
                    text,
                    finish_reason(finish),
                    usage(prompt_tokens, completion_tokens),
                ));
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Streams a request as Server-Sent Events: `chunk(text, finish)` builds each JSON chunk; with `include_usage` a
/// last chunk has empty `choices` and the `usage`; `data: [DONE]` ends the stream. A client that goes away drops
/// the stream, which drops the request's channel, which cancels its generation.
fn stream(
    mut started: Started,
    include_usage: bool,
    chunk: impl Fn(Option<&str>, Option<&str>) -> Value + Send + 'static,
) -> Response {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    tokio::spawn(async move {
        let send = |data: String| tx.send(Ok(SseEvent::default().data(data))).is_ok();
        while let Some(event) = started.recv().await {
            let sent = match event {
                Event::Text(t) => send(chunk(Some(&t), None).to_string()),
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut sent = send(chunk(None, Some(finish_reason(finish))).to_string());
                    if include_usage {
                        let mut last = chunk(None, None);
                        last["choices"] = json!([]);
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                        sent = sent && send(last.to_string());
                    }
                    sent && send("[DONE]".into())
                }
                Event::Failed(message) => send(
                    json!({ "error": { "message": message, "type": "server_error" } }).to_string(),
                ),
            };
            if !sent {
                return;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens })
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "prompt",
                "exactly one prompt per request is supported",
            ))
        }
    };
    let ids = s.model.tokenizer.encode(&prompt, true);
    let (id, started, streaming) = start(&s, "cmpl", ids, req.sampling)?;
    let (created, name) = (now(), s.name.clone());
    if let Some(include_usage) = streaming {
        return Ok(stream(started, include_usage, move |text, finish| {
            json!({ "id": id, "object": "text_completion", "created": created, "model": name,
                "choices": [{ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null }] })
        }));
    }
    let (text, finish, usage) = collect(started).await?;
    Ok(Json(json!({ "id": id, "object": "text_completion", "created": created, "model": name,
        "choices": [{ "index": 0, "text": text, "finish_reason": finish, "logprobs": null }], "usage": usage }))
    .into_response())
}

async fn chat_completions(
    State(s): State<Shared>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let template = s.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    let rendered = template
        .render(&req.messages, true)
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    let tokenizer = &s.model.tokenizer;
    let mut ids = tokenizer.encode(&rendered, true);
    if let Some(bos) = tokenizer.bos() {
        if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
            ids.remove(0); // the template wrote BOS itself
        }
    }
    let (id, started, streaming) = start(&s, "chatcmpl", ids, req.sampling)?;
    let (created, name) = (now(), s.name.clone());
    if let Some(include_usage) = streaming {
        let first = std::sync::atomic::AtomicBool::new(true);
        return Ok(stream(started, include_usage, move |text, finish| {
            let mut delta = json!({});
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                delta["role"] = json!("assistant");
            }
            if let Some(text) = text {
                delta["content"] = json!(text);
            }
            json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
        }));
    }
    let (text, finish, usage) = collect(started).await?;
    Ok(Json(json!({ "id": id, "object": "chat.completion", "created": created, "model": name,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish }], "usage": usage }))
    .into_response())
}

async fn tokenize(
    State(s): State<Shared>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = parse(body)?;
    let tokens = s
        .model
        .tokenizer
        .encode(&req.prompt, req.add_special_tokens);
    Ok(Json(
        json!({ "tokens": tokens, "count": tokens.len(), "max_model_len": s.ctx }),
    ))
}

async fn detokenize(
    State(s): State<Shared>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = parse(body)?;
    let text = s
        .model
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad_request("tokens", e.to_string()))?;
    Ok(Json(json!({ "prompt": text })))
}
