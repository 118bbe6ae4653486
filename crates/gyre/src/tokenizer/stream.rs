//! Incremental detokenizing for streaming generated text.
//!
//! [`DecodeStream`] turns ids arriving one at a time into text deltas whose concatenation equals
//! `Tokenizer::decode` of all the ids. It never emits half a character: a CJK character or emoji
//! split over byte tokens (`<0xE4><0xBD><0xA0>`) is held back until it is whole.
//!
//! The backend picks one of two strategies when the stream starts:
//!
//! * **Bytes**, for byte-level backends (the RWKV World tokenizer), which implement
//!   [`ByteDecode`]: each id's bytes go into a buffer, and every push emits the longest prefix
//!   that is valid UTF-8. An incomplete sequence at the end waits for its next bytes; bytes that
//!   can never become valid come out at once as U+FFFD, exactly where `String::from_utf8_lossy`
//!   of the whole output puts them.
//! * **Text window**, for backends whose text depends on the neighbouring ids (SentencePiece's
//!   leading-space handling in Hugging Face tokenizers): keep two offsets into the ids seen so
//!   far. `prefix_offset..read_offset` is a short window of ids already emitted, kept only as
//!   left context; `read_offset..` are ids not yet emitted. Each push decodes `prefix_offset..`
//!   and diffs it against the cached decode of `prefix_offset..read_offset`. Decoding both with
//!   the same left context makes the `▁` → space replacement and the strip of the first space
//!   come out the same as in a full decode. A decode ending in U+FFFD means bytes are still
//!   pending, so nothing is emitted; this needs the backend's `decode` to render an incomplete
//!   UTF-8 tail as U+FFFD (lossy decoding).

use anyhow::Result;

use super::Tokenizer;

/// The replacement character a lossy decode produces for incomplete UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// How many unemitted ids may wait for a character to complete before the text goes out as is.
///
/// A UTF-8 character needs at most four byte tokens; past this many, the U+FFFD at the end is
/// final (stray bytes), and waiting longer would only grow the window.
const MAX_PENDING: usize = 16;

/// A backend whose text is the plain concatenation of per-id bytes (a byte-level tokenizer).
///
/// `Sync` so that a [`DecodeStream`] can move between threads like the tokenizer it borrows.
pub(crate) trait ByteDecode: Sync {
    /// Appends the bytes of `id` to `out`, nothing for a skipped special token; an id outside
    /// the vocabulary is an error and leaves `out` unchanged.
    fn append_token_bytes(&self, id: u32, skip_special_tokens: bool, out: &mut Vec<u8>) -> Result<()>;
}

/// Streaming detokenizer over a [`Tokenizer`]; see the module documentation.
pub struct DecodeStream<'a> {
    /// Whether special tokens are left out of the text.
    skip_special_tokens: bool,
    /// The strategy the backend asked for, with its state.
    mode: Mode<'a>,
}

/// A [`DecodeStream`]'s strategy and state.
enum Mode<'a> {
    /// Byte-level backend: per-id bytes through a UTF-8 assembler.
    Bytes {
        /// The backend giving each id's bytes.
        decoder: &'a dyn ByteDecode,
        /// Bytes received but not yet emitted (an incomplete character).
        pending: Utf8Pending,
    },
    /// Any other backend: decode a window of ids and diff the texts.
    Window(TextWindow<'a>),
}

impl<'a> DecodeStream<'a> {
    /// Starts an empty stream; see [`Tokenizer::decode_stream`].
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        let mode = match tokenizer.byte_decoder() {
            Some(decoder) => Mode::Bytes {
                decoder,
                pending: Utf8Pending::default(),
            },
            None => Mode::Window(TextWindow::new(tokenizer)),
        };
        DecodeStream {
            skip_special_tokens,
            mode,
        }
    }

    /// Adds one id; returns the new text once it is complete, `None` while nothing new is ready.
    ///
    /// An id outside the vocabulary is an error.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        match &mut self.mode {
            Mode::Bytes { decoder, pending } => {
                decoder.append_token_bytes(id, self.skip_special_tokens, &mut pending.bytes)?;
                let text = pending.take_complete();
                Ok((!text.is_empty()).then_some(text))
            }
            Mode::Window(window) => window.push(id, self.skip_special_tokens),
        }
    }

    /// Flushes whatever is pending (incomplete bytes come out as U+FFFD) and returns it.
    ///
    /// The stream stays usable: later pushes continue after the flushed text.
    pub fn finish(&mut self) -> Result<String> {
        match &mut self.mode {
            Mode::Bytes { pending, .. } => Ok(pending.flush()),
            Mode::Window(window) => window.finish(self.skip_special_tokens),
        }
    }
}

/// Bytes waiting to become text: everything after the last emitted character.
#[derive(Debug, Default)]
struct Utf8Pending {
    /// The unemitted bytes; after [`Utf8Pending::take_complete`], at most an incomplete
    /// (but so far valid) UTF-8 sequence of up to three bytes.
    bytes: Vec<u8>,
}

impl Utf8Pending {
    /// Takes the longest prefix that can be emitted: valid characters, and U+FFFD for each
    /// invalid sequence (as `String::from_utf8_lossy` counts them). An incomplete sequence at
    /// the end stays pending.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        while start < self.bytes.len() {
            match std::str::from_utf8(&self.bytes[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.bytes.len();
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.bytes[start..valid_end]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(REPLACEMENT);
                            start = valid_end + bad;
                        }
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.bytes.drain(..start);
        out
    }

