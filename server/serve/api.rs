//! OpenAI's request shapes (what kiln reads of them) and its error shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_runtime::chat::Message;
use serde::Deserialize;
use std::collections::HashMap;

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Default)]
#[serde(untagged)]
pub enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Sampling parameters shared by both endpoints. Unknown fields are ignored, as OpenAI's servers do; fields kiln
/// reads but does not implement (`unsupported`) are refused rather than ignored, since each changes the answer.
#[derive(Deserialize, Debug)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Stop,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stream_options: Option<StreamOptions>,
    /// Chat: `true` to return logprobs (with `top_logprobs` alternatives); completions: the number of alternatives.
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<usize>,
    /// Token id (as a string) to a bias added to its logit, from -100 to 100.
    pub logit_bias: Option<HashMap<String, f32>>,
    pub suffix: Option<serde_json::Value>,
    pub best_of: Option<usize>,
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub functions: Option<Vec<serde_json::Value>>,
}

impl Sampling {
    /// Refuses what kiln does not implement and a client would rely on: a suffix to insert before, more
    /// candidates than choices (`best_of`), structured output, tool calls.
    pub fn unsupported(&self) -> Result<(), ApiError> {
        let refuse = |param, what| {
            Err(ApiError::bad_request(
                param,
                format!("{what} is not supported by kiln"),
            ))
        };
        if self
            .suffix
            .as_ref()
            .is_some_and(|s| !s.is_null() && s != "")
        {
            return refuse("suffix", "suffix (insertion)");
        }
        if self.best_of.is_some_and(|b| b > self.n.unwrap_or(1)) {
            return refuse("best_of", "best_of above n");
        }
        let format = self.response_format.as_ref().and_then(|f| f.get("type"));
        if format.is_some_and(|t| t != "text") {
            return refuse("response_format", "a response_format other than text");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse("tools", "tool calling");
        }
        if self.functions.as_ref().is_some_and(|f| !f.is_empty()) {
            return refuse("functions", "function calling");
        }
        Ok(())
    }

    /// `logit_bias` as (token id, bias) pairs, each id inside the vocabulary and each bias within [-100, 100].
    pub fn logit_bias(&self, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(bias) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        let mut pairs = bias
            .iter()
            .map(|(id, &b)| {
                let id = id
                    .parse::<u32>()
                    .ok()
                    .filter(|&id| (id as usize) < vocab)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "logit_bias",
                            format!(
                                "logit_bias key {id:?} is not a token id of this model (0 to {})",
                                vocab - 1
                            ),
                        )
                    })?;
                if !(-100.0..=100.0).contains(&b) {
                    return Err(ApiError::bad_request(
                        "logit_bias",
                        "a logit bias must be between -100 and 100",
                    ));
                }
                Ok((id, b))
            })
            .collect::<Result<Vec<_>, _>>()?;
        pairs.sort_by_key(|&(id, _)| id);
        Ok(pairs)
    }
}

#[derive(Deserialize, Debug, Default, Clone, Copy)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `prompt`: a string or token ids, or a list holding one of either.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt, as text or as token ids.
pub enum OnePrompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    pub fn one(self) -> Result<OnePrompt, ApiError> {
        let only_one =
            || ApiError::bad_request("prompt", "exactly one prompt per request is supported");
        Ok(match self {
            Prompt::Text(text) => OnePrompt::Text(text),
            Prompt::Tokens(ids) => OnePrompt::Tokens(ids),
            Prompt::Texts(texts) => OnePrompt::Text(single(texts).ok_or_else(only_one)?),
            Prompt::TokenLists(lists) => OnePrompt::Tokens(single(lists).ok_or_else(only_one)?),
        })
    }
}

fn single<T>(mut items: Vec<T>) -> Option<T> {
    (items.len() == 1).then(|| items.remove(0))
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Return the prompt's text before the completion's.
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A chat message as clients send it: its content a string, a list of content parts, or (from the assistant)
/// null.
#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// The roles a chat template gets; `developer` (OpenAI's newer name for `system`) is passed on as `system`.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl ChatMessage {
    /// The message a chat template renders: text parts joined by newlines (as vLLM joins them). Other parts
    /// (images, audio) and unknown roles are refused.
    pub fn into_message(self, index: usize) -> Result<Message, ApiError> {
        let refuse = |what: String| {
            Err(ApiError::bad_request(
                "messages",
                format!("messages[{index}]: {what}"),
            ))
        };
        if !ROLES.contains(&self.role.as_str()) {
            return refuse(format!(
                "role {:?} is not one of {}",
                self.role,
                ROLES.join(", ")
            ));
        }
        let role = if self.role == "developer" {
            "system".to_string()
        } else {
            self.role
        };
        let content = match self.content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(text)) => texts.push(text),
                        ("text", None) => return refuse("a text part has no text".into()),
                        (kind, _) => {
                            return refuse(format!("{kind} content is not supported (text only)"))
                        }
                    }
                }
                texts.join("\n")
            }
            None if role == "assistant" => String::new(),
            None => return refuse("content is missing".into()),
        };
        Ok(Message { role, content })
    }
}

#[derive(Deserialize, Debug)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Debug)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: &'static str,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &'static str,
        param: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            param,
            code,
            retry_after: None,
        }
    }

    pub fn bad_request(param: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some(param),
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            None,
            message,
        )
    }

    /// 503 while the models load.
    pub fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_loading",
            None,
            "The server is still loading its models; retry shortly (GET /ready answers 200 once they are in)",
        )
    }

    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            format!(
                "No endpoint at {path} (see /v1/models, /v1/completions, /v1/chat/completions)"
            ),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            None,
            "Incorrect or missing API key: send `Authorization: Bearer KEY`.",
        )
    }

    pub fn busy(waiting: i64) -> Self {
        let message = format!("The server is busy ({waiting} requests waiting); retry shortly.");
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                None,
                message,
            )
        }
    }

    /// A request body that is not valid JSON for the endpoint, or too large.
    pub fn body(status: StatusCode, message: impl Into<String>) -> Self {
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_json"
        };
        Self::new(status, code, None, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = serde_json::json!({
            "error": { "message": self.message, "type": kind, "param": self.param, "code": self.code }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}
