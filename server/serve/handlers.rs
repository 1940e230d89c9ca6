//! The HTTP endpoints: validate, tokenize, hand the job to the model's engine, and answer in OpenAI's shapes.

use super::api::{
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, OnePrompt, Sampling,
    TokenizeRequest,
};
use super::engine::{Event, Job, TokenLogprob};
use super::models::Served;
use super::Shared;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_runtime::generate::FinishReason;
use kiln_runtime::SamplerConfig;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// `/health` and `/ready`: 200 once the models are loaded, 503 while they load.
pub async fn health(State(s): State<Shared>) -> Response {
    match s.registry() {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading" })),
        )
            .into_response(),
    }
}

pub async fn models(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.registry()?.listing()))
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

/// The most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;

/// Validates the sampling fields and builds the job's settings.
fn sampler(
    m: &Served,
    p: &Sampling,
    prompt_tokens: usize,
) -> Result<(SamplerConfig, usize), ApiError> {
    let room = m.ctx.saturating_sub(prompt_tokens);
    if room == 0 {
        return Err(ApiError::bad_request(
            "prompt",
            format!(
                "the prompt has {prompt_tokens} tokens; the context holds {}",
                m.ctx
            ),
        ));
    }
    let max_tokens = p.max_completion_tokens.or(p.max_tokens).unwrap_or(room);
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError::bad_request(
            "max_tokens",
            format!("max_tokens must be between 1 and {room} ({prompt_tokens} prompt tokens in a context of {})", m.ctx),
        ));
    }
    if prompt_tokens + max_tokens > m.kv_positions {
        return Err(ApiError::bad_request(
            "max_tokens",
            format!(
                "{prompt_tokens} prompt tokens and max_tokens {max_tokens} need more than the {} KV-cache positions this server has (--kv-cache-tokens)",
                m.kv_positions
            ),
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
        logit_bias: p.logit_bias(m.model.tokenizer.vocab_size())?,
        seed,
    };
    Ok((config, max_tokens))
}

/// Runs a request's CPU work before generation (tokenizing, rendering a chat) on the blocking pool: a prompt of
/// megabytes takes a second or more, and the async workers, one per core, also answer `/health`.
async fn off_the_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))
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

pub fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// The receiving end of a started request's events, each with the index of its choice.
type Started = tokio::sync::mpsc::UnboundedReceiver<(usize, Event)>;

/// A queued request.
struct Queued {
    id: String,
    /// How many choices it generates.
    choices: usize,
    events: Started,
    /// `Some(include_usage)` when the client asked to stream.
    stream: Option<bool>,
    /// Whether the client asked for logprobs.
    logprobs: bool,
}

/// Validates and queues a request on its model's engine: one job per choice (`n`), each with its own seed, their
/// events merged into one channel. Dropping that channel (a client gone) drops every job's, which cancels them.
fn start(
    s: &Shared,
    m: &Served,
    kind: &str,
    prompt: Vec<u32>,
    p: Sampling,
) -> Result<Queued, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt", "the prompt is empty"));
    }
    p.unsupported()?;
    let (sampler, max_tokens) = sampler(m, &p, prompt.len())?;
    let choices = p.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(ApiError::bad_request(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}"),
        ));
    }
    let logprobs = requested_logprobs(&p, kind == "chatcmpl")?;
    let stop = p.stop.into_vec();
    if stop.len() > 4 {
        return Err(ApiError::bad_request("stop", "at most 4 stop sequences"));
    }
    let waiting = s.metrics.waiting.get();
    if waiting + choices as i64 > s.max_waiting {
        return Err(ApiError::busy(waiting));
    }
    let (merged_tx, merged_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = request_id(kind);
    tracing::info!(request_id = %id, prompt_tokens = prompt.len(), max_tokens, choices, stream = p.stream, "request queued");
    let arrived = std::time::Instant::now();
    for index in 0..choices {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            id: id.clone(),
            arrived,
            deadline: s.request_timeout.map(|t| arrived + t),
            prompt: prompt.clone(),
            max_tokens,
            sampler: SamplerConfig {
                seed: sampler.seed.wrapping_add(index as u64),
                ..sampler.clone()
            },
            stop: stop.clone(),
            logprobs,
            events: tx,
        };
        s.metrics.waiting.inc();
        m.submit(job)?;
        let merged = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if merged.send((index, event)).is_err() {
                    return;
                }
            }
        });
    }
    let stream = p
        .stream
        .then(|| p.stream_options.is_some_and(|o| o.include_usage));
    Ok(Queued {
        id,
        choices,
        events: merged_rx,
        stream,
        logprobs: logprobs.is_some(),
    })
}

