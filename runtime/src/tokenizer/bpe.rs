//! Byte-level BPE (GPT-2 family): bytes map to printable characters, then ranked merges apply.

use std::collections::HashMap;

/// GPT-2's reversible byte <-> character map: printable bytes map to themselves, the rest to U+0100 onwards.
pub fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are valid")
        };
    }
    table
}

pub struct Bpe {
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token id of each byte's character.
    byte_ids: [Option<u32>; 256],
}

impl Bpe {
    /// Builds the merge table; merges whose parts or result are not tokens are skipped (they can never apply).
    pub fn new(merges: &[String], token_id: &HashMap<String, u32>) -> Self {
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let Some((left, right)) = merge.split_once(' ') else {
                continue;
            };
            let (Some(&l), Some(&r)) = (token_id.get(left), token_id.get(right)) else {
                continue;
            };
            let Some(&merged) = token_id.get(&format!("{left}{right}")) else {
                continue;
            };
            table.entry((l, r)).or_insert((rank as u32, merged));
        }
        let chars = byte_chars();
        let byte_ids = std::array::from_fn(|b| token_id.get(&chars[b].to_string()).copied());
        Bpe {
            merges: table,
            byte_ids,
        }
    }

    /// Tokenizes one pre-tokenized piece: start from its bytes, apply the best-ranked merge until none applies.
    pub fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_ids[b as usize])
            .collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, merged)| (rank, i, merged))
                })
                .min();
            let Some((_, i, merged)) = best else { break };
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        out.extend(symbols);
    }
}
