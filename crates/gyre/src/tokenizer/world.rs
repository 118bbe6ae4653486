//! The RWKV "World" tokenizer: greedy longest-match over bytes with a fixed 65,529-token vocabulary.
//!
//! Reference: the `rwkv` pip package, `rwkv/rwkv_tokenizer.py::TRIE_TOKENIZER`, with the vocabulary
//! `rwkv_vocab_v20230424.txt` (vendored in `assets/`, see its README; MODELS.md B.7). This module
//! owns parsing that vocabulary (`<id> <python literal> <byte length>` per line), the byte trie,
//! encoding, decoding and vocabulary look-ups. It knows nothing of model directories or
//! streaming: the parent module wraps it in a `Tokenizer`, and `stream` only sees its bytes.
//!
//! Encoding walks the trie from each position as far as the input allows and emits the deepest
//! token seen on the way (no merges, no normalisation). Every single byte is a token (ids
//! 1..=256), so any text encodes. Id 0 is `<|endoftext|>`: not in the file, never produced by
//! encode, used as EOS. Decoding concatenates token bytes and turns invalid UTF-8 into U+FFFD
//! (lossy), where the reference returns a single `"\ufffd"` for the whole input.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};

use super::stream::ByteDecode;

/// The id of `<|endoftext|>`, the World models' EOS; it has no bytes in the vocabulary.
pub(crate) const EOS_ID: u32 = 0;

/// The text of [`EOS_ID`], emitted by decode when special tokens are not skipped.
pub(crate) const EOS_TEXT: &str = "<|endoftext|>";

/// The vendored vocabulary file (see `assets/README.md` for source, licence and sha256).
const EMBEDDED_VOCAB: &str = include_str!("../../assets/rwkv_vocab_v20230424.txt");

/// File name of the embedded vocabulary, for error messages and `Debug` output.
const EMBEDDED_NAME: &str = "rwkv_vocab_v20230424.txt (embedded)";

/// Ids in a vocabulary file must stay below this (guards the id-indexed tables).
const MAX_ID: u32 = 1 << 24;

/// The id space is padded up to a multiple of this, as RWKV checkpoints pad their embedding
/// (the World vocabulary's largest id is 65529; its models have 65536 embedding rows).
const ID_SPACE_ALIGN: usize = 64;

/// Marks a trie node at which no token ends.
const NO_TOKEN: u32 = u32::MAX;

/// The RWKV World tokenizer: vocabulary bytes per id and the byte trie built from them.
pub(crate) struct WorldTokenizer {
    /// All token bytes, concatenated in id order.
    bytes: Vec<u8>,
    /// `bytes[offsets[id]..offsets[id + 1]]` is the token of `id`; empty for id 0 and unused
    /// ids. Length `vocab_size + 1`.
    offsets: Vec<u32>,
    /// The byte trie used by encode and exact look-ups.
    trie: Trie,
    /// Where the vocabulary came from, for error messages.
    origin: String,
}

impl std::fmt::Debug for WorldTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorldTokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("trie_nodes", &self.trie.token.len())
            .finish()
    }
}

impl WorldTokenizer {
    /// The tokenizer over the embedded `rwkv_vocab_v20230424.txt`, parsed once per process.
    pub(crate) fn embedded() -> Arc<WorldTokenizer> {
        static EMBEDDED: OnceLock<Arc<WorldTokenizer>> = OnceLock::new();
        EMBEDDED
            .get_or_init(|| {
                let tok = WorldTokenizer::from_vocab_text(EMBEDDED_VOCAB, EMBEDDED_NAME)
                    .expect("the embedded World vocabulary parses (checked by unit tests)");
                Arc::new(tok)
            })
            .clone()
    }

