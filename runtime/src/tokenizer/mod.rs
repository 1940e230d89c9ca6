//! Tokenizers built from GGUF metadata alone (`TokenizerSpec`): byte-level BPE and SentencePiece-style.
//!
//! Written to match llama.cpp token for token: the same pre-tokenizer regexes per `tokenizer.ggml.pre`, the same
//! special-token splitting, the same BOS/EOS and space-prefix rules.

mod bpe;
mod pretokenize;
mod spm;

use aho_corasick::{AhoCorasick, MatchKind};
use bpe::Bpe;
use kiln_ir::model::{TokenType, TokenizerKind, TokenizerSpec};
use pretokenize::PreTokenizer;
use spm::Spm;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unknown pre-tokenizer `{0}` (tokenizer.ggml.pre; kiln knows {known})", known = pretokenize::KNOWN)]
    UnknownPreTokenizer(String),
    #[error("token id {0} is outside the vocabulary")]
    BadId(u32),
    #[error("cannot index the special tokens: {0}")]
    Specials(String),
}

enum Model {
    Bpe {
        pre: PreTokenizer,
        bpe: Box<Bpe>,
        byte_of_char: HashMap<char, u8>,
    },
    SentencePiece,
}

pub struct Tokenizer {
    spec: TokenizerSpec,
    token_id: HashMap<String, u32>,
    /// The special tokens' texts (control, user-defined, unknown), matched leftmost-longest; pattern `i` is
    /// token `special_ids[i]`.
    specials: Option<AhoCorasick>,
    special_ids: Vec<u32>,
    byte_tokens: [Option<u32>; 256],
    model: Model,
}

/// A piece of input text: raw text to tokenize, or a special token found in it.
enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

impl Tokenizer {
    pub fn new(spec: &TokenizerSpec) -> Result<Self, TokenizerError> {
        let mut token_id = HashMap::with_capacity(spec.tokens.len());
        for (id, text) in spec.tokens.iter().enumerate() {
            token_id.entry(text.clone()).or_insert(id as u32);
        }
        let (special_texts, special_ids): (Vec<&str>, Vec<u32>) = spec
            .tokens
            .iter()
            .zip(&spec.token_types)
            .enumerate()
            .filter(|(_, (text, ty))| {
                matches!(
                    ty,
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !text.is_empty()
            })
            .map(|(id, (text, _))| (text.as_str(), id as u32))
            .unzip();
        // An automaton, not a scan of every special token at every position: Gemma 3 has thousands that start
        // with `<`, and a prompt of 80000 `<` took 3 s.
        let specials = (!special_texts.is_empty())
            .then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&special_texts)
            })
            .transpose()
            .map_err(|e| TokenizerError::Specials(e.to_string()))?;
        let byte_tokens = std::array::from_fn(|b| token_id.get(&format!("<0x{b:02X}>")).copied());
        let model = match spec.kind {
            TokenizerKind::BytePairGpt2 => {
                let pre = PreTokenizer::new(&spec.pre)
                    .ok_or_else(|| TokenizerError::UnknownPreTokenizer(spec.pre.clone()))?;
                let byte_of_char = bpe::byte_chars()
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                Model::Bpe {
                    pre,
                    bpe: Box::new(Bpe::new(&spec.merges, &token_id)),
                    byte_of_char,
                }
            }
            TokenizerKind::SentencePiece => Model::SentencePiece,
        };
        Ok(Tokenizer {
            spec: spec.clone(),
            token_id,
            specials,
            special_ids,
            byte_tokens,
            model,
        })
    }

    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }

    pub fn vocab_size(&self) -> usize {
        self.spec.tokens.len()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.spec.tokens.get(id as usize).map(String::as_str)
    }

    fn token_type(&self, id: u32) -> TokenType {
        self.spec
            .token_types
            .get(id as usize)
            .copied()
            .unwrap_or(TokenType::Normal)
    }

    pub fn bos(&self) -> Option<u32> {
        self.spec.bos
    }

    /// Whether a token ends generation (EOS, or an end-of-turn token).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        Some(id) == self.spec.eos || self.spec.eot.contains(&id)
    }

    /// Tokenizes text. Special tokens written in the text (`<|im_start|>`) become their ids. `add_special` adds
    /// BOS/EOS as the model's metadata asks.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.spec.add_bos {
            out.extend(self.spec.bos);
        }
        let mut prev_special = true;
        for fragment in self.split_specials(text) {
            match fragment {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    self.encode_text(t, prev_special, &mut out);
                    prev_special = false;
                }
            }
        }
        if add_special && self.spec.add_eos {
            out.extend(self.spec.eos);
        }
        out
    }

    fn encode_text(&self, text: &str, prev_special: bool, out: &mut Vec<u32>) {
        match &self.model {
            Model::Bpe { pre, bpe, .. } => {
                for piece in pre.split(text) {
                    bpe.encode_piece(piece, out);
                }
            }
            Model::SentencePiece => {
                let mut escaped = String::with_capacity(text.len() + 3);
                if self.spec.add_space_prefix && prev_special {
                    escaped.push('\u{2581}');
                }
                escaped.extend(text.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
                let spm = Spm {
                    token_id: &self.token_id,
                    scores: &self.spec.scores,
                    byte_tokens: &self.byte_tokens,
                    unknown: self.spec.unknown,
                };
                spm.encode(&escaped, out);
            }
        }
    }

    /// Splits out special tokens, scanning left to right and taking the longest special token at each position
    /// (of equal texts, the lowest id).
    fn split_specials<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let Some(specials) = &self.specials else {
            return vec![Fragment::Text(text)];
        };
        let mut fragments = Vec::new();
        let mut start = 0;
        for m in specials.find_iter(text) {
            if start < m.start() {
                fragments.push(Fragment::Text(&text[start..m.start()]));
            }
            fragments.push(Fragment::Special(self.special_ids[m.pattern().as_usize()]));
            start = m.end();
        }
        if start < text.len() {
            fragments.push(Fragment::Text(&text[start..]));
        }
        fragments
    }

    /// The bytes a token stands for. Control tokens render as nothing (they are markup, not text).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        let text = self.token_text(id).ok_or(TokenizerError::BadId(id))?;
        Ok(match (self.token_type(id), &self.model) {
            (TokenType::Control, _) => Vec::new(),
            (TokenType::UserDefined, _) => text.as_bytes().to_vec(),
            (TokenType::Byte, _) => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            (_, Model::Bpe { byte_of_char, .. }) => text
                .chars()
                .filter_map(|c| byte_of_char.get(&c).copied())
                .collect(),
            (_, Model::SentencePiece) => text.replace('\u{2581}', " ").into_bytes(),
        })
    }

    /// Decodes ids to text (invalid UTF-8 sequences become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The token's text for display: byte-level characters decoded, `▁` as a space, control tokens verbatim.
    pub fn piece(&self, id: u32) -> Result<String, TokenizerError> {
        if self.token_type(id) == TokenType::Control {
            return Ok(self
                .token_text(id)
                .ok_or(TokenizerError::BadId(id))?
                .to_string());
        }
        Ok(String::from_utf8_lossy(&self.token_bytes(id)?).into_owned())
    }
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a stream of token bytes into text, holding back an incomplete UTF-8 sequence until it completes: the
/// pieces it returns add up to the lossy decoding of all the bytes at once, however the tokens split them.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let ready = self.pending.len() - truncated_tail(&self.pending);
        let text = String::from_utf8_lossy(&self.pending[..ready]).into_owned();
        self.pending.drain(..ready);
        text
    }

    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Bytes at the end of `bytes` that begin a UTF-8 sequence not yet complete. Invalid bytes before it do not end
