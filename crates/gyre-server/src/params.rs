//! Request bodies of `/v1/chat/completions` and `/v1/completions`, checked field by field.
//!
//! Bodies are parsed as untyped JSON and read here, so that every wrong type or value becomes
//! a 400 naming the field (`param`) and saying what was expected, rather than a generic
//! deserialization failure. Unknown fields are ignored, as OpenAI-compatible servers do; fields
//! gyre cannot honour (`n` other than 1, `echo`, `suffix`, `best_of`, tools and `tool_choice`,
//! `response_format` other than text, `logit_bias`, grammars and guided decoding) are refused
//! with a 400 naming the field. This module turns a body into an engine [`Request`]; it sends nothing.

use gyre::chat::Message;
use gyre::engine::scheduler::{Prompt, Request};
use gyre::sampling::SamplingParams;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A checked request.
#[derive(Debug)]
pub struct Parsed {
    pub request: Request,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whether log-probabilities were asked for.
    pub logprobs: bool,
    /// The `model` the request names, if it names one.
    pub model: Option<String>,
}

/// Most stop strings accepted.
const MAX_STOP: usize = 16;
/// Most `top_logprobs` / legacy `logprobs` accepted (OpenAI's limit).
const MAX_TOP_LOGPROBS: u64 = 20;

/// Reads the typed fields of a JSON object, naming the field in every error.
struct Fields<'a>(&'a Map<String, Value>);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The field's value, `None` when absent or null.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::field(
                name,
                format!("`{name}` must be a boolean, got {}", type_name(v)),
            )),
        }
    }

    fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::field(
                        name,
                        format!("`{name}` must be between {lo} and {hi}, got {n}"),
                    ));
                }
                Ok(Some(x as f32))
            }
            Some(v) => Err(ApiError::field(
                name,
                format!("`{name}` must be a number, got {}", type_name(v)),
            )),
        }
    }

    /// An integer field (a float with no fraction is accepted, as JSON does not tell them apart).
    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Ok(Some(i)),
                (None, Some(_)) => Ok(Some(i64::MAX)),
                _ => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => Ok(Some(f as i64)),
                    Some(f) if f.fract() == 0.0 => Err(ApiError::field(
                        name,
                        format!(
                            "`{name}` is too large: it must be an integer from 0 to {}",
                            u64::MAX
                        ),
                    )),
                    _ => Err(ApiError::field(
                        name,
                        format!("`{name}` must be an integer, got {n}"),
                    )),
                },
            },
            Some(v) => Err(ApiError::field(
                name,
                format!("`{name}` must be an integer, got {}", type_name(v)),
            )),
        }
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::field(
                name,
                format!("`{name}` must be a string, got {}", type_name(v)),
            )),
        }
    }
}

