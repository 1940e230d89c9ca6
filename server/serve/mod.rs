//! `kiln serve`: an OpenAI-compatible HTTP server (axum). Handlers (`handlers`) validate and tokenize; each served
//! model (`models`) has an engine thread (`engine`) that generates; text streams back over a channel per request.

mod api;
mod engine;
mod handlers;
mod metrics;
mod models;

use anyhow::{bail, Context};
use api::ApiError;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use metrics::Metrics;
use models::Registry;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A compiled plan (or a GGUF model, compiled in memory at start). Optional with --model.
    pub plan: Option<PathBuf>,
    /// The API name of PLAN (default: its file name without the extension).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Serve another model: NAME=PATH (repeat for more). Requests choose one by `model`.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// Another name for a served model: ALIAS=NAME (repeat for more).
    #[arg(long = "alias", value_name = "ALIAS=NAME")]
    pub aliases: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port; 0 picks a free one (the chosen address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Port of the Prometheus `/metrics` endpoint (on --host); 0 picks a free one.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Requests allowed to wait for an engine; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: i64,
    /// Longest a request may take, queueing included, in seconds (0: no limit). Generation stops at the first
    /// token after it, with finish_reason `length`.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// A file of API keys, one per line; clients must then send `Authorization: Bearer KEY`. The environment
    /// variable KILN_API_KEYS (comma-separated) works the same way. Without either, no key is needed.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Context size per request in tokens (0: each model's, at most 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    /// Sequences each model generates at once (continuous batching: every step feeds one prompt chunk and the next
    /// token of each running sequence). The CPU executor batches; the GPU and the reference interpreter run one
    /// sequence at a time.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_running: u16,
    /// KV-cache positions per model, shared by its running sequences in pages of 16 (0: a full context for each).
    /// A request waits until its prompt and max_tokens fit; one larger than the whole cache gets 400.
    #[arg(long, default_value_t = 0)]
    pub kv_cache_tokens: usize,
    #[command(flatten)]
    pub engine: crate::commands::EngineArgs,
}

pub struct AppState {
    /// Set once every model is loaded (until then `/health` and `/ready` answer 503 and requests are refused), and
    /// replaced whole by a reload. A request holds the registry it started with, so it finishes on those models.
    registry: std::sync::RwLock<Option<Arc<Registry>>>,
    metrics: Arc<Metrics>,
    max_waiting: i64,
    /// `--request-timeout`, when set.
    request_timeout: Option<std::time::Duration>,
    api_keys: Vec<String>,
}

impl AppState {
    /// The models, or 503 while they load.
    fn registry(&self) -> Result<Arc<Registry>, ApiError> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(ApiError::loading)
    }

    fn set_registry(&self, registry: Registry) {
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(registry));
    }
}

/// What loading the models takes, kept to load them again on SIGHUP.
struct ModelSet {
    models: Vec<(String, PathBuf)>,
    aliases: Vec<(String, String)>,
    ctx: usize,
    capacity: engine::Capacity,
    engine: crate::commands::EngineArgs,
    metrics: Arc<Metrics>,
}

impl ModelSet {
    fn load(&self) -> anyhow::Result<Registry> {
        let paths: Vec<(String, &std::path::Path)> = self
            .models
            .iter()
            .map(|(n, p)| (n.clone(), p.as_path()))
            .collect();
        Registry::load(
            &paths,
            &self.aliases,
            self.ctx,
            self.capacity,
            &self.engine,
            &self.metrics,
        )
    }
}

type Shared = Arc<AppState>;

/// Splits `NAME=VALUE`.
fn pair(flag: &str, text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() && !value.is_empty() => {
            Ok((name.to_string(), value.to_string()))
        }
        _ => bail!("{flag} takes NAME=VALUE, got `{text}`"),
    }
}