/// the search: they become U+FFFD either way, and the sequence after them may still complete.
fn truncated_tail(mut bytes: &[u8]) -> usize {
    loop {
        match std::str::from_utf8(bytes) {
            Ok(_) => return 0,
            Err(e) => match e.error_len() {
                None => return bytes.len() - e.valid_up_to(),
                Some(invalid) => bytes = &bytes[e.valid_up_to() + invalid..],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_split_leftmost_longest_lowest_id_first() {
        // A SentencePiece vocabulary of single characters and overlapping control tokens (one text twice).
        let mut tokens: Vec<String> = ["x", "y", "<", ">", "a", "b"].map(String::from).to_vec();
        let specials = ["<a>", "<ab>", "<a", "<ab>"];
        tokens.extend(specials.map(String::from));
        let mut token_types = vec![TokenType::Normal; 6];
        token_types.extend([TokenType::Control; 4]);
        let spec = TokenizerSpec {
            kind: TokenizerKind::SentencePiece,
            pre: "default".into(),
            scores: vec![0.0; tokens.len()],
            tokens,
            token_types,
            merges: Vec::new(),
            bos: None,
            eos: None,
            eot: Vec::new(),
            unknown: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        };
        let tokenizer = Tokenizer::new(&spec).unwrap();
        // "<ab>" is tokens 7 and 9: the lower wins; "<a>" beats its prefix "<a"; a lone "<a" is token 8.
        assert_eq!(tokenizer.encode("x<ab>y<a>x<a", false), [0, 7, 1, 6, 0, 8]);
        assert_eq!(tokenizer.encode("<<a>>", false), [2, 6, 3]);
    }

    fn streamed(chunks: &[&[u8]]) -> String {
        let mut decoder = StreamDecoder::default();
        let mut text: String = chunks.iter().map(|c| decoder.push(c)).collect();
        text += &decoder.finish();
        text
    }

    #[test]
    fn a_character_split_across_tokens_comes_out_whole() {
        let euro = "€".as_bytes();
        let mut decoder = StreamDecoder::default();
        assert_eq!(decoder.push(&euro[..1]), "");
        assert_eq!(decoder.push(&euro[1..2]), "");
        assert_eq!(decoder.push(&euro[2..]), "€");
    }

    #[test]
    fn invalid_bytes_before_a_split_character_do_not_break_it() {
        // 0xFF can never be in UTF-8; the euro sign after it arrives in two tokens.
        assert_eq!(
            streamed(&[b"a\xFF\xE2\x82", b"\xACb"]),
            "a\u{FFFD}\u{20AC}b"
        );
    }

    #[test]
    fn streaming_gives_the_lossy_decoding_of_all_bytes() {
        let bytes: &[u8] = b"x\xE2\x82\xF0\x9F\x98\x80\xC3\xFFy\xE2\x82\xAC\xED\xA0\x80z\xF0\x9F";
        let whole = String::from_utf8_lossy(bytes).into_owned();
        for split in 1..4 {
            let chunks: Vec<&[u8]> = bytes.chunks(split).collect();
            assert_eq!(streamed(&chunks), whole, "in chunks of {split}");
        }
        for cut in 0..=bytes.len() {
            assert_eq!(
                streamed(&[&bytes[..cut], &bytes[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
    }
}