    /// Loads a World vocabulary file (the `rwkv_vocab_v20230424.txt` format).
    pub(crate) fn from_file(path: &Path) -> Result<WorldTokenizer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading World tokenizer vocabulary {}", path.display()))?;
        WorldTokenizer::from_vocab_text(&text, &path.display().to_string())
    }

    /// Whether `path` looks like a World vocabulary: its first line parses as a vocabulary line
    /// (e.g. `1 '\x00' 1`). Unreadable files are not World vocabularies.
    pub(crate) fn is_vocab_file(path: &Path) -> bool {
        use std::io::{BufRead, Read};
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        let mut first = Vec::new();
        if std::io::BufReader::new(file.take(4096))
            .read_until(b'\n', &mut first)
            .is_err()
        {
            return false;
        }
        std::str::from_utf8(&first).is_ok_and(|line| parse_line(line).is_ok())
    }

    /// Parses vocabulary text and builds the trie; `origin` names the source in errors.
    ///
    /// Besides malformed lines (errors give the line number), it rejects id 0 (reserved for
    /// `<|endoftext|>`), repeated ids, empty tokens, and a vocabulary without a token for every
    /// single byte (some input could not be encoded). When two ids have the same bytes, encode
    /// produces the later one, as the reference's dictionary does.
    pub(crate) fn from_vocab_text(text: &str, origin: &str) -> Result<WorldTokenizer> {
        let entries = parse_vocab(text).with_context(|| format!("parsing World vocabulary {origin}"))?;
        let max_id = entries.iter().map(|e| e.id).max().unwrap_or(0) as usize;
        let vocab_size = (max_id + 1).next_multiple_of(ID_SPACE_ALIGN);

        let mut by_id: Vec<Option<usize>> = vec![None; vocab_size];
        for (index, entry) in entries.iter().enumerate() {
            by_id[entry.id as usize] = Some(index);
        }
        let total: usize = entries.iter().map(|e| e.bytes.len()).sum();
        let mut bytes = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(vocab_size + 1);
        offsets.push(0u32);
        for index in &by_id {
            if let Some(i) = index {
                bytes.extend_from_slice(&entries[*i].bytes);
            }
            offsets.push(u32::try_from(bytes.len()).context("World vocabulary over 4 GiB")?);
        }

        let trie = Trie::build(entries.iter().map(|e| (e.bytes.as_slice(), e.id)));
        if let Some(b) = (0..=255u8).find(|&b| trie.token[trie.root[b as usize] as usize] == NO_TOKEN) {
            bail!(
                "World vocabulary {origin} has no token for the single byte 0x{b:02X}; every byte \
                 0x00..=0xFF needs one so that any text can be encoded"
            );
        }
        Ok(WorldTokenizer {
            bytes,
            offsets,
            trie,
            origin: origin.to_string(),
        })
    }

    /// Size of the id space: the largest id plus one, padded to a multiple of 64 (65536 for the
    /// World vocabulary; ids 65530..=65535 have no token).
    pub(crate) fn vocab_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The bytes of `id`'s token; empty for id 0 and for unused ids. `id` must be in range.
    fn token_bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        &self.bytes[self.offsets[id] as usize..self.offsets[id + 1] as usize]
    }

    /// Encodes `text` by greedy longest match over its UTF-8 bytes, exactly as the reference.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let src = text.as_bytes();
        let mut ids = Vec::with_capacity(src.len() / 3 + 1);
        let mut pos = 0;
        while pos < src.len() {
            let (id, len) = self.trie.longest_match(&src[pos..]);
            ids.push(id);
            pos += len;
        }
        ids
    }

    /// Checks that `id` is inside the id space.
    fn check_id(&self, id: u32) -> Result<()> {
        if id as usize >= self.vocab_size() {
            bail!(
                "token id {id} is out of range for the World tokenizer {} (vocabulary size {})",
                self.origin,
                self.vocab_size()
            );
        }
        Ok(())
    }

    /// Decodes `ids` to text. Bytes that are not valid UTF-8 become U+FFFD (lossy, like
    /// `String::from_utf8_lossy`). Id 0 is `<|endoftext|>` unless `skip_special_tokens`; unused
    /// ids inside the id space decode to nothing; ids past it are an error.
    pub(crate) fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut out = Vec::new();
        for &id in ids {
            self.append_token_bytes(id, skip_special_tokens, &mut out)?;
        }
        Ok(match String::from_utf8(out) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The id of a token string: the token with exactly these UTF-8 bytes, or `<|endoftext|>`,
    /// or, for a string made only of `<0xHH>` groups (how [`Self::id_to_token`] shows tokens
    /// that are not valid UTF-8), the token with those bytes.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        if token == EOS_TEXT {
            return Some(EOS_ID);
        }
        self.trie
            .exact(token.as_bytes())
            .or_else(|| parse_hex_bytes(token).and_then(|b| self.trie.exact(&b)))
    }

    /// The token string of an id: its text when its bytes are valid UTF-8, otherwise one `<0xHH>`
    /// group per byte (e.g. `<0xE4><0xBD>`); `<|endoftext|>` for id 0; `None` for unused or
    /// out-of-range ids.
    pub(crate) fn id_to_token(&self, id: u32) -> Option<String> {
        if id == EOS_ID {
            return Some(EOS_TEXT.to_string());
        }
        if id as usize >= self.vocab_size() {
            return None;
        }
        let bytes = self.token_bytes(id);
        if bytes.is_empty() {
            return None;
        }
        Some(match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => bytes.iter().map(|b| format!("<0x{b:02X}>")).collect(),
        })
    }
}

