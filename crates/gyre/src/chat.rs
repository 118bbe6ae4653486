//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! [`ChatTemplate`] renders Hugging Face Jinja chat templates with minijinja, set up the way
//! `transformers` sets up its jinja2 environment for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, the trailing newline of the template dropped, and the globals and filters
//! that templates rely on (`raise_exception`, `strftime_now`, a `tojson` that writes what Python's
//! `json.dumps` writes, Python string and dict methods). It also carries built-in templates for
//! families whose checkpoints ship none ([`BuiltinTemplate`]). This module renders text only:
//! tokenizing the prompt (and the BOS rule) belongs to [`crate::tokenizer`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{read_json_file, token_text_field, SpecialTokens, Tokenizer};

/// One chat turn: who spoke (`system`, `user`, `assistant`) and what was said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The speaker's role.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Chat formats built into gyre for checkpoints that ship no template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    /// Upstage SOLAR instruct: `### System:` / `### User:` / `### Assistant:` sections.
    Solar,
    /// Gemma (and RecurrentGemma) instruct: `<start_of_turn>user ... <end_of_turn>` turns.
    Gemma,
    /// RWKV World chat: `User: ...\n\nAssistant: ...\n\n`, prompting with `Assistant:`.
    Rwkv,
}

/// The error a template raises through `raise_exception(message)`; it displays as `message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateRaised {
    /// The message the template passed to `raise_exception`.
    pub message: String,
    /// Where the template came from (file and field, or the built-in's name).
    pub template: String,
}

/// The marker attached to the minijinja error that `raise_exception` returns.
#[derive(Debug)]
struct RaisedMarker(String);

impl std::fmt::Display for RaisedMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedMarker {}

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    /// The environment holding the compiled template under the name `source`.
    env: Environment<'static>,
    /// Where the template came from, e.g. `/m/tokenizer_config.json (chat_template)`.
    source: String,
    /// Token strings exposed as globals (`bos_token`, `eos_token`, `unk_token`, ...).
    tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// SOLAR instruct, written to render what Upstage's template renders: an empty system message
/// is dropped, assistant turns get no separator, the prompt ends with `### Assistant:\n`.
const SOLAR_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{% if message['role'] == 'system' %}",
    "{% if message['content'] %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}{% endif %}",
    "{% elif message['role'] == 'user' %}",
    "{{ '### User:\\n' + message['content'] + '\\n\\n' }}",
    "{% elif message['role'] == 'assistant' %}",
    "{{ '### Assistant:\\n' + message['content'] }}",
    "{% endif %}",
    "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}",
    "{% endfor %}",
);

/// Gemma instruct: BOS, alternating user/model turns with trimmed content, no system role.
const GEMMA_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{% for message in messages %}",
    "{% if message['role'] == 'system' %}",
    "{{ raise_exception('Gemma has no system role: put the instructions in the first user message') }}",
    "{% endif %}",
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% endif %}",
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}",
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
);

/// RWKV World chat: `Role: text` blocks separated by blank lines, text normalised so that it
/// holds no blank line of its own; the generation prompt is `Assistant:` with no space.
const RWKV_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{% if message['role'] == 'system' %}{% set speaker = 'System' %}",
    "{% elif message['role'] == 'user' %}{% set speaker = 'User' %}",
    "{% elif message['role'] == 'assistant' %}{% set speaker = 'Assistant' %}",
    "{% else %}{{ raise_exception('RWKV chat has no role ' ~ message['role'] ~ ': use system, user or assistant') }}",
    "{% endif %}",
    "{{ speaker + ': ' + (message['content'] | rwkv_text) + '\\n\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
);

/// Instructions one render may run (minijinja fuel: every instruction costs one, every 64
/// bytes produced one more). Real chat templates take a few hundred per message; a hostile one
/// stops within a fraction of a second.
const RENDER_FUEL: u64 = 20_000_000;