    /// Takes everything, an incomplete trailing sequence as one U+FFFD.
    fn flush(&mut self) -> String {
        let mut out = self.take_complete();
        if !self.bytes.is_empty() {
            out.push(REPLACEMENT);
            self.bytes.clear();
        }
        out
    }
}

/// The text-window state: ids kept as left context plus ids not yet emitted.
struct TextWindow<'a> {
    /// The tokenizer that decodes windows of ids.
    tokenizer: &'a Tokenizer,
    /// The window of ids still needed: `ids[0]` is the id at `prefix_offset`.
    ids: Vec<u32>,
    /// Length of the context part of `ids` (ids already emitted, kept as left context).
    read_offset: usize,
    /// Decode of `ids[..read_offset]`.
    prefix_text: String,
}

impl<'a> TextWindow<'a> {
    /// An empty window.
    fn new(tokenizer: &'a Tokenizer) -> Self {
        TextWindow {
            tokenizer,
            ids: Vec::new(),
            read_offset: 0,
            prefix_text: String::new(),
        }
    }

    /// See [`DecodeStream::push`].
    fn push(&mut self, id: u32, skip: bool) -> Result<Option<String>> {
        self.ids.push(id);
        let text = match self.tokenizer.decode(&self.ids, skip) {
            Ok(text) => text,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        let pending = self.ids.len() - self.read_offset;
        let waiting_for_bytes = text.ends_with(REPLACEMENT) && pending < MAX_PENDING;
        if text.len() <= self.prefix_text.len() || waiting_for_bytes {
            return Ok(None);
        }
        let delta = diff(&self.prefix_text, &text);
        self.advance(text, skip)?;
        Ok(Some(delta))
    }

    /// See [`DecodeStream::finish`].
    fn finish(&mut self, skip: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, skip)?;
        let delta = if text.len() > self.prefix_text.len() {
            diff(&self.prefix_text, &text)
        } else {
            String::new()
        };
        self.advance(text, skip)?;
        Ok(delta)
    }

    /// Marks every id as emitted, given `text`, the decode of the whole window.
    ///
    /// The ids emitted just now become the new left context, unless they decode to nothing on
    /// their own (a skipped special token, a bare `▁` stripped at the start of a window): then
    /// the old context is kept too, so that the next diff still sees the right spacing.
    fn advance(&mut self, text: String, skip: bool) -> Result<()> {
        let new_context = &self.ids[self.read_offset..];
        let new_prefix = self.tokenizer.decode(new_context, skip)?;
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
    use super::{diff, DecodeStream, Utf8Pending};

    #[test]
    fn decode_stream_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<DecodeStream<'static>>();
    }

    #[test]
    fn diff_takes_the_extension() {
        assert_eq!(diff("Hello", "Hello world"), " world");
        assert_eq!(diff("", "你"), "你");
        assert_eq!(diff("ab你", "ab好x"), "好x");
    }

    /// Feeds `chunks` one by one, returning each step's output and the final flush.
    fn feed(chunks: &[&[u8]]) -> (Vec<String>, String) {
        let mut p = Utf8Pending::default();
        let steps = chunks
            .iter()
            .map(|c| {
                p.bytes.extend_from_slice(c);
                p.take_complete()
            })
            .collect();
        (steps, p.flush())
    }

    #[test]
    fn utf8_pending_holds_back_split_characters() {
        // 你 = E4 BD A0, 😀 = F0 9F 98 80.
        let (steps, rest) = feed(&[b"a\xE4", b"\xBD", b"\xA0b", b"\xF0\x9F\x98", b"\x80"]);
        assert_eq!(steps, ["a", "", "你b", "", "😀"]);
        assert_eq!(rest, "");
        // An incomplete character at the end comes out as one U+FFFD, only when flushed.
        let (steps, rest) = feed(&[b"x\xE4\xBD"]);
        assert_eq!(steps, ["x"]);
        assert_eq!(rest, "\u{FFFD}");
    }

    #[test]
    fn utf8_pending_emits_hopeless_bytes_at_once() {
        // A lone continuation byte, 0xFF, and a start byte followed by ASCII can never be valid.
        let (steps, rest) = feed(&[b"\x80", b"\xFFa", b"\xE4", b"z"]);
        assert_eq!(steps, ["\u{FFFD}", "\u{FFFD}a", "", "\u{FFFD}z"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn utf8_pending_matches_lossy_decoding_of_the_whole() {
        // Random byte soup biased towards UTF-8 structure, split at random points.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = [
            b'a', b' ', 0x80, 0xA0, 0xBF, 0xC3, 0xE4, 0xED, 0xF0, 0xF4, 0xF8, 0xFF, 0x9F,
        ];
        for _ in 0..2000 {
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| alphabet[(next() % 13) as usize]).collect();
            let mut cuts: Vec<usize> = (0..(next() % 6)).map(|_| (next() as usize) % (len + 1)).collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let (steps, rest) = feed(&chunks);
            let got: String = steps.concat() + &rest;
            assert_eq!(
                got,
                String::from_utf8_lossy(&bytes),
                "{bytes:02X?} cut at {cuts:?}"
            );
        }
    }
}
