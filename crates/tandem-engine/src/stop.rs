//! Stop strings matched on generated text, without leaking a partial match to the stream:
//! text that could still become the start of a stop string is held back until it cannot.

/// Outcome of feeding a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to emit now (possibly empty); no stop string matched yet.
    Continue(String),
    /// A stop string matched: the text to emit before it; generation ends.
    Stopped(String),
}

/// Per-request stop-string state.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (none: everything passes through).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.to_vec(),
            held: String::new(),
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(piece.to_string());
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stopped(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopCheck::Continue(out)
    }

    /// Releases held-back text when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_matches_are_held_then_released_or_cut() {
        let mut m = StopMatcher::new(&["\nUser:".to_string(), "###".to_string()]);
        assert_eq!(m.push("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.push(" world\nUs"), StopCheck::Continue(" world".into()));
        assert_eq!(m.push("ually"), StopCheck::Continue("\nUsually".into()));
        assert_eq!(m.push(" #"), StopCheck::Continue(" ".into()));
        assert_eq!(m.push("## tail"), StopCheck::Stopped("".into()));
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("café"), StopCheck::Continue("caf".into()));
        assert_eq!(m.flush(), "é");
    }
}