/// Bytes any render may write, plus 8 per byte of the conversation.
const RENDER_OUTPUT_FLOOR: usize = 1 << 20;

/// An output buffer that refuses to grow past `cap` (the render then stops with an error).
struct CappedWriter {
    bytes: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.bytes
                .extend_from_slice(&buf[..self.cap + 1 - self.bytes.len().min(self.cap + 1)]);
            return Err(std::io::Error::other("the chat template's output is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles a template; `source` names where it came from (used in every error message).
    pub fn new(
        template: &str,
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate> {
        let mut tokens = BTreeMap::new();
        if let Some(b) = bos_token {
            tokens.insert("bos_token".to_string(), b.to_string());
        }
        if let Some(e) = eos_token {
            tokens.insert("eos_token".to_string(), e.to_string());
        }
        Self::compile(template, source, tokens, false)
    }

    /// Reads the template of a model directory, or `None` when it has none.
    ///
    /// `chat_template.jinja` wins when present; otherwise `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of `{name, template}` from which `default` is
    /// taken). `bos_token`/`eos_token` come from `specials`; other `*_token` strings of
    /// `tokenizer_config.json` (`unk_token`, `pad_token`, ...) are exposed too, as transformers does.
    pub fn from_model_dir(dir: &Path, specials: &SpecialTokens) -> Result<Option<ChatTemplate>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_file(&cfg_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        let (template, source) = match std::fs::read_to_string(&jinja_path) {
            Ok(t) => (t, jinja_path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match cfg.as_ref().map(|c| template_from_config(c, &cfg_path)) {
                    Some(Ok(Some(found))) => found,
                    Some(Err(e)) => return Err(e),
                    Some(Ok(None)) | None => return Ok(None),
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", jinja_path.display()));
            }
        };

        let mut tokens = BTreeMap::new();
        if let Some((cfg, fields)) = cfg.as_ref().and_then(|c| Some((c, c.as_object()?))) {
            for key in fields.keys().filter(|k| k.ends_with("_token")) {
                // A `*_token` field that is not a token string is not for templates: skip it.
                if let Ok(Some(text)) = token_text_field(cfg, &cfg_path, key) {
                    tokens.insert(key.clone(), text);
                }
            }
            if let Some(extra) = fields.get("extra_special_tokens").and_then(|v| v.as_object()) {
                for (key, value) in extra {
                    if let Some(text) = value.as_str() {
                        tokens.entry(key.clone()).or_insert_with(|| text.to_string());
                    }
                }
            }
        }
        for (key, value) in [
            ("bos_token", &specials.bos_text),
            ("eos_token", &specials.eos_text),
        ] {
            if let Some(v) = value {
                tokens.insert(key.to_string(), v.clone());
            }
        }
        Self::compile(&template, &source, tokens, false).map(Some)
    }

    /// The template a GGUF file carries (`tokenizer.chat_template`), or `None` when it has
    /// none. `bos_token`/`eos_token` come from `specials`; `unk_token` and `pad_token` from the
    /// file's token ids.
    pub fn from_gguf(
        file: &crate::loader::gguf::GgufFile,
        specials: &SpecialTokens,
    ) -> Result<Option<ChatTemplate>> {
        let Some(template) = file.opt_str("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let mut tokens = BTreeMap::new();
        if let Some(crate::loader::gguf::Value::Array(list)) = file.get("tokenizer.ggml.tokens") {
            for (field, key) in [
                ("unk_token", "tokenizer.ggml.unknown_token_id"),
                ("pad_token", "tokenizer.ggml.padding_token_id"),
            ] {
                if let Some(text) = file
                    .opt_u64(key)?
                    .and_then(|id| list.get(id as usize))
                    .and_then(|v| v.as_str())
                {
                    tokens.insert(field.to_string(), text.to_string());
                }
            }
        }
        for (key, value) in [
            ("bos_token", &specials.bos_text),
            ("eos_token", &specials.eos_text),
        ] {
            if let Some(v) = value {
                tokens.insert(key.to_string(), v.clone());
            }
        }
        let source = format!("the chat template of {}", file.path.display());
        Self::compile(template, &source, tokens, false).map(Some)
    }

    /// One of gyre's built-in templates, with the family's usual special-token strings.
    pub fn builtin(kind: BuiltinTemplate) -> ChatTemplate {
        let (template, name, bos, eos) = match kind {
            BuiltinTemplate::Solar => (
                SOLAR_TEMPLATE,
                "built-in SOLAR template",
                Some("<s>"),
                Some("</s>"),
            ),
            BuiltinTemplate::Gemma => (
                GEMMA_TEMPLATE,
                "built-in Gemma template",
                Some("<bos>"),
                Some("<end_of_turn>"),
            ),
            BuiltinTemplate::Rwkv => (RWKV_TEMPLATE, "built-in RWKV template", None, None),
        };
        let mut tokens = BTreeMap::new();
        for (key, value) in [("bos_token", bos), ("eos_token", eos)] {
            if let Some(v) = value {
                tokens.insert(key.to_string(), v.to_string());
            }
        }
        // The built-in sources are constants checked by the unit tests below.
        match Self::compile(template, name, tokens, true) {
            Ok(t) => t,
            Err(e) => unreachable!("built-in chat template does not compile: {e:#}"),
        }
    }

    /// Replaces the `bos_token` / `eos_token` strings the template sees (`None` keeps the old one).
    pub fn with_special_tokens(mut self, bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        if let Some(b) = bos_token {
            self.tokens.insert("bos_token".to_string(), b.to_string());
        }
        if let Some(e) = eos_token {
            self.tokens.insert("eos_token".to_string(), e.to_string());
        }
        self
    }

    /// Where the template came from (file and field, or the built-in's name).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders and tokenizes a conversation with message contents as text: only the
    /// template's own markup produces control tokens (user text `</s>` or `<|im_end|>` stays
    /// text, so a message cannot forge a turn boundary).
    ///
    /// The contents' places in the rendered prompt come from a render with a unique marker in
    /// place of each content. A template that changes the contents (upper-casing them, say)
    /// loses the markers; then a content holding a control token's text is refused.
    pub fn tokenize(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let marker = |i: usize| format!("\u{F8F0}gyre-content-{i}\u{F8F1}");
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::new(m.role.clone(), marker(i)))
            .collect();
        let with_markers = self.render(&marked, add_generation_prompt)?;
        // Each marker once, in order: then the real prompt is the markers replaced.
        let mut rendered = String::with_capacity(with_markers.len());
        let mut spans = Vec::with_capacity(messages.len());
        let mut rest = with_markers.as_str();
        let mut whole = true;
        for (i, m) in messages.iter().enumerate() {
            let mk = marker(i);
            match rest.find(&mk) {
                Some(at) if !rest[at + mk.len()..].contains(&mk) => {
                    rendered.push_str(&rest[..at]);
                    spans.push(rendered.len()..rendered.len() + m.content.len());
                    rendered.push_str(&m.content);
                    rest = &rest[at + mk.len()..];
                }
                _ => {
                    whole = false;
                    break;
                }
            }
        }
        if whole {
            rendered.push_str(rest);
            return tokenizer.encode_chat_spans(&rendered, &spans);
        }
        for (i, m) in messages.iter().enumerate() {
            if let Some((t, _)) = tokenizer
                .special_token_texts()
                .into_iter()
                .find(|(t, _)| m.content.contains(t.as_str()))
            {
                bail!(
                    "messages[{i}].content contains '{t}', a control token of this model; the chat template \
                     from {} rewrites message contents, so gyre cannot keep that text from becoming markup",
                    self.source
                );
            }
        }
        tokenizer.encode_chat(&self.render(messages, add_generation_prompt)?)
    }

    /// Renders `messages`; `add_generation_prompt` appends the header that opens the reply.
    ///
    /// A template calling `raise_exception(msg)` yields a [`TemplateRaised`] error displaying `msg`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let input: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(OrderedMap(vec![
                    ("role".to_string(), Value::from(m.role.as_str())),
                    ("content".to_string(), Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".to_string(), Value::from(messages));
        ctx.insert(
            "add_generation_prompt".to_string(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".to_string(), Value::from(()));
        ctx.insert("documents".to_string(), Value::from(()));

        let template = self
            .env
            .get_template(&self.source)
            .with_context(|| format!("chat template from {} is not loaded", self.source))?;
        // The output may be a few times the conversation (markup around every message), never
        // much more: a template writing past this is stopped.
        let mut out = CappedWriter {
            bytes: Vec::new(),
            cap: RENDER_OUTPUT_FLOOR + 8 * input,
        };
        match template.render_captured_to(Value::from(ctx), &mut out).map(drop) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| anyhow!("the chat template from {} wrote invalid UTF-8", self.source)),
            Err(e) if raised_message(&e).is_some() => Err(anyhow::Error::new(TemplateRaised {
                message: raised_message(&e).unwrap_or_default(),
                template: self.source.clone(),
            })),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(anyhow!(
                "the chat template from {} did not finish within its budget of {RENDER_FUEL} \
                 instructions (it loops far more than a chat template needs); fix or replace the template",
                self.source
            )),
            Err(_) if out.bytes.len() > out.cap => Err(anyhow!(
                "the chat template from {} wrote more than {} bytes for a conversation of {input} \
                 bytes; fix or replace the template",
                self.source,
                out.cap
            )),
            Err(e) => Err(anyhow!("rendering chat template from {}: {e}", self.source)),
        }
    }

    /// Builds the environment the way transformers builds its jinja2 one, and compiles `template`.
    fn compile(
        template: &str,
        source: &str,
        tokens: BTreeMap<String, String>,
        builtin: bool,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| anyhow!("configuring the template syntax for {source}: {e}"))?;
        env.set_syntax(syntax);
        // minijinja picks escaping from the template name's extension; jinja2 as transformers
        // uses it never escapes, and our names are file paths (`tokenizer_config.json ...`).
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // A template is code from the model's files: bound what one render may do.
        env.set_fuel(Some(RENDER_FUEL));
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        if builtin {
            env.add_filter("rwkv_text", rwkv_normalize);
        }
        env.add_template_owned(source.to_string(), template.to_string())
            .map_err(|e| anyhow!("chat template from {source} does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            tokens,
        })
    }
}

/// Takes the template out of a parsed `tokenizer_config.json`: `Ok(None)` when it has none.
fn template_from_config(cfg: &serde_json::Value, cfg_path: &Path) -> Result<Option<(String, String)>> {
    let field = "chat_template";
    match cfg.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(t)) => {
            Ok(Some((t.clone(), format!("{} ({field})", cfg_path.display()))))
        }
        Some(serde_json::Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => {
                        let source = format!("{} ({field}: default)", cfg_path.display());
                        return Ok(Some((t.to_string(), source)));
                    }
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!(
                        "{}: every entry of `{field}` must be an object with string `name` and `template`",
                        cfg_path.display()
                    ),
                }
            }
            bail!(
                "{}: `{field}` lists templates {names:?} but none named `default`",
                cfg_path.display()
            )
        }
        Some(other) => bail!(
            "{}: `{field}` must be a string or a list of {{name, template}}, found {}",
            cfg_path.display(),
            json_kind(other)
        ),
    }
}