/// How many logprob alternatives a request wants (`None`: no logprobs). Chat asks with `logprobs: true` and
/// `top_logprobs: k`; completions with `logprobs: k`.
fn requested_logprobs(p: &Sampling, chat: bool) -> Result<Option<usize>, ApiError> {
    let top = match (&p.logprobs, chat) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), _) => {
            if chat && p.top_logprobs.is_some() {
                return Err(ApiError::bad_request(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            return Ok(None);
        }
        (Some(Value::Bool(true)), true) => p.top_logprobs.unwrap_or(0),
        (Some(Value::Number(n)), false) => n.as_u64().map_or(usize::MAX, |n| n as usize),
        _ if chat => {
            return Err(ApiError::bad_request(
                "logprobs",
                "logprobs must be true or false",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "logprobs",
                "logprobs must be the number of alternatives (0 to 20)",
            ))
        }
    };
    if top > 20 {
        return Err(ApiError::bad_request(
            if chat { "top_logprobs" } else { "logprobs" },
            "at most 20 alternatives",
        ));
    }
    Ok(Some(top))
}

/// Chat's logprobs shape: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |token: &str, bytes: &[u8], logprob: f32| json!({ "token": token, "logprob": logprob, "bytes": bytes });
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, &t.bytes, t.logprob);
            e["top_logprobs"] = t
                .top
                .iter()
                .map(|(tok, bytes, lp)| entry(tok, bytes, *lp))
                .collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The completions logprobs shape: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.