/// Parses and checks a request body for `endpoint`; `ctx` is the engine's context bound.
pub fn parse(body: &[u8], endpoint: Endpoint, ctx: usize) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("the request body is not valid JSON ({e}); send a JSON object"),
        )
    })?;
    let Value::Object(map) = &value else {
        return Err(ApiError::invalid(
            None,
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&value)
            ),
        ));
    };
    let f = Fields(map);
    let model = f.string("model")?.map(str::to_string);

    let n = f.int("n")?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::field(
            "n",
            format!("`n` must be 1: gyre generates one choice per request (got {n}); send several requests instead"),
        ));
    }
    if let Some(b) = f.int("best_of")? {
        if b != 1 {
            return Err(ApiError::field(
                "best_of",
                "`best_of` must be 1: gyre does not rank several samples",
            ));
        }
    }
    // Fields that would change what is generated and that gyre cannot honour yet: refused,
    // rather than ignored (a client asking for JSON must not get free text with a 200).
    if let Some(rf) = f.get("response_format") {
        let kind = rf.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::field(
                "response_format",
                format!(
                    "`response_format` {} is not supported by gyre yet (no constrained decoding); only \
                     {{\"type\": \"text\"}} is",
                    kind.map_or_else(|| rf.to_string(), |k| format!("of type {k:?}"))
                ),
            ));
        }
    }
    if f.get("logit_bias")
        .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(ApiError::field(
            "logit_bias",
            "`logit_bias` is not supported by gyre yet",
        ));
    }
    if let Some(tc) = f.get("tool_choice") {
        if !(tc.is_null() || tc.as_str() == Some("none")) {
            return Err(ApiError::field(
                "tool_choice",
                "`tool_choice` is not supported by gyre (no tool calling); only \"none\" is",
            ));
        }
    }
    for unsupported in [
        "grammar",
        "json_schema",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    ] {
        if f.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::field(
                unsupported,
                format!("`{unsupported}` is not supported by gyre yet (no constrained decoding)"),
            ));
        }
    }
    for unsupported in ["tools", "functions"] {
        if f.get(unsupported)
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::field(
                unsupported,
                format!("`{unsupported}` is not supported by gyre (no tool calling)"),
            ));
        }
    }

    let prompt = match endpoint {
        Endpoint::Chat => Prompt::Chat(messages(&f)?),
        Endpoint::Completions => {
            if f.bool("echo")? == Some(true) {
                return Err(ApiError::field("echo", "`echo` is not supported by gyre"));
            }
            if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
                return Err(ApiError::field(
                    "suffix",
                    "`suffix` (fill-in-the-middle) is not supported by gyre",
                ));
            }
            completion_prompt(&f)?
        }
    };

    // max_completion_tokens is the newer name; either is accepted, the newer wins.
    let mut max_tokens = None;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(m) = f.int(name)? {
            if m < 1 {
                return Err(ApiError::field(
                    name,
                    format!("`{name}` must be at least 1, got {m}"),
                ));
            }
            if m as u64 > ctx as u64 {
                return Err(ApiError::field(
                    name,
                    format!("`{name}` is {m}, more than the context of {ctx} tokens"),
                )
                .with_code("context_length_exceeded"));
            }
            max_tokens = Some(m as usize);
        }
    }
    if max_tokens.is_none() && endpoint == Endpoint::Completions {
        max_tokens = Some(16.min(ctx)); // the OpenAI default for legacy completions
    }

    let mut sampling = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    if let Some(t) = f.number("temperature", 0.0, 2.0)? {
        sampling.temperature = t;
    }
    if let Some(p) = f.number("top_p", 0.0, 1.0)? {
        // top_p 0 keeps only the most likely token.
        sampling.top_p = if p <= 0.0 { f32::MIN_POSITIVE } else { p };
    }
    if let Some(k) = f.int("top_k")? {
        if k < -1 {
            return Err(ApiError::field(
                "top_k",
                format!("`top_k` must be >= 0 (0 or -1 = off), got {k}"),
            ));
        }
        sampling.top_k = k.max(0) as usize;
    }
    if let Some(m) = f.number("min_p", 0.0, 1.0)? {
        sampling.min_p = m;
    }
    if let Some(p) = f.number("presence_penalty", -2.0, 2.0)? {
        sampling.presence_penalty = p;
    }
    if let Some(p) = f.number("frequency_penalty", -2.0, 2.0)? {
        sampling.frequency_penalty = p;
    }
    if let Some(p) = f.number("repetition_penalty", 0.01, 100.0)? {
        sampling.repetition_penalty = p;
    }
    if let Some(s) = f.int("seed")? {
        sampling.seed = Some(s as u64);
    }

    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::field(
                    "stop",
                    format!("`stop` has {} strings; at most {MAX_STOP}", items.len()),
                ));
            }
            items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        ApiError::field("stop", "`stop` must be a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::field(
                "stop",
                format!(
                    "`stop` must be a string or a list of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };

    let logprobs = match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs")?.unwrap_or(false);
            let top = f.int("top_logprobs")?;
            if let Some(t) = top {
                if !(0..=MAX_TOP_LOGPROBS as i64).contains(&t) {
                    return Err(ApiError::field(
                        "top_logprobs",
                        format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {t}"),
                    ));
                }
                if !on {
                    return Err(ApiError::field(
                        "top_logprobs",
                        "`top_logprobs` needs `logprobs: true`",
                    ));
                }
            }
            on.then_some(top.unwrap_or(0) as usize)
        }
        Endpoint::Completions => match f.int("logprobs")? {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::field(
                    "logprobs",
                    format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
        },
    };

    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|mut e| {
                e.param = Some("stream_options.include_usage".into());
                e
            })?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("`stream_options` must be an object, got {}", type_name(v)),
            ))
        }
    };

    Ok(Parsed {
        request: Request {
            prompt,
            max_tokens,
            sampling,
            stop,
            logprobs,
        },
        stream,
        include_usage,
        logprobs: logprobs.is_some(),
        model,
    })
}