/// A short name for the type of a JSON value, for error messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The message of a `raise_exception` call somewhere in `err`'s chain.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(marker) = e.downcast_ref::<RaisedMarker>() {
            return Some(marker.0.clone());
        }
        cur = e.source();
    }
    None
}

/// A map whose keys iterate in insertion order (Python dict order), as messages are given.
#[derive(Debug)]
struct OrderedMap(Vec<(String, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self.0.iter().map(|(k, _)| Value::from(k.as_str())).collect();
        Enumerator::Values(keys)
    }
}

/// `raise_exception(msg)`: fails the render with `msg` as the error message.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedMarker(message)),
    )
}

/// `strftime_now(fmt)`: the local time formatted with a C `strftime` format.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid time format {format:?}"),
        )
    })?;
    Ok(out)
}

/// The RWKV text normalisation: `\r\n` to `\n`, runs of newlines to one, outer whitespace off.
fn rwkv_normalize(text: String) -> String {
    let text = text.replace("\r\n", "\n");
    let mut out = String::with_capacity(text.len());
    let mut last_newline = false;
    for c in text.chars() {
        if c == '\n' {
            if !last_newline {
                out.push(c);
            }
            last_newline = true;
        } else {
            out.push(c);
            last_newline = false;
        }
    }
    out.trim().to_string()
}

