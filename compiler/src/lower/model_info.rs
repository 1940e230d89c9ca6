//! The tokenizer and chat template, from `tokenizer.*` metadata.

use super::{Hyperparameters, LowerError};
use crate::gguf::{GgufFile, MetaValue};
use kiln_ir::model::{ModelInfo, TokenType, TokenizerKind, TokenizerSpec};

/// Texts of tokens that end a turn in chat models, recognised as end-of-generation when they are control tokens
/// (as llama.cpp does).
const END_OF_TURN_TEXTS: [&str; 6] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end|>",
    "<eos>",
];

fn meta_error(key: &str, reason: impl Into<String>) -> LowerError {
    LowerError::Metadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Option<&'a [MetaValue]>, LowerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| meta_error(key, format!("must be an array, is {}", v.type_name()))),
    }
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>, LowerError> {
    let Some(items) = array(gguf, key)? else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| meta_error(key, "must hold strings"))
        })
        .collect()
}

/// An optional array with one entry per token, each converted by `parse` (`None`: not `what`).
fn per_token<T>(
    gguf: &GgufFile,
    key: &str,
    n_tokens: usize,
    what: &str,
    parse: impl Fn(&MetaValue) -> Option<T>,
) -> Result<Option<Vec<T>>, LowerError> {
    let Some(items) = array(gguf, key)? else {
        return Ok(None);
    };
    if items.len() != n_tokens {
        return Err(meta_error(
            key,
            format!("{} entries for {n_tokens} tokens", items.len()),
        ));
    }
    let values = items
        .iter()
        .map(|v| parse(v).ok_or_else(|| meta_error(key, format!("must hold {what}"))));
    values.collect::<Result<_, _>>().map(Some)
}

fn token_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, LowerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
            _ => Err(meta_error(
                key,
                format!("{v} is not a token id below {n_tokens}"),
            )),
        },
    }
}

fn flag(gguf: &GgufFile, key: &str, default: bool) -> Result<bool, LowerError> {
    match gguf.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| meta_error(key, format!("must be a bool, is {}", v.type_name()))),
    }
}

pub fn read(gguf: &GgufFile, arch: &str, hp: &Hyperparameters) -> Result<ModelInfo, LowerError> {
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| meta_error("tokenizer.ggml.model", "missing"))?;
    let kind = match model {
        "gpt2" => TokenizerKind::BytePairGpt2,
        "llama" => TokenizerKind::SentencePiece,
        other => {
            return Err(meta_error(
                "tokenizer.ggml.model",
                format!("`{other}` is not supported (gpt2, llama)"),
            ))
        }
    };
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(meta_error("tokenizer.ggml.tokens", "missing or empty"));
    }
    let n = tokens.len();
    let token_types = per_token(gguf, "tokenizer.ggml.token_type", n, "integers", |v| {
        v.as_i64().map(|t| TokenType::from_gguf(t as i32))
    })?
    .unwrap_or_else(|| vec![TokenType::Normal; n]);
    let scores = per_token(gguf, "tokenizer.ggml.scores", n, "numbers", |v| {
        v.as_f64().map(|x| x as f32)
    })?
    .unwrap_or_default();
    let merges = strings(gguf, "tokenizer.ggml.merges")?;
    if kind == TokenizerKind::BytePairGpt2 && merges.is_empty() {
        return Err(meta_error(
            "tokenizer.ggml.merges",
            "a gpt2 tokenizer needs merges",
        ));
    }
    if kind == TokenizerKind::SentencePiece && scores.is_empty() {
        return Err(meta_error(
            "tokenizer.ggml.scores",
            "a llama (SentencePiece) tokenizer needs scores",
        ));
    }
    let eos = token_id(gguf, "tokenizer.ggml.eos_token_id", n)?;
    let mut eot: Vec<u32> = token_id(gguf, "tokenizer.ggml.eot_token_id", n)?
        .into_iter()
        .collect();
    for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
        let id = id as u32;
        if *ty == TokenType::Control
            && END_OF_TURN_TEXTS.contains(&text.as_str())
            && Some(id) != eos
            && !eot.contains(&id)
        {
            eot.push(id);
        }
    }
    let vocab_size = gguf
        .tensor("token_embd.weight")
        .map(|t| t.shape[0])
        .unwrap_or(n);
    if vocab_size < n {
        return Err(meta_error(
            "tokenizer.ggml.tokens",
            format!("{n} tokens but the embedding has {vocab_size} rows"),
        ));
    }
    let spec = TokenizerSpec {
        kind,
        pre: gguf
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string(),
        tokens,
        token_types,
        scores,
        merges,
        bos: token_id(gguf, "tokenizer.ggml.bos_token_id", n)?,
        eos,
        eot,
        unknown: token_id(gguf, "tokenizer.ggml.unknown_token_id", n)?,
        add_bos: flag(
            gguf,
            "tokenizer.ggml.add_bos_token",
            kind == TokenizerKind::SentencePiece,
        )?,
        add_eos: flag(gguf, "tokenizer.ggml.add_eos_token", false)?,
        add_space_prefix: flag(
            gguf,
            "tokenizer.ggml.add_space_prefix",
            kind == TokenizerKind::SentencePiece,
        )?,
    };
    Ok(ModelInfo {
        architecture: arch.to_string(),
        name: gguf
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        context_length: hp.context_length,
        vocab_size,
        tokenizer: spec,
        chat_template: gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string),
    })
}
