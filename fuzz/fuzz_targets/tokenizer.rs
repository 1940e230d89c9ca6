//! The tokenizers of the real models on arbitrary text and ids: encoding never panics and gives ids inside the
//! vocabulary; text without special tokens (or SentencePiece's `▁`) made of bytes the vocabulary has decodes back
//! to itself (byte-level BPE exactly, SentencePiece after the space it puts before a text: a byte without a token,
//! such as 0x04 in SmolLM2's, is dropped, as llama.cpp drops it); decoding any ids gives text or a typed error, and streaming them gives the
//! same text as decoding at once.
//!
//! The models are the GGUF files `scripts/fetch-models.sh` fetches, in `KILN_MODELS` or `~/.cache/kiln/models`.
//! Run: RUSTC_BOOTSTRAP=1 cargo fuzz run tokenizer -- -max_total_time=600 -rss_limit_mb=4096
#![no_main]

use kiln_compiler::{lower, GgufFile};
use kiln_ir::model::TokenType;
use kiln_runtime::tokenizer::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::LazyLock;

const MODELS: [&str; 3] = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct.gguf",
    "gemma-3-270m-q4_k_m.gguf",
];

/// A real model's tokenizer, and the bytes that some token of its vocabulary stands for alone.
struct Model {
    tokenizer: Tokenizer,
    bytes: [bool; 256],
}

static TOKENIZERS: LazyLock<Vec<Model>> = LazyLock::new(|| {
    let dir = std::env::var_os("KILN_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/kiln/models")
        });
    MODELS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let gguf = GgufFile::open(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (run scripts/fetch-models.sh)", path.display())
            });
            let lowered = lower(&gguf).expect("the real models lower");
            let tokenizer =
                Tokenizer::new(&lowered.info.tokenizer).expect("the real tokenizers load");
            let mut bytes = [false; 256];
            for id in 0..tokenizer.vocab_size() as u32 {
                if let Ok([b]) = tokenizer.token_bytes(id).as_deref() {
                    bytes[*b as usize] = true;
                }
            }
            Model { tokenizer, bytes }
        })
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Model { tokenizer, bytes } = &TOKENIZERS[selector as usize % MODELS.len()];
    let vocab = tokenizer.vocab_size() as u32;

    let text = String::from_utf8_lossy(rest);
    let ids = tokenizer.encode(&text, selector & 0x80 != 0);
    assert!(
        ids.iter().all(|&id| id < vocab),
        "an id outside the vocabulary"
    );
    let decoded = tokenizer.decode(&ids).expect("encoded ids decode");
    let types = &tokenizer.spec().token_types;
    let plain = |id: &u32| {
        matches!(
            types.get(*id as usize),
            None | Some(TokenType::Normal | TokenType::Byte)
        )
    };
    // SentencePiece reads a `▁` in the text as the space it stands for.
    let spelled = text.bytes().all(|b| bytes[b as usize]);
    if selector & 0x80 == 0 && ids.iter().all(plain) && spelled && !text.contains('\u{2581}') {
        let prefixed = format!(" {text}");
        assert!(
            decoded == text || decoded == prefixed,
            "{text:?} decodes back as {decoded:?}"
        );
    }

    // Any ids, some past the vocabulary: decoded at once or streamed token by token, the same text or error.
    let ids: Vec<u32> = rest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) % (vocab + 8))
        .collect();
    let at_once = tokenizer.decode(&ids);
    let mut stream = StreamDecoder::default();
    let streamed: Result<String, _> = ids
        .iter()
        .map(|&id| tokenizer.token_bytes(id).map(|bytes| stream.push(&bytes)))
        .collect();
    match (at_once, streamed) {
        (Ok(a), Ok(s)) => assert_eq!(a, s + &stream.finish()),
        (Err(_), Err(_)) => {}
        (a, s) => panic!("decoding at once gave {a:?}, streaming {s:?}"),
    }
});