impl ByteDecode for WorldTokenizer {
    fn append_token_bytes(&self, id: u32, skip_special_tokens: bool, out: &mut Vec<u8>) -> Result<()> {
        self.check_id(id)?;
        if id == EOS_ID {
            if !skip_special_tokens {
                out.extend_from_slice(EOS_TEXT.as_bytes());
            }
        } else {
            out.extend_from_slice(self.token_bytes(id));
        }
        Ok(())
    }
}

/// Parses a string made only of `<0xHH>` groups into its bytes; `None` for anything else.
fn parse_hex_bytes(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let group = rest.get(..6)?;
        let hex = group.strip_prefix("<0x")?.strip_suffix('>')?;
        out.push(u8::from_str_radix(hex, 16).ok()?);
        rest = &rest[6..];
    }
    (!out.is_empty()).then_some(out)
}

/// A byte trie in breadth-first order: the children of a node are consecutive nodes.
///
/// Node 0 is the root. The root's children are found through a direct table; every other
/// node's children `child_start[n]..child_start[n + 1]` are sorted by their `label`, so a child
/// is one binary search away.
struct Trie {
    /// The root's child for each first byte (0 when none; the root is never a child).
    root: [u32; 256],
    /// First child of each node; one extra entry closes the last node's range.
    child_start: Vec<u32>,
    /// The byte on the edge into each node (unused for the root).
    label: Vec<u8>,
    /// The token id ending at each node, [`NO_TOKEN`] if none.
    token: Vec<u32>,
}

impl Trie {
    /// Builds the trie from `(token bytes, id)` pairs; a later pair wins on equal bytes.
    fn build<'a>(tokens: impl Iterator<Item = (&'a [u8], u32)>) -> Trie {
        // First a pointer trie with unsorted child lists ...
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut token: Vec<u32> = vec![NO_TOKEN];
        for (bytes, id) in tokens {
            let mut node = 0usize;
            for &b in bytes {
                node = match children[node].iter().find(|&&(l, _)| l == b) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = children.len();
                        children.push(Vec::new());
                        token.push(NO_TOKEN);
                        children[node].push((b, child as u32));
                        child
                    }
                };
            }
            token[node] = id;
        }
        // ... then renumbered breadth-first, so that each node's sorted children are adjacent.
        let n = children.len();
        let mut order = Vec::with_capacity(n); // order[new] = old
        let mut label = Vec::with_capacity(n);
        let mut child_start = Vec::with_capacity(n + 1);
        order.push(0usize);
        label.push(0u8);
        let mut next = 0;
        while next < order.len() {
            let old = order[next];
            child_start.push(order.len() as u32);
            let mut kids = std::mem::take(&mut children[old]);
            kids.sort_unstable_by_key(|&(l, _)| l);
            for (l, child) in kids {
                order.push(child as usize);
                label.push(l);
            }
            next += 1;
        }
        child_start.push(order.len() as u32);
        let token: Vec<u32> = order.iter().map(|&old| token[old]).collect();
        let mut root = [0u32; 256];
        for node in child_start[0]..child_start[1] {
            root[label[node as usize] as usize] = node;
        }
        Trie {
            root,
            child_start,
            label,
            token,
        }
    }

    /// The child of `node` along byte `b`, if any.
    #[inline]
    fn child(&self, node: u32, b: u8) -> Option<u32> {
        if node == 0 {
            let c = self.root[b as usize];
            return (c != 0).then_some(c);
        }
        let start = self.child_start[node as usize] as usize;
        let end = self.child_start[node as usize + 1] as usize;
        let labels = &self.label[start..end];
        labels.binary_search(&b).ok().map(|i| (start + i) as u32)
    }

    /// The longest token that `src` (non-empty) starts with, as `(id, byte length)`.
    ///
    /// Walks as far as the trie has children for the input, remembering the deepest node at which
    /// a token ends. The caller guarantees that every single byte is a token.
    #[inline]
    fn longest_match(&self, src: &[u8]) -> (u32, usize) {
        let mut node = self.root[src[0] as usize];
        let mut best = (self.token[node as usize], 1);
        let mut len = 1;
        while let Some(&b) = src.get(len) {
            match self.child(node, b) {
                Some(c) => {
                    node = c;
                    len += 1;
                    let id = self.token[c as usize];
                    if id != NO_TOKEN {
                        best = (id, len);
                    }
                }
                None => break,
            }
        }
        best
    }

    /// The id of the token with exactly these bytes.
    fn exact(&self, bytes: &[u8]) -> Option<u32> {
        let mut node = 0u32;
        for &b in bytes {
            node = self.child(node, b)?;
        }
        let id = self.token[node as usize];
        (node != 0 && id != NO_TOKEN).then_some(id)
    }
}