/// The `messages` of a chat request: role plus text content (a string or text parts).
fn messages(f: &Fields<'_>) -> Result<Vec<Message>, ApiError> {
    let Some(list) = f.get("messages") else {
        return Err(ApiError::field(
            "messages",
            "`messages` is required: a list of {role, content} objects",
        ));
    };
    let Value::Array(list) = list else {
        return Err(ApiError::field(
            "messages",
            format!("`messages` must be an array, got {}", type_name(list)),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::field("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(o) = m else {
            return Err(ApiError::field(
                &param,
                format!("`{param}` must be an object with `role` and `content`"),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "user" | "assistant" => r.clone(),
                "developer" => "system".to_string(),
                other => {
                    return Err(ApiError::field(
                        &format!("{param}.role"),
                        format!("`{param}.role` must be system, developer, user or assistant, got '{other}'"),
                    ))
                }
            },
            _ => {
                return Err(ApiError::field(
                    &format!("{param}.role"),
                    format!("`{param}.role` is required and must be a string"),
                ))
            }
        };
        let content =
            match o.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(ApiError::field(
                                &format!("{param}.content[{j}]"),
                                "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                            )),
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::field(
                        &format!("{param}.content"),
                        format!("`{param}.content` must be a string or a list of text parts"),
                    ))
                }
            };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// The `prompt` of a completions request: a string or token ids (one prompt only).
fn completion_prompt(f: &Fields<'_>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::field(
            "prompt",
            "`prompt` must be a string or a list of token ids (one prompt per request)",
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad))
            .collect()
    };
    match f.get("prompt") {
        None => Err(ApiError::field("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => Ok(Prompt::Tokens(ids(inner)?)),
            items if items.iter().all(Value::is_number) && !items.is_empty() => {
                Ok(Prompt::Tokens(ids(items)?))
            }
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Parsed, ApiError> {
        parse(body.as_bytes(), Endpoint::Chat, 512)
    }

    #[test]
    fn good_chat_request() {
        let p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,
                "temperature":0,"stop":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(p.request.max_tokens, Some(5));
        assert_eq!(p.request.sampling.temperature, 0.0);
        assert_eq!(p.request.stop, vec!["x".to_string()]);
        assert!(p.stream && p.include_usage && !p.logprobs);
    }

    #[test]
    fn bad_fields_name_the_param() {
        let param = |body: &str| chat(body).unwrap_err().param;
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(param(&format!("{{{m},\"n\":2}}")).as_deref(), Some("n"));
        assert_eq!(
            param(&format!("{{{m},\"max_tokens\":-1}}")).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param(&format!("{{{m},\"max_tokens\":100000}}")).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param(&format!("{{{m},\"max_tokens\":\"5\"}}")).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param(&format!("{{{m},\"temperature\":\"hot\"}}")).as_deref(),
            Some("temperature")
        );
        assert_eq!(param(&format!("{{{m},\"stop\":[1]}}")).as_deref(), Some("stop"));
        assert_eq!(param(&format!("{{{m},\"stream\":1}}")).as_deref(), Some("stream"));
        assert_eq!(param(r#"{"messages":"hi"}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(r#"{"messages":[{"content":"hi"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert!(chat("{not json").unwrap_err().message.contains("not valid JSON"));
        assert!(chat("[1]").unwrap_err().message.contains("JSON object"));
    }

    #[test]
    fn completion_prompts() {
        let p = |body: &str| parse(body.as_bytes(), Endpoint::Completions, 512);
        assert!(matches!(
            p(r#"{"prompt":"a"}"#).unwrap().request.prompt,
            Prompt::Text(_)
        ));
        assert!(matches!(
            p(r#"{"prompt":[1,2]}"#).unwrap().request.prompt,
            Prompt::Tokens(_)
        ));
        assert!(matches!(
            p(r#"{"prompt":[[1,2]]}"#).unwrap().request.prompt,
            Prompt::Tokens(_)
        ));
        assert_eq!(p(r#"{"prompt":"a"}"#).unwrap().request.max_tokens, Some(16));
        assert!(p(r#"{"prompt":["a","b"]}"#).is_err());
        assert!(p(r#"{"prompt":[-1]}"#).is_err());
        assert!(p(r#"{}"#).is_err());
        assert_eq!(
            p(r#"{"prompt":"a","logprobs":3}"#).unwrap().request.logprobs,
            Some(3)
        );
    }
}
