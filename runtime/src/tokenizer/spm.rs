//! SentencePiece-style tokenization as llama.cpp's `llama` tokenizer does it: start from characters, merge the
//! adjacent pair whose concatenation is the highest-scoring token, repeat; characters with no token fall back to
//! `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};

pub struct Spm<'a> {
    pub token_id: &'a HashMap<String, u32>,
    pub scores: &'a [f32],
    pub byte_tokens: &'a [Option<u32>; 256],
    pub unknown: Option<u32>,
}

#[derive(PartialEq)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// The combined length when queued: a stale candidate (a side merged since) is skipped.
    len: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Highest score first; ties go to the leftmost pair.
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Spm<'_> {
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols as byte ranges of `text`, linked left/right; a merged-away symbol has len 0.
        let mut start: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        let n = start.len();
        let mut len: Vec<usize> = (0..n)
            .map(|i| start.get(i + 1).copied().unwrap_or(text.len()) - start[i])
            .collect();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let mut next: Vec<Option<usize>> = (0..n).map(|i| (i + 1 < n).then_some(i + 1)).collect();
        let mut queue = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<Candidate>,
                    start: &[usize],
                    len: &[usize],
                    left: usize,
                    right: usize| {
            let s = &text[start[left]..start[right] + len[right]];
            if let Some(&id) = self.token_id.get(s) {
                queue.push(Candidate {
                    score: self.scores[id as usize],
                    left,
                    right,
                    len: s.len(),
                });
            }
        };
        for i in 1..n {
            push(&mut queue, &start, &len, i - 1, i);
        }
        while let Some(c) = queue.pop() {
            let right = c.right;
            // Live symbols have a length; a merged-away left side can still link to a grown right side.
            if len[c.left] == 0 || next[c.left] != Some(right) || len[c.left] + len[right] != c.len
            {
                continue;
            }
            len[c.left] += len[right];
            len[right] = 0;
            next[c.left] = next[right];
            if let Some(after) = next[right] {
                prev[after] = Some(c.left);
            }
            if let Some(before) = prev[c.left] {
                push(&mut queue, &start, &len, before, c.left);
            }
            if let Some(after) = next[c.left] {
                push(&mut queue, &start, &len, c.left, after);
            }
        }
        start.truncate(n);
        let mut i = (n > 0).then_some(0);
        while let Some(s) = i {
            let piece = &text[start[s]..start[s] + len[s]];
            match self.token_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
            i = next[s];
        }
    }
}
