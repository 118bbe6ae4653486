//! Incremental detokenizing for streaming generated text.
//!
//! [`DecodeStream`] turns ids arriving one at a time into text deltas whose concatenation equals
//! `Tokenizer::decode` of all the ids. It never emits half a character: a CJK character or emoji
//! split over byte-fallback tokens (`<0xE4><0xBD><0xA0>`) is held back until it is whole.
//!
//! Technique: keep two offsets into the ids seen so far. `prefix_offset..read_offset` is a short
//! window of ids already emitted, kept only as left context; `read_offset..` are ids not yet
//! emitted. Each push decodes `prefix_offset..` and diffs it against the cached decode of
//! `prefix_offset..read_offset`. Decoding both with the same left context makes SentencePiece's
//! leading-space handling (the `▁` → space replacement and the strip of the first space) come out
//! the same as in a full decode. A decode ending in U+FFFD means bytes are still pending, so
//! nothing is emitted. Any backend plugs in as long as its `decode` renders an incomplete UTF-8
//! tail as U+FFFD (lossy decoding), which byte-level tokenizers do naturally.

use anyhow::Result;

use super::Tokenizer;

/// The replacement character a lossy decode produces for incomplete UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// How many unemitted ids may wait for a character to complete before the text goes out as is.
///
/// A UTF-8 character needs at most four byte tokens; past this many, the U+FFFD at the end is
/// final (stray bytes), and waiting longer would only grow the window.
const MAX_PENDING: usize = 16;

/// Streaming detokenizer over a [`Tokenizer`]; see the module documentation.
pub struct DecodeStream<'a> {
    /// The tokenizer that decodes windows of ids.
    tokenizer: &'a Tokenizer,
    /// Whether special tokens are left out of the text.
    skip_special_tokens: bool,
    /// The window of ids still needed: `ids[0]` is the id at `prefix_offset`.
    ids: Vec<u32>,
    /// Length of the context part of `ids` (ids already emitted, kept as left context).
    read_offset: usize,
    /// Decode of `ids[..read_offset]`.
    prefix_text: String,
}

impl<'a> DecodeStream<'a> {
    /// Starts an empty stream; see [`Tokenizer::decode_stream`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        DecodeStream {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            read_offset: 0,
            prefix_text: String::new(),
        }
    }

    /// Adds one id; returns the new text once it is complete, `None` while nothing new is ready.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let pending = self.ids.len() - self.read_offset;
        let waiting_for_bytes = text.ends_with(REPLACEMENT) && pending < MAX_PENDING;
        if text.len() <= self.prefix_text.len() || waiting_for_bytes {
            return Ok(None);
        }
        let delta = diff(&self.prefix_text, &text);
        self.advance(text)?;
        Ok(Some(delta))
    }

    /// Flushes whatever is pending (incomplete bytes come out as U+FFFD) and returns it.
    ///
    /// The stream stays usable: later pushes continue after the flushed text.
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let delta = if text.len() > self.prefix_text.len() {
            diff(&self.prefix_text, &text)
        } else {
            String::new()
        };
        self.advance(text)?;
        Ok(delta)
    }

    /// Marks every id as emitted, given `text`, the decode of the whole window.
    ///
    /// The ids emitted just now become the new left context, unless they decode to nothing on
    /// their own (a skipped special token, a bare `▁` stripped at the start of a window): then
    /// the old context is kept too, so that the next diff still sees the right spacing.
    fn advance(&mut self, text: String) -> Result<()> {
        let new_context = &self.ids[self.read_offset..];
        let new_prefix = self.tokenizer.decode(new_context, self.skip_special_tokens)?;
        if new_prefix.is_empty() {
            self.prefix_text = text;
        } else {
            self.ids.drain(..self.read_offset);
            self.prefix_text = new_prefix;
        }
        self.read_offset = self.ids.len();
        Ok(())
    }
}

/// The part of `text` past `prefix`; when `text` does not extend `prefix` (a decoder that
/// rewrites earlier text), the part past their longest common prefix.
fn diff(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common: usize = prefix
        .chars()
        .zip(text.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a.len_utf8())
        .sum();
    text[common..].to_string()
}

#[cfg(test)]
mod tests {
    use super::diff;

    #[test]
    fn diff_takes_the_extension() {
        assert_eq!(diff("Hello", "Hello world"), " world");
        assert_eq!(diff("", "你"), "你");
        assert_eq!(diff("ab你", "ab好x"), "好x");
    }
}