/// How `tojson` lays out its output, from the Python `json.dumps` keyword arguments.
struct JsonStyle {
    /// Per-level indentation; `None` writes everything on one line.
    indent: Option<String>,
    /// Between items of a list or map (`", "` on one line, `","` when indenting).
    item_sep: String,
    /// Between a key and its value.
    key_sep: String,
    /// Whether non-ASCII characters are written as `\uXXXX`.
    ensure_ascii: bool,
    /// Whether map keys are sorted.
    sort_keys: bool,
}

/// `tojson`: what transformers' override writes, i.e. `json.dumps(x, ensure_ascii=False, ...)`.
///
/// Keyword arguments `indent` (int or string), `separators` (a pair), `ensure_ascii` and
/// `sort_keys` behave as in Python. Unlike jinja2's own filter, nothing is HTML-escaped.
fn tojson_filter(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be an integer or a string, found {v}"),
                ))
            }
        },
    };
    let (mut item_sep, mut key_sep) = if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    if let Some(seps) = separators.filter(|s| !s.is_none() && !s.is_undefined()) {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                item_sep = a.as_str().unwrap_or_default().to_string();
                key_sep = b.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ))
            }
        }
    }
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

/// Writes `value` as Python's `json.dumps` would, at nesting `level`.
fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> Result<(), minijinja::Error> {
    let unsupported = |what: &str| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: {what} cannot be written as JSON"),
        )
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), style, level, |out, i| {
                write_json(out, &items[i], style, level + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), style, level, |out, i| {
                let (k, v) = &entries[i];
                write_json_string(out, k, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, v, style, level + 1)
            })?;
        }
        ValueKind::Undefined => return Err(unsupported("an undefined value")),
        ValueKind::Bytes => return Err(unsupported("a byte string")),
        _ => return Err(unsupported(&format!("a value of kind {}", value.kind()))),
    }
    Ok(())
}

