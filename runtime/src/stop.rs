//! Stop strings over streamed text: text is released only once no stop string can begin in it, so a stop string
//! split across tokens is still caught and never partly sent.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds text. Returns the text now safe to emit, and whether a stop string was found (it and everything after
    /// it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail of the pending text that is the start of some stop string (no longer than
        // the pending text: a client's stop string may be megabytes, and this runs every token).
        let pending = self.pending.len();
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .map(|(i, _)| i)
                    .skip(1)
                    .take_while(|&k| k <= pending)
                    .filter(|&k| self.pending.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let out: String = self.pending.drain(..self.pending.len() - hold).collect();
        (out, false)
    }

    /// The text held back when generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_a_stop_string_split_across_pushes() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(m.push("Paris is"), ("Paris is".into(), false));
        assert_eq!(m.push(" nice.\n"), (" nice.".into(), false));
        assert_eq!(m.push("\nUs"), (String::new(), false));
        assert_eq!(m.push("er: more"), (String::new(), true));
    }

    #[test]
    fn a_stop_string_longer_than_the_text_holds_back_its_start() {
        let long = format!("ab{}", "x".repeat(1 << 20));
        let mut m = StopMatcher::new(vec![long.clone()]);
        assert_eq!(m.push("za"), ("z".into(), false));
        assert_eq!(m.push("b"), (String::new(), false));
        assert_eq!(m.push(&long[2..]), (String::new(), true));
    }

    #[test]
    fn releases_held_text_that_turned_out_not_to_stop() {
        let mut m = StopMatcher::new(vec!["END".into(), "ÉTÉ".into()]);
        assert_eq!(m.push("the EN"), ("the ".into(), false));
        assert_eq!(m.push("D"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["ÉTÉ".into()]);
        assert_eq!(m.push("un É"), ("un ".into(), false));
        assert_eq!(m.push("lan"), ("Élan".into(), false));
        assert_eq!(m.push(" ÉT"), (" ".into(), false));
        assert_eq!(m.finish(), "ÉT");
    }
}
