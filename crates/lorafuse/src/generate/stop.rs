//! Stop strings over streamed text: text is released only once it can no longer be the start of
//! a stop string, and everything from a matched stop string on is dropped.

/// Watches generated text for stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopWatch {
    stops: Vec<String>,
    text: String,
    released: usize,
    stopped: bool,
}

impl StopWatch {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds newly decoded text; returns the part that is now safe to show.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        let search_from = self.released.saturating_sub(self.max_stop_len());
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                let start = floor_char_boundary(&self.text, search_from);
                self.text[start..].find(s.as_str()).map(|i| i + start)
            })
            .min();
        let end = match hit {
            Some(i) => {
                self.stopped = true;
                self.text.truncate(i);
                i
            }
            // Hold back what could still grow into a stop string.
            None => floor_char_boundary(&self.text, self.held_back_from()),
        };
        let out = if end > self.released {
            self.text[self.released..end].to_string()
        } else {
            String::new()
        };
        self.released = self.released.max(end);
        out
    }

    /// The text held back at the end of generation (no stop string matched).
    pub fn finish(&mut self) -> String {
        let out = self.text.get(self.released..).unwrap_or("").to_string();
        self.released = self.text.len();
        out
    }

    /// True once a stop string has matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text up to (not including) the stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn max_stop_len(&self) -> usize {
        self.stops.iter().map(|s| s.len()).max().unwrap_or(0)
    }

    /// Start of the longest suffix of the text that is a proper prefix of some stop string.
    fn held_back_from(&self) -> usize {
        let mut from = self.text.len();
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= self.text.len()
                    && self.text.is_char_boundary(self.text.len() - k)
                    && s.is_char_boundary(k)
                    && self.text.ends_with(&s[..k])
                {
                    from = from.min(self.text.len() - k);
                    break;
                }
            }
        }
        from
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
