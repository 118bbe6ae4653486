//! Tokenizers: text to token ids and back, and the special tokens a model directory declares.
//!
//! [`Tokenizer`] is the public face. Its backend is either a Hugging Face `tokenizer.json`
//! ([`hf`]) or the RWKV "World" trie tokenizer ([`world`], vocabulary embedded in the library),
//! arms of the private `Backend` enum behind one API. The module also resolves
//! [`SpecialTokens`] from `tokenizer_config.json`, `config.json` and `generation_config.json`,
//! and offers [`DecodeStream`] for UTF-8-safe incremental detokenizing. Chat templates live in
//! [`crate::chat`]; this module never renders prompts, it only tokenizes them.

mod gguf;
mod hf;
pub mod stream;
mod world;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use stream::DecodeStream;

/// The special tokens of a model, resolved from its tokenizer and config files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence id, when the model has one.
    pub bos: Option<u32>,
    /// Every id that ends generation, deduplicated, the tokenizer's own EOS first.
    pub eos: Vec<u32>,
    /// Text of the BOS token (e.g. `<s>`), as chat templates see it in `bos_token`.
    pub bos_text: Option<String>,
    /// Text of the EOS token (e.g. `</s>`), as chat templates see it in `eos_token`.
    pub eos_text: Option<String>,
    /// Whether encoding a prompt puts BOS in front of it by default.
    pub add_bos: bool,
}

/// The implementation behind a [`Tokenizer`].
enum Backend {
    /// A Hugging Face `tokenizer.json` (boxed: it is far larger than the other arm).
    Hf(Box<hf::HfTokenizer>),
    /// The RWKV World tokenizer (shared: the embedded one is parsed once per process).
    World(Arc<world::WorldTokenizer>),
    /// A GGUF file's SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`).
    Spm(Box<gguf::SpmTokenizer>),
}

/// Names accepted by [`Tokenizer::from_name`].
const BUILTIN_NAMES: &[&str] = &["world"];

/// A tokenizer together with the model's special tokens.
pub struct Tokenizer {
    /// The encoder/decoder.
    backend: Backend,
    /// Special tokens resolved at load time.
    specials: SpecialTokens,
    /// Whether `tokenizer_config.json` asks for EOS after encoded text (`add_eos_token`).
    add_eos: bool,
    /// The longest token's text in bytes (computed on first use).
    longest: std::sync::OnceLock<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .finish()
    }
}

impl Tokenizer {
    /// The RWKV World tokenizer (vocabulary `rwkv_vocab_v20230424.txt`, embedded).
    ///
    /// Specials: no BOS, EOS `<|endoftext|>` = id 0, nothing added when encoding. The id space
    /// is 65536 (the models' embedding rows; ids 65530..=65535 have no token). Encoding never
    /// produces id 0, even for the text `<|endoftext|>`. Decoding is lossy: bytes that are not
    /// valid UTF-8 become U+FFFD. Tokens that are not valid UTF-8 on their own (pieces of a
    /// character) have `<0xHH>` names, one group per byte, in `id_to_token`/`token_to_id`.
    pub fn world() -> Tokenizer {
        Tokenizer::from_world(world::WorldTokenizer::embedded())
    }

    /// Wraps a World tokenizer with its fixed special tokens.
    fn from_world(tok: Arc<world::WorldTokenizer>) -> Tokenizer {
        Tokenizer {
            backend: Backend::World(tok),
            specials: SpecialTokens {
                bos: None,
                eos: vec![world::EOS_ID],
                bos_text: None,
                eos_text: Some(world::EOS_TEXT.to_string()),
                add_bos: false,
            },
            add_eos: false,
            longest: Default::default(),
        }
    }

    /// A tokenizer built into the library, by name; today only `"world"` ([`Tokenizer::world`]).
    pub fn from_name(name: &str) -> Result<Tokenizer> {
        if name.eq_ignore_ascii_case("world") {
            return Ok(Tokenizer::world());
        }
        bail!(
            "unknown built-in tokenizer `{name}`; known names: {} (to load a tokenizer.json or a \
             World vocabulary file, give its path instead)",
            BUILTIN_NAMES.join(", ")
        )
    }