/// Listens at once, loads the models in the background (probes see 503 until they are in), then serves until
/// SIGTERM or Ctrl-C. A model that fails to load stops the server with its error. With `json_logs`, the start-up
/// announcements are JSON log events too.
pub fn run(args: &ServeArgs, json_logs: bool) -> anyhow::Result<()> {
    let announce = |what: &str, url: String| match json_logs {
        true => tracing::info!(url = %url, "{what}"),
        false => eprintln!("kiln serve: {what} {url}"),
    };
    let mut models: Vec<(String, PathBuf)> = Vec::new();
    if let Some(plan) = &args.plan {
        let stem = plan
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        models.push((args.model_name.clone().unwrap_or(stem), plan.clone()));
    }
    for m in &args.models {
        let (name, path) = pair("--model", m)?;
        models.push((name, PathBuf::from(path)));
    }
    let aliases = args
        .aliases
        .iter()
        .map(|a| pair("--alias", a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metrics = Arc::new(Metrics::new());
    let api_keys = api_keys(args.api_key_file.as_deref())?;
    if !api_keys.is_empty() {
        tracing::info!(
            keys = api_keys.len(),
            "API keys loaded; requests must carry one"
        );
    }
    let state = Arc::new(AppState {
        registry: std::sync::RwLock::new(None),
        metrics: Arc::clone(&metrics),
        max_waiting: args.max_waiting,
        request_timeout: request_timeout(args.request_timeout)?,
        api_keys,
    });
    let metrics_app = Router::new()
        .route("/metrics", get(serve_metrics))
        .with_state(Arc::clone(&metrics));
    let app = Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::health))
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .fallback(|uri: axum::http::Uri| async move { ApiError::no_route(uri.path()) })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(args.max_body_bytes))
        .with_state(Arc::clone(&state));
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
        let set = Arc::new(ModelSet {
            models,
            aliases,
            ctx: args.ctx,
            capacity: engine::Capacity {
                max_running: args.max_running as usize,
                kv_positions: args.kv_cache_tokens,
            },
            engine: args.engine.clone(),
            metrics,
        });
        let (loader, loaded) = (Arc::clone(&set), Arc::clone(&state));
        let loading = tokio::task::spawn_blocking(move || {
            let registry = loader.load()?;
            let count = registry.len();
            loaded.set_registry(registry);
            anyhow::Ok(count)
        });
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        tokio::spawn(async move {
            match loading.await {
                Ok(Ok(count)) => {
                    announce_ready(json_logs, count);
                    reload_on_hangup(set, state).await;
                }
                Ok(Err(e)) => {
                    let _ = failed_tx.send(e);
                }
                Err(e) => {
                    let _ = failed_tx.send(anyhow::anyhow!("loading the models stopped: {e}"));
                }
            }
        });
        // The server stops on a signal, or when a model fails to load; then `run` returns that error.
        let load_error = Arc::new(std::sync::Mutex::new(None));
        let slot = Arc::clone(&load_error);
        let load_failed = async move {
            match failed_rx.await {
                Ok(e) => e,
                // Loaded: the sender is gone, and this never fires.
                Err(_) => std::future::pending().await,
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    e = load_failed => *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
                }
            })
            .await?;
        let error = load_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// On each SIGHUP, loads every model again from its path and, when all load, serves them instead: requests in
/// flight finish on the old ones, whose engines stop once their queues are empty. A failed load is logged and
/// changes nothing.
async fn reload_on_hangup(set: Arc<ModelSet>, state: Shared) {
    #[cfg(unix)]
    {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; plans will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the models");
            let loader = Arc::clone(&set);
            match tokio::task::spawn_blocking(move || loader.load()).await {
                Ok(Ok(registry)) => {
                    let count = registry.len();
                    state.set_registry(registry);
                    tracing::info!(models = count, "reloaded");
                }
                Ok(Err(e)) => {
                    tracing::error!("reload failed, still serving the models loaded before: {e:#}")
                }
                Err(e) => {
                    tracing::error!("reload stopped, still serving the models loaded before: {e}")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (set, state);
}

fn announce_ready(json_logs: bool, models: usize) {
    match json_logs {
        true => tracing::info!(models, "ready"),
        false => eprintln!("kiln serve: ready ({models} models loaded)"),
    }
}

/// `--request-timeout` as a duration (`None` for 0: no limit).
fn request_timeout(seconds: f64) -> anyhow::Result<Option<std::time::Duration>> {
    anyhow::ensure!(
        seconds.is_finite() && seconds >= 0.0,
        "--request-timeout takes seconds, 0 or more (0: no limit), got {seconds}"
    );
    Ok((seconds > 0.0).then(|| std::time::Duration::from_secs_f64(seconds)))
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
