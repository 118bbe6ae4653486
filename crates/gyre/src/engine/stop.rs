//! Streaming stop-string detection over decoded generation output.
//!
//! [`StopMatcher`] sits between the detokenizer and the client: it receives text deltas,
//! holds back any tail that could still grow into a stop string, and reports when one has
//! appeared, so a stop string is never emitted even when it arrives split over many
//! deltas. It works on `char` boundaries only and knows nothing about tokens, sampling or
//! transport.

/// What the caller may emit after a [`StopMatcher::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to emit now (possibly empty); generation goes on.
    Continue(String),
    /// The final text to emit, which ends just before the stop string; generation ends.
    Stop(String),
}

/// Finds stop strings in streamed text, holding back possible partial matches.
///
/// Generation stops as soon as any stop string has fully appeared; if several have
/// appeared by then, the one that starts earliest in the text wins. A stop string that
/// would complete only later does not delay a stop that has already completed.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    /// The non-empty stop strings.
    stops: Vec<String>,
    /// Byte length of the longest stop string (0 when there are none).
    max_len: usize,
    /// Text received but not yet released: a suffix that could start a stop string.
    held: String,
    /// Set once a stop string was found; later pushes release nothing.
    stopped: bool,
}

impl StopMatcher {
    /// Builds a matcher for `stop`; empty strings are ignored.
    pub fn new(stop: Vec<String>) -> Self {
        let stops: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            max_len,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been found (every later push returns an empty `Stop`).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a decoded text delta and says what may be emitted now.
    ///
    /// After a `Stop` has been returned, further deltas are ignored and `Stop("")` is
    /// returned again.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Stop(String::new());
        }
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_owned());
        }
        self.held.push_str(delta);

        // Every possible match starts inside `held`: released text never was a prefix.
        let earliest = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(pos) = earliest {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(pos);
            return StopOutcome::Stop(text);
        }

        let keep_from = self.partial_match_start();
        let rest = self.held.split_off(keep_from);
        let release = std::mem::replace(&mut self.held, rest);
        StopOutcome::Continue(release)
    }

    /// Returns the held-back text when generation ends for another reason (length, EOS).
    ///
    /// Returns an empty string after a stop string was found.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Smallest char boundary `p` of `held` such that `held[p..]` is a non-empty prefix
    /// of some stop string, or `held.len()` when no suffix is.
    fn partial_match_start(&self) -> usize {
        let len = self.held.len();
        // A proper prefix is at most `max_len - 1` bytes long.
        let lo = len.saturating_sub(self.max_len.saturating_sub(1));
        (lo..len)
            .filter(|&p| self.held.is_char_boundary(p))
            .find(|&p| {
                let tail = &self.held[p..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Pushes deltas until a stop and returns the text released per push and whether it stopped.
    fn run(m: &mut StopMatcher, deltas: &[&str]) -> (Vec<String>, bool) {
        let mut out = Vec::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push(t),
                StopOutcome::Stop(t) => {
                    out.push(t);
                    return (out, true);
                }
            }
        }
        (out, false)
    }

    #[test]
    fn stop_split_over_several_deltas() {
        let mut m = matcher(&["</end>"]);
        let (out, stopped) = run(&mut m, &["Hello", " wor", "ld<", "/e", "n", "d>tail"]);
        assert!(stopped);
        assert_eq!(out, ["Hello", " wor", "ld", "", "", ""]);
        assert_eq!(out.concat(), "Hello world");
        assert!(m.is_stopped());
        assert_eq!(m.push("more"), StopOutcome::Stop(String::new()));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn false_start_is_released() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("a S"), StopOutcome::Continue("a ".into()));
        assert_eq!(m.push("T"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("OCK"), StopOutcome::Continue("STOCK".into()));
        // A false start that overlaps a real one: "SSTOP" must release only the first "S".
        assert_eq!(m.push(" SS"), StopOutcome::Continue(" S".into()));
        assert_eq!(m.push("TOP!"), StopOutcome::Stop(String::new()));
    }

    #[test]
    fn false_start_released_by_finish() {
        let mut m = matcher(&["\n\nUser:"]);
        assert_eq!(m.push("done.\n\nUs"), StopOutcome::Continue("done.".into()));
        assert_eq!(m.finish(), "\n\nUs");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_match_wins() {
        let mut m = matcher(&["world", "lo w", "xyz"]);
        assert_eq!(m.push("hello world"), StopOutcome::Stop("hel".into()));

        // Both complete in the same delta: the earlier start wins regardless of list order.
        let mut m = matcher(&["cd", "abcd"]);
        assert_eq!(m.push("xxab"), StopOutcome::Continue("xx".into()));
        // "cd" alone would have emitted "ab"; "abcd" starts earlier, so nothing more is.
        assert_eq!(m.push("cd"), StopOutcome::Stop(String::new()));

        // A completed stop does not wait for a longer one that might still complete.
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(m.push("abc"), StopOutcome::Stop("a".into()));
    }

    #[test]
    fn multibyte_chars_around_the_boundary() {
        let mut m = matcher(&["é!"]);
        // "é" is two bytes; "ü" must be released whole while "é" is held.
        assert_eq!(m.push("grüé"), StopOutcome::Continue("grü".into()));
        assert_eq!(m.push("x"), StopOutcome::Continue("éx".into()));
        assert_eq!(m.push("日本é"), StopOutcome::Continue("日本".into()));
        assert_eq!(m.push("!"), StopOutcome::Stop(String::new()));

        // Stop string that shares a leading byte pattern with other chars.
        let mut m = matcher(&["日本語"]);
        assert_eq!(m.push("a日"), StopOutcome::Continue("a".into()));
        assert_eq!(m.push("本"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("人"), StopOutcome::Continue("日本人".into()));
        assert_eq!(m.push("🙂日本語"), StopOutcome::Stop("🙂".into()));
    }

    #[test]
    fn no_stop_strings_is_pass_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("abc"), StopOutcome::Continue("abc".into()));
        assert_eq!(m.push(""), StopOutcome::Continue(String::new()));
        assert_eq!(m.finish(), "");
        let mut m = matcher(&["", ""]);
        assert_eq!(m.push("x y"), StopOutcome::Continue("x y".into()));
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = matcher(&["###"]);
        assert_eq!(m.push("###rest"), StopOutcome::Stop(String::new()));
        let mut m = matcher(&["###"]);
        assert_eq!(m.push("#"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("##"), StopOutcome::Stop(String::new()));
    }

    #[test]
    fn one_char_stop_and_empty_deltas() {
        let mut m = matcher(&["\n"]);
        assert_eq!(m.push(""), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("ab"), StopOutcome::Continue("ab".into()));
        assert_eq!(m.push("c\nd"), StopOutcome::Stop("c".into()));
    }
}