    /// The names [`Tokenizer::from_name`] accepts.
    pub fn builtin_names() -> &'static [&'static str] {
        BUILTIN_NAMES
    }

    /// Loads a tokenizer file: a World vocabulary (first line like `1 '\x00' 1`; it behaves like
    /// [`Tokenizer::world`], with an id space of its largest id plus one, padded to a multiple of
    /// 64) or a `tokenizer.json`, whose BOS is whatever its post-processor prepends and whose EOS
    /// is unknown.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if world::WorldTokenizer::is_vocab_file(path) {
            let tok = world::WorldTokenizer::from_file(path)?;
            return Ok(Tokenizer::from_world(Arc::new(tok)));
        }
        let hf = hf::HfTokenizer::from_file(path)?;
        let bos = hf.post_processor_bos();
        let specials = SpecialTokens {
            bos,
            eos: Vec::new(),
            bos_text: bos.and_then(|id| hf.id_to_token(id)),
            eos_text: None,
            add_bos: bos.is_some(),
        };
        Ok(Tokenizer {
            backend: Backend::Hf(Box::new(hf)),
            specials,
            add_eos: false,
            longest: Default::default(),
        })
    }

    /// The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, tokenizing as
    /// llama.cpp does (SentencePiece `llama` or byte-level BPE `gpt2` vocabularies; see
    /// `tokenizer/gguf.rs`). EOS ids are the file's EOS plus its end-of-turn tokens.
    pub fn from_gguf(file: &crate::loader::gguf::GgufFile) -> Result<Tokenizer> {
        let v = gguf::GgufVocab::read(file)?;
        let text = |id: Option<u32>| id.map(|i| String::from_utf8_lossy(&v.tokens[i as usize]).into_owned());
        let mut eos: Vec<u32> = v.eos.into_iter().collect();
        for &e in &v.eot {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let specials = SpecialTokens {
            bos: v.bos,
            eos,
            bos_text: text(v.bos),
            eos_text: text(v.eos),
            add_bos: v.add_bos && v.bos.is_some(),
        };
        let backend = match v.model.as_str() {
            "llama" => Backend::Spm(Box::new(gguf::SpmTokenizer::new(
                &v,
                &file.path.display().to_string(),
            )?)),
            _ => {
                let json =
                    gguf::bpe_tokenizer_json(&v).with_context(|| format!("{}", file.path.display()))?;
                let bytes = serde_json::to_vec(&json)?;
                Backend::Hf(Box::new(hf::HfTokenizer::from_bytes(
                    &bytes,
                    file.path.display().to_string(),
                )?))
            }
        };
        Ok(Tokenizer {
            backend,
            specials,
            add_eos: v.add_eos,
            longest: Default::default(),
        })
    }

    /// Loads `dir/tokenizer.json` and resolves special tokens from the directory's configs.
    ///
    /// A directory without `tokenizer.json` is an error: RWKV World checkpoints ship none, and
    /// the caller, which knows the architecture, should use [`Tokenizer::world`] for them.
    ///
    /// `config` is the model's parsed `config.json` when the caller already has it; when it is
    /// `None`, `dir/config.json` is read if present. `tokenizer_config.json` and
    /// `generation_config.json` are optional; a malformed one is an error naming the file.
    pub fn from_model_dir(dir: &Path, config: Option<&Value>) -> Result<Tokenizer> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "no tokenizer.json in model directory {} (the tokenizer is needed to encode prompts; \
                 RWKV World models use the built-in World tokenizer)",
                dir.display()
            );
        }
        let hf = hf::HfTokenizer::from_file(&tokenizer_path)?;

        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_json_file(&tok_cfg_path)?;
        let gen_cfg_path = dir.join("generation_config.json");
        let gen_cfg = read_json_file(&gen_cfg_path)?;
        let cfg_path = dir.join("config.json");
        let read_cfg;
        let cfg = match config {
            Some(c) => Some(c),
            None => {
                read_cfg = read_json_file(&cfg_path)?;
                read_cfg.as_ref()
            }
        };

        let mut sources = SpecialSources::default();
        if let Some(tc) = &tok_cfg {
            sources.bos_text = token_text_field(tc, &tok_cfg_path, "bos_token")?;
            sources.eos_text = token_text_field(tc, &tok_cfg_path, "eos_token")?;
            sources.add_bos = bool_field(tc, &tok_cfg_path, "add_bos_token")?;
            sources.add_eos = bool_field(tc, &tok_cfg_path, "add_eos_token")?;
        }
        if let Some(gc) = &gen_cfg {
            sources.gen_bos = ids_field(gc, &gen_cfg_path, "bos_token_id")?;
            sources.gen_eos = ids_field(gc, &gen_cfg_path, "eos_token_id")?;
        }
        if let Some(c) = cfg {
            sources.cfg_bos = config_ids_field(c, &cfg_path, "bos_token_id")?;
            sources.cfg_eos = config_ids_field(c, &cfg_path, "eos_token_id")?;
        }
        let specials = resolve_specials(&hf, &sources);
        Ok(Tokenizer {
            backend: Backend::Hf(Box::new(hf)),
            specials,
            add_eos: sources.add_eos.unwrap_or(false),
            longest: Default::default(),
        })
    }

    /// The model's special tokens.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// Whether `tokenizer_config.json` sets `add_eos_token` (never applied to chat prompts).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Encodes `text`; with `add_special_tokens` false nothing is added around it.
    ///
    /// With `add_special_tokens` true the `tokenizer.json` post-processor runs, and the BOS
    /// decision follows [`SpecialTokens::add_bos`] (which `tokenizer_config.json` may override).
    /// The World tokenizer adds nothing either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::World(w) => Ok(w.encode(text)),
            Backend::Spm(spm) => {
                let mut ids = spm.encode(text);
                if add_special_tokens {
                    if self.specials.add_bos {
                        self.prepend_bos(&mut ids);
                    }
                    if let (true, Some(&eos)) = (self.add_eos, self.specials.eos.first()) {
                        ids.push(eos);
                    }
                }
                Ok(ids)
            }
            Backend::Hf(hf) => {
                let mut ids = hf.encode(text, add_special_tokens)?;
                if add_special_tokens {
                    let pp_bos = hf.post_processor_bos();
                    if !self.specials.add_bos && pp_bos.is_some() && ids.first() == pp_bos.as_ref() {
                        ids.remove(0);
                    } else if self.specials.add_bos && pp_bos.is_none() {
                        self.prepend_bos(&mut ids);
                    }
                }
                Ok(ids)
            }
        }
    }

    /// Tokenizes a rendered chat prompt: no special tokens added, then BOS prepended when the
    /// tokenizer adds BOS by default and the prompt does not already start with it.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(rendered, false)?;
        if self.specials.add_bos {
            self.prepend_bos(&mut ids);
        }
        Ok(ids)
    }

    /// Encodes `text` with its special tokens read as text: a control token's text in it
    /// becomes ordinary pieces, never the control token (user-defined tokens still match).
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::World(w) => Ok(w.encode(text)),
            Backend::Spm(spm) => Ok(spm.encode_as_text(text)),
            Backend::Hf(hf) => hf.encode_as_text(text),
        }
    }

    /// The texts of the control tokens, with their ids (what only markup may produce).
    pub fn special_token_texts(&self) -> Vec<(String, u32)> {
        match &self.backend {
            Backend::World(_) => Vec::new(),
            Backend::Spm(spm) => spm.special_tokens(),
            Backend::Hf(hf) => hf.special_tokens(),
        }
    }

    /// Tokenizes a rendered chat prompt whose byte ranges `text_spans` (the messages' contents)
    /// are text: a control token's text inside them is tokenized as text, so only the
    /// template's own markup produces control tokens. Then BOS, as [`Tokenizer::encode_chat`].
    ///
    /// Where no content holds a control token's text (almost always) this is exactly
    /// `encode_chat`; otherwise the prompt is tokenized in pieces around each such occurrence.
    pub fn encode_chat_spans(
        &self,
        rendered: &str,
        text_spans: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let specials = self.special_token_texts();
        let mut cuts: Vec<std::ops::Range<usize>> = Vec::new();
        if !specials.is_empty() && !text_spans.is_empty() {
            let ac = aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(specials.iter().map(|(t, _)| t.as_str()))
                .map_err(|e| anyhow::anyhow!("building the special-token matcher: {e}"))?;
            for m in ac.find_iter(rendered) {
                if text_spans.iter().any(|s| m.start() < s.end && s.start < m.end()) {
                    cuts.push(m.start()..m.end());
                }
            }
        }
        if cuts.is_empty() {
            return self.encode_chat(rendered);
        }
        let mut ids = Vec::new();
        let mut at = 0;
        for c in &cuts {
            if c.start > at {
                ids.extend(self.encode(&rendered[at..c.start], false)?);
            }
            ids.extend(self.encode_as_text(&rendered[c.clone()])?);
            at = c.end;
        }
        if at < rendered.len() {
            ids.extend(self.encode(&rendered[at..], false)?);
        }
        if self.specials.add_bos {
            self.prepend_bos(&mut ids);
        }
        Ok(ids)
    }

    /// Puts BOS in front of `ids` unless it is already there.
    fn prepend_bos(&self, ids: &mut Vec<u32>) {
        if let Some(bos) = self.specials.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }

    /// Decodes `ids` to text; an id outside the vocabulary is an error.
    ///
    /// Bytes that do not form valid UTF-8 come out as U+FFFD (lossy decoding).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(hf) => hf.decode(ids, skip_special_tokens),
            Backend::World(w) => w.decode(ids, skip_special_tokens),
            Backend::Spm(spm) => spm.decode(ids, skip_special_tokens),
        }
    }

    /// An incremental decoder for streaming generated ids as text.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream::new(self, skip_special_tokens)
    }

    /// The byte-level decoder for streaming, when the backend's text is its ids' bytes joined.
    pub(crate) fn byte_decoder(&self) -> Option<&dyn stream::ByteDecode> {
        match &self.backend {
            Backend::Hf(_) | Backend::Spm(_) => None,
            Backend::World(w) => Some(w.as_ref()),
        }
    }

    /// Size of the id space (vocabulary plus added tokens; 65536 for the World tokenizer).
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(hf) => hf.vocab_size(),
            Backend::World(w) => w.vocab_size(),
            Backend::Spm(spm) => spm.vocab_size(),
        }
    }

    /// An upper bound on the bytes of text one token stands for (the longest vocabulary entry as
    /// stored, which is never shorter than the text it decodes to): a text of `n` bytes has at
    /// least `n / max_token_bytes()` tokens, which bounds a prompt before it is tokenized.
    pub fn max_token_bytes(&self) -> usize {
        *self.longest.get_or_init(|| {
            (0..self.vocab_size() as u32)
                .filter_map(|id| self.id_to_token(id).map(|t| t.len()))
                .max()
                .unwrap_or(1)
                .max(1)
        })
    }

    /// The id of a token string, if the vocabulary has it (World: see [`Tokenizer::world`]).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(hf) => hf.token_to_id(s),
            Backend::World(w) => w.token_to_id(s),
            Backend::Spm(spm) => spm.token_to_id(s),
        }
    }

    /// The vocabulary string of an id (e.g. `▁Hello`, `<0x0A>`), if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(hf) => hf.id_to_token(id),
            Backend::World(w) => w.id_to_token(id),
            Backend::Spm(spm) => spm.id_to_token(id),
        }
    }
}

