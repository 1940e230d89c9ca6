//! Pre-tokenizers for byte-level BPE: the regex sequences llama.cpp uses for each `tokenizer.ggml.pre`.
//!
//! Each regex of a sequence splits every piece left by the one before; both the matches and the text between
//! them become pieces (as llama.cpp's `unicode_regex_split` does).

use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex sequence for a `tokenizer.ggml.pre` name, or `None` when kiln does not know it.
fn patterns(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "olmo" | "jais" => &[GPT2],
        // Digits stand alone, then the GPT-2 rules.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            &[r"\p{N}", GPT2]
        }
        "qwen2" | "deepseek-r1-qwen" => &[QWEN2],
        "llama3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" => &[LLAMA3],
        _ => return None,
    })
}

/// Names kiln knows, for error messages.
pub const KNOWN: &str = "default, gpt2, smollm, starcoder, qwen2, llama3, llama-bpe, ...";

pub struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(pre: &str) -> Option<Self> {
        let regexes = patterns(pre)?
            .iter()
            .map(|p| Regex::new(p).expect("built-in pre-tokenizer regex"))
            .collect();
        Some(PreTokenizer { regexes })
    }

    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len());
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    // The built-in patterns have bounded lookaround; a backtrack-limit error cannot occur on them,
                    // and if it did, leaving the rest of the piece whole is still a valid split.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_isolates_digits() {
        let p = PreTokenizer::new("smollm").unwrap();
        assert_eq!(
            p.split("about 311 million  people"),
            ["about", " ", "3", "1", "1", " million", " ", " people"]
        );
    }

    #[test]
    fn qwen2_keeps_newlines_apart() {
        let p = PreTokenizer::new("qwen2").unwrap();
        assert_eq!(
            p.split("def f():\n    return 42"),
            ["def", " f", "():\n", "   ", " return", " ", "4", "2"]
        );
    }
}
