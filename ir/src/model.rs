//! Facts about a model that every stage shares: the tokenizer, the chat template, context length.
//!
//! The compiler reads them from GGUF metadata; the runtime builds its tokenizer and template from them alone.

use serde::{Deserialize, Serialize};

/// The tokenizer family, from `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerKind {
    /// `gpt2`: byte-level BPE with ranked merges.
    BytePairGpt2,
    /// `llama`: SentencePiece-style, merges by token score.
    SentencePiece,
}

/// What a token is, from `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenType {
    Normal,
    Unknown,
    /// Special tokens such as `<|im_start|>`: matched whole in text, never produced by merging.
    Control,
    /// Added tokens, matched whole in text like control tokens.
    UserDefined,
    Unused,
    /// `<0xAB>`: one raw byte (SentencePiece byte fallback).
    Byte,
}

impl TokenType {
    pub fn from_gguf(id: i32) -> Self {
        match id {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub kind: TokenizerKind,
    /// `tokenizer.ggml.pre`: which pre-tokenizer splits text before BPE (`smollm`, `qwen2`, `default`, ...).
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<TokenType>,
    /// SentencePiece merge scores (empty for BPE).
    pub scores: Vec<f32>,
    /// BPE merges, as "left right", highest priority first (empty for SentencePiece).
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// More end-of-generation tokens (e.g. `<|im_end|>`, `<end_of_turn>`).
    pub eot: Vec<u32>,
    pub unknown: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub name: Option<String>,
    /// The context length the model was trained for.
    pub context_length: usize,
    pub vocab_size: usize,
    pub tokenizer: TokenizerSpec,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
}