/// What the config files say about special tokens, before resolution against the vocabulary.
#[derive(Debug, Default)]
struct SpecialSources {
    /// `tokenizer_config.json` `bos_token`.
    bos_text: Option<String>,
    /// `tokenizer_config.json` `eos_token`.
    eos_text: Option<String>,
    /// `tokenizer_config.json` `add_bos_token`.
    add_bos: Option<bool>,
    /// `tokenizer_config.json` `add_eos_token`.
    add_eos: Option<bool>,
    /// `generation_config.json` `bos_token_id`.
    gen_bos: Vec<u32>,
    /// `generation_config.json` `eos_token_id`.
    gen_eos: Vec<u32>,
    /// `config.json` `bos_token_id`.
    cfg_bos: Vec<u32>,
    /// `config.json` `eos_token_id`.
    cfg_eos: Vec<u32>,
}

/// Resolves special tokens: token texts first, then generation_config, then config.json.
fn resolve_specials(hf: &hf::HfTokenizer, src: &SpecialSources) -> SpecialTokens {
    let bos = src
        .bos_text
        .as_deref()
        .and_then(|t| hf.token_to_id(t))
        .or_else(|| src.gen_bos.first().copied())
        .or_else(|| src.cfg_bos.first().copied())
        .or_else(|| hf.post_processor_bos());
    let bos_text = src
        .bos_text
        .clone()
        .or_else(|| bos.and_then(|id| hf.id_to_token(id)));

    let mut eos: Vec<u32> = Vec::new();
    let text_eos = src.eos_text.as_deref().and_then(|t| hf.token_to_id(t));
    for id in text_eos
        .into_iter()
        .chain(src.gen_eos.iter().copied())
        .chain(src.cfg_eos.iter().copied())
    {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let eos_text = src
        .eos_text
        .clone()
        .or_else(|| eos.first().and_then(|&id| hf.id_to_token(id)));

    let add_bos = src.add_bos.unwrap_or(hf.post_processor_bos().is_some()) && bos.is_some();
    SpecialTokens {
        bos,
        eos,
        bos_text,
        eos_text,
        add_bos,
    }
}

/// Reads and parses a JSON file; a missing file is `None`, unreadable or malformed is an error.
pub(crate) fn read_json_file(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let value = serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))?;
    Ok(Some(value))
}