/// Writes a list or map body with Python's layout: one line, or one item per indented line.
fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    style: &JsonStyle,
    level: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(ind) = &style.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level + 1));
        }
        item(out, i)?;
    }
    if let Some(ind) = &style.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A map key as Python's `json.dumps` writes it (strings as is, scalars stringified).
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".to_string()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key)?;
            Ok(s)
        }
        kind => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: map keys must be strings or scalars, found {kind}"),
        )),
    }
}

/// Writes a number: integers in full, floats as Python's `repr` does.
fn write_number(out: &mut String, value: &Value) -> Result<(), minijinja::Error> {
    if value.is_integer() {
        let n = i128::try_from(value.clone())?;
        let _ = write!(out, "{n}");
        return Ok(());
    }
    let f = f64::try_from(value.clone())?;
    out.push_str(&python_float_repr(f));
    Ok(())
}

/// Python's `repr(float)` as `json.dumps` uses it: shortest round-trip digits, exponent form
/// below 1e-4 and from 1e16 on, `NaN` / `Infinity` for the non-finite values.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits: "d.ddde±x".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{sign}{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// Writes a JSON string literal with Python's escapes (lowercase `\u00xx`).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    #[test]
    fn python_float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.0, "123456789012345.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (1e100, "1e+100"),
            (0.0, "0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn tojson_writes_like_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ 'é<\"\\n' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=2) }}",
            "test",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&msgs(&[("user", "hi")]), false).unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"hi\"}]|{\n  \"role\": \"user\",\n  \"content\": \"hi\"\n}|\"é<\\\"\\n\"|\"\\u00e9\"|[]"
        );
    }

    #[test]
    fn raise_exception_message_is_the_error() {
        let t = ChatTemplate::new("{{ raise_exception('no ' + 'way') }}", "t.json", None, None).unwrap();
        let err = t.render(&[], false).unwrap_err();
        assert_eq!(err.to_string(), "no way");
        let raised = err.downcast_ref::<TemplateRaised>().unwrap();
        assert_eq!(raised.template, "t.json");
    }

    #[test]
    fn syntax_errors_name_the_source() {
        let err = ChatTemplate::new(
            "{% for %}",
            "/m/tokenizer_config.json (chat_template)",
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/m/tokenizer_config.json"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{{ '  a b '.strip() }}|{{ 'ab'.upper() }}|{{ 'x y'.title() }}|{{ 'a,b'.split(',') | length }}|{{ 'abc'.startswith('ab') }}",
            "t",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "a b|AB|X Y|2|True");
    }

    #[test]
    fn strftime_now_formats_and_rejects_bad_formats() {
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "t", None, None).unwrap();
        let year = t.render(&[], false).unwrap();
        assert_eq!(year, chrono::Local::now().format("%Y").to_string());
        let bad = ChatTemplate::new("{{ strftime_now('%Q%') }}", "t", None, None).unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn nothing_is_escaped_whatever_the_source_name() {
        for name in ["x.html", "x.json", "tokenizer_config.json"] {
            let t = ChatTemplate::new("{{ '<a href=\"x\">&' }}", name, None, None).unwrap();
            assert_eq!(t.render(&[], false).unwrap(), "<a href=\"x\">&", "{name}");
        }
    }

    #[test]
    fn rwkv_normalize_collapses_newlines() {
        assert_eq!(rwkv_normalize("  a\r\n\r\n\nb\n ".to_string()), "a\nb");
    }

    #[test]
    fn builtins_compile() {
        for kind in [
            BuiltinTemplate::Solar,
            BuiltinTemplate::Gemma,
            BuiltinTemplate::Rwkv,
        ] {
            let t = ChatTemplate::builtin(kind);
            t.render(&msgs(&[("user", "hi")]), true).unwrap();
        }
    }

    /// A template is code from the model's files: one that loops without end, or writes
    /// without end, fails its render quickly with an error saying so.
    #[test]
    fn hostile_templates_fail_within_their_budget() {
        let msgs = [Message::new("user", "hi")];
        for (name, source, needle) in [
            (
                "loops",
                "{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}{% endfor %}{% endfor %}",
                "budget",
            ),
            (
                "writes",
                "{% for a in range(99999) %}{% for b in range(99999) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
                "more than",
            ),
            ("one huge string", "{{ 'x' * 2000000000 }}", "template"),
        ] {
            let t = ChatTemplate::new(source, name, None, None).unwrap();
            let start = std::time::Instant::now();
            let err = format!("{:#}", t.render(&msgs, true).unwrap_err());
            assert!(err.contains(needle) && err.contains(name), "{name}: {err}");
            assert!(start.elapsed().as_secs_f64() < 10.0, "{name} took {:?}", start.elapsed());
        }
        // A real template over a long conversation stays well inside the budget.
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "word ".repeat(50)))
            .collect();
        let t = ChatTemplate::builtin(BuiltinTemplate::Solar);
        assert!(t.render(&long, true).unwrap().len() > 500_000);
    }
}