/// One parsed vocabulary line.
#[derive(Debug, PartialEq, Eq)]
struct VocabEntry {
    /// The token id.
    id: u32,
    /// The token's bytes.
    bytes: Vec<u8>,
}

/// Parses a whole vocabulary; errors name the (1-based) line.
fn parse_vocab(text: &str) -> Result<Vec<VocabEntry>> {
    let mut entries = Vec::new();
    let mut seen: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let (id, bytes) = parse_line(line).map_err(|msg| anyhow::anyhow!("line {line_no}: {msg}"))?;
        if id == EOS_ID {
            bail!("line {line_no}: id 0 is reserved for {EOS_TEXT} and must not be in the file");
        }
        if id >= MAX_ID {
            bail!("line {line_no}: id {id} is too large (ids must be below {MAX_ID})");
        }
        if bytes.is_empty() {
            bail!("line {line_no}: token {id} is empty");
        }
        if let Some(first) = seen.insert(id, line_no) {
            bail!("line {line_no}: id {id} was already defined on line {first}");
        }
        entries.push(VocabEntry { id, bytes });
    }
    if entries.is_empty() {
        bail!("the vocabulary is empty");
    }
    Ok(entries)
}

/// Parses `<id> <python literal> <byte length>`, checking the length against the literal.
///
/// The literal is everything between the first and the last space, as in the reference.
fn parse_line(line: &str) -> Result<(u32, Vec<u8>), String> {
    let line = line.trim_end_matches(['\n', '\r', ' ', '\t']);
    let shape = || format!("expected `<id> <python literal> <byte length>`, found `{line}`");
    let first = line.find(' ').ok_or_else(shape)?;
    let last = line.rfind(' ').ok_or_else(shape)?;
    if last <= first {
        return Err(shape());
    }
    let id_text = &line[..first];
    let id: u32 = id_text
        .parse()
        .map_err(|_| format!("token id `{id_text}` is not a non-negative integer"))?;
    let len_text = &line[last + 1..];
    let len: usize = len_text
        .parse()
        .map_err(|_| format!("byte length `{len_text}` is not a non-negative integer"))?;
    let bytes = parse_python_literal(&line[first + 1..last])?;
    if bytes.len() != len {
        return Err(format!(
            "literal {} encodes to {} byte(s) but the line says {len}",
            &line[first + 1..last],
            bytes.len()
        ));
    }
    Ok((id, bytes))
}