fn completion_logprobs(tokens: &[TokenLogprob]) -> Value {
    let offsets: Vec<usize> = tokens
        .iter()
        .scan(0, |at, t| Some(std::mem::replace(at, *at + t.token.len())))
        .collect();
    let top: Vec<serde_json::Map<String, Value>> = tokens
        .iter()
        .map(|t| {
            t.top
                .iter()
                .map(|(tok, _, lp)| (tok.clone(), json!(lp)))
                .collect()
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// One finished choice: its text, finish reason and logprobs.
#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<&'static str>,
    logprobs: Vec<TokenLogprob>,
}

/// Runs a request's choices to the end: each choice, in index order, and the usage (the prompt counted once, the
/// completion tokens of every choice).
async fn collect(q: Queued) -> Result<(Vec<Choice>, Value), ApiError> {
    let mut choices: Vec<Choice> = (0..q.choices).map(|_| Choice::default()).collect();
    let (mut completion, mut done) = (0, 0);
    let mut events = q.events;
    while let Some((index, event)) = events.recv().await {
        let choice = &mut choices[index];
        match event {
            Event::Text { text, logprobs } => {
                choice.text.push_str(&text);
                choice.logprobs.extend(logprobs);
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                choice.finish = Some(finish_reason(finish));
                completion += completion_tokens;
                done += 1;
                if done == q.choices {
                    return Ok((choices, usage(prompt_tokens, completion)));
                }
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Streams a request as Server-Sent Events: `chunk(choice, text, finish)` builds each JSON chunk; once every
/// choice has finished, with `include_usage` a last chunk has empty `choices` and the `usage`, and `data: [DONE]`
/// ends the stream. A client that goes away drops the stream, which drops the request's channels, which cancels
/// its generation.
fn stream(
    q: Queued,
    include_usage: bool,
    chunk: impl Fn(usize, Option<&str>, Option<&str>, &[TokenLogprob]) -> Value + Send + 'static,
) -> Response {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    let (choices, mut started) = (q.choices, q.events);
    tokio::spawn(async move {
        let send = |data: String| tx.send(Ok(SseEvent::default().data(data))).is_ok();
        let (mut completion, mut done) = (0, 0);
        while let Some((index, event)) = started.recv().await {
            let sent = match event {
                Event::Text { text, logprobs } => {
                    send(chunk(index, Some(&text), None, &logprobs).to_string())
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut sent =
                        send(chunk(index, None, Some(finish_reason(finish)), &[]).to_string());
                    (completion, done) = (completion + completion_tokens, done + 1);
                    if done < choices {
                        sent
                    } else {
                        if include_usage {
                            let mut last = chunk(index, None, None, &[]);
                            last["choices"] = json!([]);
                            last["usage"] = usage(prompt_tokens, completion);
                            sent = sent && send(last.to_string());
                        }
                        sent && send("[DONE]".into())
                    }
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

pub async fn completions(
    State(s): State<Shared>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let registry = s.registry()?;
    let m = registry.resolve(req.sampling.model.as_deref())?;
    let prompt = req.prompt.one()?;
    if req.echo && req.sampling.logprobs.is_some() {
        return Err(ApiError::bad_request(
            "echo",
            "echo with logprobs (the prompt's logprobs) is not supported",
        ));
    }
    let (model, echo) = (m.model.clone(), req.echo);
    // With `echo`, each choice's text starts with the prompt's: a token prompt is decoded for it, and only then.
    let (ids, echo) = off_the_runtime(move || {
        let tokenizer = &model.tokenizer;
        let vocab = tokenizer.vocab_size();
        let (ids, text) = match prompt {
            OnePrompt::Text(text) => (tokenizer.encode(&text, true), Some(text)),
            OnePrompt::Tokens(ids) if ids.iter().any(|&id| id as usize >= vocab) => {
                return Err(ApiError::bad_request(
                    "prompt",
                    format!(
                        "the prompt holds a token id past this model's vocabulary ({vocab} tokens)"
                    ),
                ))
            }
            OnePrompt::Tokens(ids) => (ids, None),
        };
        let echo = match (echo, text) {
            (false, _) => None,
            (true, Some(text)) => Some(text),
            (true, None) => Some(
                tokenizer
                    .decode(&ids)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            ),
        };
        Ok((ids, echo))
    })
    .await??;
    let q = start(&s, m, "cmpl", ids, req.sampling)?;
    let (id, created, name, want_logprobs) = (q.id.clone(), now(), m.name.clone(), q.logprobs);
    let logprobs = move |tokens: &[TokenLogprob]| {
        if want_logprobs {
            completion_logprobs(tokens)
        } else {
            Value::Null
        }
    };
    if let Some(include_usage) = q.stream {
        // Each choice's first chunk carries the echoed prompt.
        let echoed: Vec<std::sync::atomic::AtomicBool> = (0..q.choices)
            .map(|_| std::sync::atomic::AtomicBool::new(echo.is_none()))
            .collect();
        return Ok(stream(
            q,
            include_usage,
            move |index, text, finish, tokens| {
                let text = match &echo {
                    Some(prompt)
                        if !echoed[index].swap(true, std::sync::atomic::Ordering::Relaxed) =>
                    {
                        format!("{prompt}{}", text.unwrap_or(""))
                    }
                    _ => text.unwrap_or("").to_string(),
                };
                json!({ "id": id, "object": "text_completion", "created": created, "model": name,
            "choices": [{ "index": index, "text": text, "finish_reason": finish, "logprobs": logprobs(tokens) }] })
            },
        ));
    }
    let (choices, usage) = collect(q).await?;
    let echo = echo.unwrap_or_default();
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| json!({ "index": index, "text": format!("{echo}{}", c.text), "finish_reason": c.finish, "logprobs": logprobs(&c.logprobs) }))
        .collect();
    Ok(Json(
        json!({ "id": id, "object": "text_completion", "created": created, "model": name,
        "choices": choices, "usage": usage }),
    )
    .into_response())
}

pub async fn chat_completions(
    State(s): State<Shared>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let registry = s.registry()?;
    let m = registry.resolve(req.sampling.model.as_deref())?;
    if m.template.is_none() {
        return Err(ApiError::bad_request(
            "messages",
            "this model has no chat template; use /v1/completions",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| message.into_message(i))
        .collect::<Result<Vec<_>, _>>()?;
    let served = m.clone();
    let ids = off_the_runtime(move || {
        let template = served.template.as_ref().expect("checked above");
        let rendered = template
            .render(&messages, true)
            .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
        let tokenizer = &served.model.tokenizer;
        let mut ids = tokenizer.encode(&rendered, true);
        if let Some(bos) = tokenizer.bos() {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0); // the template wrote BOS itself
            }
        }
        Ok(ids)
    })
    .await??;
    let q = start(&s, m, "chatcmpl", ids, req.sampling)?;
    let (id, created, name, want_logprobs) = (q.id.clone(), now(), m.name.clone(), q.logprobs);
    let logprobs = move |tokens: &[TokenLogprob]| {
        if want_logprobs {
            chat_logprobs(tokens)
        } else {
            Value::Null
        }
    };
    if let Some(include_usage) = q.stream {
        // Each choice's first chunk carries the role.
        let started: Vec<std::sync::atomic::AtomicBool> = (0..q.choices)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect();
        return Ok(stream(
            q,
            include_usage,
            move |index, text, finish, tokens| {
                let mut delta = json!({});
                if !started[index].swap(true, std::sync::atomic::Ordering::Relaxed) {
                    delta["role"] = json!("assistant");
                }
                if let Some(text) = text {
                    delta["content"] = json!(text);
                }
                json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{ "index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs(tokens) }] })
            },
        ));
    }
    let (choices, usage) = collect(q).await?;
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            json!({ "index": index, "message": { "role": "assistant", "content": c.text },
            "finish_reason": c.finish, "logprobs": logprobs(&c.logprobs) })
        })
        .collect();
    Ok(Json(
        json!({ "id": id, "object": "chat.completion", "created": created, "model": name,
        "choices": choices, "usage": usage }),
    )
    .into_response())
}

pub async fn tokenize(
    State(s): State<Shared>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = parse(body)?;
    let registry = s.registry()?;
    let m = registry.resolve(req.model.as_deref())?;
    let model = m.model.clone();
    let tokens =
        off_the_runtime(move || model.tokenizer.encode(&req.prompt, req.add_special_tokens))
            .await?;
    Ok(Json(
        json!({ "tokens": tokens, "count": tokens.len(), "max_model_len": m.ctx }),
    ))
}

pub async fn detokenize(
    State(s): State<Shared>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = parse(body)?;
    let registry = s.registry()?;
    let m = registry.resolve(req.model.as_deref())?;
    let text = m
        .model
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad_request("tokens", e.to_string()))?;
    Ok(Json(json!({ "prompt": text })))
}