/// A special-token field given as a string or as an object `{"content": ...}`; null is `None`.
pub(crate) fn token_text_field(json: &Value, file: &Path, field: &str) -> Result<Option<String>> {
    match json.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!(
                "{}: field `{field}` is an object without a string `content`",
                file.display()
            ),
        },
        Some(other) => bail!(
            "{}: field `{field}` must be a string or an object with `content`, found {other}",
            file.display()
        ),
    }
}

/// A boolean field; absent or null is `None`.
fn bool_field(json: &Value, file: &Path, field: &str) -> Result<Option<bool>> {
    match json.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!(
            "{}: field `{field}` must be true or false, found {other}",
            file.display()
        ),
    }
}

/// A token-id field given as an integer or a list of integers; absent or null is empty.
fn ids_field(json: &Value, file: &Path, field: &str) -> Result<Vec<u32>> {
    let parse_one = |v: &Value| -> Result<u32> {
        v.as_u64().and_then(|n| u32::try_from(n).ok()).with_context(|| {
            format!(
                "{}: field `{field}` must hold token ids (non-negative integers), found {v}",
                file.display()
            )
        })
    };
    match json.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(parse_one).collect(),
        Some(v) => Ok(vec![parse_one(v)?]),
    }
}

/// Like [`ids_field`] for `config.json`, falling back to its nested `text_config`.
fn config_ids_field(json: &Value, file: &Path, field: &str) -> Result<Vec<u32>> {
    let top = ids_field(json, file, field)?;
    if !top.is_empty() {
        return Ok(top);
    }
    match json.get("text_config") {
        Some(text) if text.is_object() => {
            ids_field(text, file, field).with_context(|| format!("{}: in `text_config`", file.display()))
        }
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_text_accepts_string_object_and_null() {
        let f = Path::new("tokenizer_config.json");
        let v = json!({"a": "<s>", "b": {"content": "</s>", "lstrip": false}, "c": null});
        assert_eq!(token_text_field(&v, f, "a").unwrap().as_deref(), Some("<s>"));
        assert_eq!(token_text_field(&v, f, "b").unwrap().as_deref(), Some("</s>"));
        assert_eq!(token_text_field(&v, f, "c").unwrap(), None);
        assert_eq!(token_text_field(&v, f, "missing").unwrap(), None);
        let err = token_text_field(&json!({"a": 3}), f, "a").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tokenizer_config.json") && msg.contains("`a`"),
            "{msg}"
        );
    }

    #[test]
    fn ids_accept_int_list_and_reject_garbage() {
        let f = Path::new("config.json");
        let v = json!({"one": 2, "many": [1, 106], "neg": -1, "text": "x"});
        assert_eq!(ids_field(&v, f, "one").unwrap(), vec![2]);
        assert_eq!(ids_field(&v, f, "many").unwrap(), vec![1, 106]);
        assert!(ids_field(&v, f, "missing").unwrap().is_empty());
        assert!(ids_field(&v, f, "neg").is_err());
        let msg = ids_field(&v, f, "text").unwrap_err().to_string();
        assert!(msg.contains("config.json") && msg.contains("`text`"), "{msg}");
    }

    #[test]
    fn config_ids_fall_back_to_text_config() {
        let f = Path::new("config.json");
        let v = json!({"text_config": {"eos_token_id": [1, 106]}});
        assert_eq!(config_ids_field(&v, f, "eos_token_id").unwrap(), vec![1, 106]);
    }

    #[test]
    fn malformed_json_names_the_file() {
        let dir = std::env::temp_dir().join(format!("gyre-tok-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("generation_config.json");
        std::fs::write(&path, "{ not json").unwrap();
        let msg = format!("{:#}", read_json_file(&path).unwrap_err());
        assert!(msg.contains("generation_config.json"), "{msg}");
        assert!(read_json_file(&dir.join("absent.json")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