/// Evaluates a one-line Python `str` or `bytes` literal to bytes (a `str` as UTF-8).
///
/// Accepts an optional `b`/`B` (bytes) or `u`/`U` prefix, single or double quotes, and every
/// Python escape: `\\ \' \" \a \b \f \n \r \t \v`, octal `\o`..`\ooo`, `\xHH`, and in `str`
/// literals `\uHHHH` and `\UHHHHHHHH`. Unknown escapes keep their backslash, as in Python
/// (that includes `\u` in a bytes literal). Raw, f- and triple-quoted literals and `\N{...}`
/// are rejected.
fn parse_python_literal(lit: &str) -> Result<Vec<u8>, String> {
    let (is_bytes, quoted) = match lit.as_bytes().first() {
        Some(b'b' | b'B') => (true, &lit[1..]),
        Some(b'u' | b'U') => (false, &lit[1..]),
        _ => (false, lit),
    };
    let quote = match quoted.chars().next() {
        Some(q @ ('\'' | '"')) => q,
        _ => return Err(format!("`{lit}` is not a quoted Python str or bytes literal")),
    };
    if quoted.len() < 2 || !quoted.ends_with(quote) {
        return Err(format!("literal `{lit}` has no closing {quote}"));
    }
    let body = &quoted[1..quoted.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    let push_char = |out: &mut Vec<u8>, c: char| {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    };
    while let Some(c) = chars.next() {
        if c == quote {
            return Err(format!("literal `{lit}` has an unescaped {quote} inside"));
        }
        if c != '\\' {
            if is_bytes && !c.is_ascii() {
                return Err(format!(
                    "bytes literal `{lit}` holds the non-ASCII character {c:?}"
                ));
            }
            push_char(&mut out, c);
            continue;
        }
        let Some(e) = chars.next() else {
            return Err(format!("literal `{lit}` has no closing {quote} (it is escaped)"));
        };
        let simple = match e {
            '\\' => Some(b'\\'),
            '\'' => Some(b'\''),
            '"' => Some(b'"'),
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0C),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0B),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        match e {
            '0'..='7' => {
                let mut value = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.peek().and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            value = value * 8 + d;
                            chars.next();
                        }
                        None => break,
                    }
                }
                push_code(&mut out, value, is_bytes, lit)?;
            }
            'x' => {
                let value = take_hex(&mut chars, 2, lit, 'x')?;
                push_code(&mut out, value, is_bytes, lit)?;
            }
            'u' | 'U' if !is_bytes => {
                let digits = if e == 'u' { 4 } else { 8 };
                let value = take_hex(&mut chars, digits, lit, e)?;
                push_code(&mut out, value, false, lit)?;
            }
            'N' if !is_bytes => {
                return Err(format!(
                    "literal `{lit}` uses a \\N{{...}} escape, which is not supported"
                ));
            }
            other => {
                // Python keeps an unknown escape as it stands, backslash included.
                if is_bytes && !other.is_ascii() {
                    return Err(format!(
                        "bytes literal `{lit}` holds the non-ASCII character {other:?}"
                    ));
                }
                out.push(b'\\');
                push_char(&mut out, other);
            }
        }
    }
    Ok(out)
}

/// Reads exactly `n` hex digits of a `\x`/`\u`/`\U` escape.
fn take_hex(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    n: usize,
    lit: &str,
    kind: char,
) -> Result<u32, String> {
    let mut value = 0u32;
    for _ in 0..n {
        let d = chars
            .next()
            .and_then(|c| c.to_digit(16))
            .ok_or_else(|| format!("literal `{lit}` has a \\{kind} escape without {n} hex digits"))?;
        value = value * 16 + d;
    }
    Ok(value)
}

/// Appends an escaped code: a byte in a bytes literal, a code point (as UTF-8) in a str literal.
fn push_code(out: &mut Vec<u8>, value: u32, is_bytes: bool, lit: &str) -> Result<(), String> {
    if is_bytes {
        let b = u8::try_from(value).map_err(|_| format!("bytes literal `{lit}` has an escape above 0xFF"))?;
        out.push(b);
    } else {
        let c = char::from_u32(value)
            .ok_or_else(|| format!("literal `{lit}` escapes U+{value:X}, which is not a character"))?;
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary with all 256 single bytes (ids 1..=256, written as the real file writes
    /// them) followed by `extra` lines.
    fn byte_vocab(extra: &str) -> String {
        let mut text = String::new();
        for b in 0..=255u32 {
            let lit = if b < 0x80 {
                match b as u8 {
                    b'\\' => "'\\\\'".to_string(),
                    b'\'' => "\"'\"".to_string(),
                    b'\n' => "'\\n'".to_string(),
                    c if c.is_ascii_graphic() || c == b' ' => format!("'{}'", c as char),
                    _ => format!("'\\x{b:02x}'"),
                }
            } else {
                format!("b'\\x{b:02x}'")
            };
            text.push_str(&format!("{} {lit} 1\n", b + 1));
        }
        text.push_str(extra);
        text
    }

    fn lit(s: &str) -> Vec<u8> {
        parse_python_literal(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn literals_follow_python_escapes() {
        assert_eq!(lit(r"'\x00'"), vec![0]);
        assert_eq!(lit(r"'\xa0'"), "\u{a0}".as_bytes());
        assert_eq!(lit(r"b'\xa0'"), vec![0xA0]);
        assert_eq!(lit(r"b'\xe4\xbd'"), vec![0xE4, 0xBD]);
        assert_eq!(lit(r"'\n\t\r\\'"), b"\n\t\r\\");
        assert_eq!(lit(r#"'\'\"'"#), b"'\"");
        assert_eq!(lit(r#""'s""#), b"'s");
        assert_eq!(lit(r"'\a\b\f\v'"), vec![7, 8, 12, 11]);
        assert_eq!(lit(r"'\0'"), vec![0]);
        assert_eq!(lit(r"'\101\7x'"), b"A\x07x");
        assert_eq!(lit(r"'\u4f60'"), "你".as_bytes());
        assert_eq!(lit(r"'\U0001F600'"), "😀".as_bytes());
        assert_eq!(lit(r"b'\u4f60'"), b"\\u4f60");
        assert_eq!(lit(r"'\q'"), b"\\q");
        assert_eq!(lit("'你好 '"), "你好 ".as_bytes());
        assert_eq!(lit("u'x'"), b"x");
        for bad in [
            "x",
            "'abc",
            "'a'b'",
            r"'\'",
            r"'\x4'",
            r"'\ud800'",
            r"'\N{DASH}'",
            "b'你'",
            "r'x'",
            r"b'\777'",
            "'''a'''",
        ] {
            assert!(parse_python_literal(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn lines_are_checked_and_errors_name_the_line() {
        assert_eq!(parse_line(r"1 '\x00' 1").unwrap(), (1, vec![0]));
        assert_eq!(parse_line("1 '\\x00' 1\n").unwrap(), (1, vec![0]));
        assert_eq!(parse_line("33 ' ' 1").unwrap(), (33, vec![b' ']));
        assert_eq!(parse_line("9 'a b' 3\r").unwrap(), (9, b"a b".to_vec()));
        let good = "1 'a' 1\n2 'b' 1\n";
        assert_eq!(parse_vocab(good).unwrap().len(), 2);
        for (bad, what) in [
            ("3 'c' 2\n", "1 byte(s) but the line says 2"),
            ("x 'c' 1\n", "token id `x`"),
            ("3 'c' -1\n", "byte length `-1`"),
            ("3 'c'\n", "expected `<id>"),
            ("3\n", "expected `<id>"),
            ("\n", "expected `<id>"),
            ("3 c 1\n", "not a quoted"),
            ("3 'c 1\n", "no closing"),
            ("3 b'\u{e9}' 2\n", "non-ASCII"),
            ("1 'a' 1\n", "already defined on line 1"),
            ("0 'z' 1\n", "reserved"),
            ("3 '' 0\n", "empty"),
        ] {
            let msg = format!("{:#}", parse_vocab(&format!("{good}{bad}")).unwrap_err());
            assert!(msg.contains("line 3") && msg.contains(what), "{bad:?}: {msg}");
        }
        assert!(parse_vocab("").is_err());
    }

    #[test]
    fn loading_names_the_origin_and_needs_every_byte() {
        let msg = format!(
            "{:#}",
            WorldTokenizer::from_vocab_text("1 'a' 1\n2 'b' 2\n", "tiny.txt").unwrap_err()
        );
        assert!(msg.contains("tiny.txt") && msg.contains("line 2"), "{msg}");
        let msg = format!(
            "{:#}",
            WorldTokenizer::from_vocab_text("1 'a' 1\n", "tiny.txt").unwrap_err()
        );
        assert!(msg.contains("0x00") && msg.contains("tiny.txt"), "{msg}");
    }

    #[test]
    fn encode_is_greedy_longest_match() {
        // "abcd" is a token but "abc" is not: "abc" must come out as "ab" + "c".
        let vocab = byte_vocab("300 'ab' 2\n301 'abcd' 4\n302 '\\u4f60' 3\n303 b'\\xe4\\xbd' 2\n");
        let tok = WorldTokenizer::from_vocab_text(&vocab, "test").unwrap();
        assert_eq!(tok.vocab_size(), 320);
        let (a, b, c, d) = (98, 99, 100, 101);
        assert_eq!(tok.encode("abc"), vec![300, c]);
        assert_eq!(tok.encode("abcd"), vec![301]);
        assert_eq!(tok.encode("abcde"), vec![301, 102]);
        assert_eq!(tok.encode("aabab"), vec![a, 300, 300]);
        assert_eq!(tok.encode("b"), vec![b]);
        assert_eq!(tok.encode("d"), vec![d]);
        assert_eq!(tok.encode("你a"), vec![302, a]);
        assert_eq!(tok.encode("你"), vec![302]);
        assert_eq!(tok.encode(""), Vec::<u32>::new());
        // "你" without its last byte, then another character: the two-byte token is used.
        assert_eq!(tok.encode("佢"), vec![303, 0xA2 + 1]);
        assert_eq!(tok.decode(&[303], false).unwrap(), "\u{FFFD}");
        assert_eq!(tok.decode(&[303, 0xA0 + 1], false).unwrap(), "你");
        assert_eq!(tok.decode(&[0, 300], false).unwrap(), "<|endoftext|>ab");
        assert_eq!(tok.decode(&[0, 300], true).unwrap(), "ab");
        assert_eq!(tok.decode(&[310], true).unwrap(), "");
        assert!(tok.decode(&[320], true).is_err());
    }

    #[test]
    fn token_strings_round_trip() {
        let vocab = byte_vocab("300 'ab' 2\n301 b'\\xe4\\xbd' 2\n302 'ab' 2\n");
        let tok = WorldTokenizer::from_vocab_text(&vocab, "test").unwrap();
        assert_eq!(tok.id_to_token(301).as_deref(), Some("<0xE4><0xBD>"));
        assert_eq!(tok.token_to_id("<0xE4><0xBD>"), Some(301));
        assert_eq!(tok.token_to_id("<0x61>"), Some(98));
        assert_eq!(tok.id_to_token(0).as_deref(), Some("<|endoftext|>"));
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.id_to_token(310), None);
        assert_eq!(tok.id_to_token(5000), None);
        assert_eq!(tok.token_to_id("abc"), None);
        assert_eq!(tok.token_to_id(""), None);
        assert_eq!(tok.token_to_id("<0xE4"), None);
        // Equal bytes: the later id wins, as in the reference's dictionary.
        assert_eq!(tok.token_to_id("ab"), Some(302));
        assert_eq!(tok.encode("ab"), vec![302]);
        for id in 1..=256 {
            let s = tok.id_to_token(id).unwrap();
            assert_eq!(tok.token_to_id(&s), Some(id), "{s:?}");
        }
    }

    #[test]
    fn embedded_vocab_parses() {
        let tok = WorldTokenizer::embedded();
        assert_eq!(tok.vocab_size(), 65536);
        assert_eq!(tok.bytes.len(), 373_358);
        assert_eq!(tok.token_bytes(1), b"\x00");
        assert_eq!(tok.token_bytes(256), b"\xff");
        assert_eq!(tok.token_bytes(65529), [b' '; 128]);
        assert!(tok.token_bytes(65530).is_empty());
        assert_eq!(EMBEDDED_VOCAB.lines().count(), 65529);
    }
}
