//! The OpenAI routes: chat completions, completions (JSON or SSE), and the model list.
//!
//! A handler parses the body ([`crate::params`]), submits it to the engine and waits for the
//! engine's first event: `Started` means the prompt was accepted (so a stream can begin with a
//! 200), `Failed` becomes a 400/500 JSON error before any stream starts. Streams send one
//! `data: {chunk}` per text delta, a final chunk with `finish_reason`, a usage chunk when
//! `stream_options.include_usage` is set, then `data: [DONE]`. When the client goes away the
//! response body is dropped, and with it the engine receiver, which frees the batch slot.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use gyre::engine::scheduler::{
    ErrorKind, Event, EventReceiver, RequestError, SubmitError, TokenLogprob, Usage,
};
use gyre::engine::FinishReason;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::params::{self, Endpoint, Parsed};
use crate::AppState;

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(st, body, Endpoint::Chat).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match handle(st, body, Endpoint::Completions).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn model_object(st: &AppState) -> Value {
    let created = st
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({"id": st.config.model_id, "object": "model", "created": created, "owned_by": "gyre"})
}

pub async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&st)]}))
}

pub async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id == st.config.model_id {
        Ok(Json(model_object(&st)))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no model '{id}': this server serves '{}'", st.config.model_id),
        )
        .with_code("model_not_found"))
    }
}

/// The next event from the engine, awaited without blocking the runtime.
async fn next_event(rx: &mut EventReceiver) -> Option<Event> {
    std::future::poll_fn(|cx| rx.poll_recv(cx)).await
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { .. } => {
            let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "server_overloaded", e.to_string())
                .with_code("queue_full");
            err.retry_after = Some(1);
            err
        }
        SubmitError::ShuttingDown => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.to_string())
                .with_code("shutting_down")
        }
    }
}

fn engine_error(e: RequestError) -> ApiError {
    match e.kind {
        ErrorKind::InvalidRequest => ApiError::invalid(e.param.map(str::to_owned), e.message),
        ErrorKind::ContextLength => {
            ApiError::invalid(e.param.map(str::to_owned), e.message).with_code("context_length_exceeded")
        }
        ErrorKind::Internal => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.message),
    }
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the engine stopped before the request finished",
    )
}

/// Per-response facts every chunk repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
}

fn new_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!(
        "{prefix}-{:x}{:04x}",
        t ^ (std::process::id() as u64) << 40,
        n & 0xffff
    )
}

async fn handle(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the limit of {} bytes",
                st.config.max_body_bytes
            )
        } else {
            r.body_text()
        };
        ApiError::new(status, "invalid_request_error", msg)
    })?;
    let Parsed {
        request,
        stream,
        include_usage,
        logprobs,
        model,
    } = params::parse(&body, endpoint, st.engine.limits().ctx)?;
    if let Some(m) = model.filter(|m| !m.is_empty() && *m != st.config.model_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model '{m}' does not exist: this server serves '{}'",
                st.config.model_id
            ),
        )
        .with_param("model")
        .with_code("model_not_found"));
    }
    // Rendering the template and tokenizing happen here, on a blocking thread: never on the
    // engine's thread, where a slow template or a huge prompt would stall every stream.
    let engine = st.engine.clone();
    let prepared = tokio::task::spawn_blocking(move || engine.prepare(request))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "preparing the prompt failed",
            )
        })?
        .map_err(engine_error)?;
    let mut rx = st.engine.submit_prepared(prepared).map_err(submit_error)?;
    match next_event(&mut rx).await {
        Some(Event::Started { .. }) => {}
        Some(Event::Failed(e)) => return Err(engine_error(e)),
        _ => return Err(engine_gone()),
    }
    let meta = Meta {
        id: new_id(endpoint),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: st.config.model_id.clone(),
        endpoint,
        logprobs,
    };
    if stream {
        Ok(Sse::new(sse_stream(rx, meta, include_usage)).into_response())
    } else {
        collect(rx, meta).await
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// JSON cannot hold -inf: report impossible tokens as OpenAI does, with -9999.
fn lp(x: f32) -> f64 {
    if x.is_finite() {
        x as f64
    } else {
        -9999.0
    }
}

/// Chat `logprobs.content` entries.
fn chat_logprobs(items: &[TokenLogprob]) -> Vec<Value> {
    items
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|(s, l)| json!({"token": s, "logprob": lp(*l), "bytes": s.as_bytes()}))
                .collect();
            json!({"token": t.text, "logprob": lp(t.logprob), "bytes": t.text.as_bytes(), "top_logprobs": top})
        })
        .collect()
}

/// Legacy completions `logprobs` object; `offset` is the text offset of the first token.
fn completion_logprobs(items: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(items.len());
    for t in items {
        text_offset.push(*offset);
        *offset += t.text.len();
    }
    json!({
        "tokens": items.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": items.iter().map(|t| lp(t.logprob)).collect::<Vec<_>>(),
        "top_logprobs": items.iter().map(|t| {
            t.top.iter().map(|(s, l)| (s.clone(), json!(lp(*l)))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// Waits for the whole completion and answers with one JSON object.
async fn collect(mut rx: EventReceiver, meta: Meta) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps: Vec<TokenLogprob> = Vec::new();
    let (finish, usage) = loop {
        match next_event(&mut rx).await {
            Some(Event::Delta {
                text: t, logprobs, ..
            }) => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Some(Event::Done { finish, usage }) => break (finish, usage),
            Some(Event::Failed(e)) => return Err(engine_error(e)),
            Some(Event::Started { .. }) => {}
            None => return Err(engine_gone()),
        }
    };
    let body = match meta.endpoint {
        Endpoint::Chat => {
            let logprobs = if meta.logprobs {
                json!({"content": chat_logprobs(&lps), "refusal": null})
            } else {
                Value::Null
            };
            json!({
                "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": logprobs,
                    "finish_reason": finish_str(finish),
                }],
                "usage": usage_json(&usage),
                "system_fingerprint": null,
            })
        }
        Endpoint::Completions => {
            let logprobs = if meta.logprobs {
                completion_logprobs(&lps, &mut 0)
            } else {
                Value::Null
            };
            json!({
                "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_str(finish)}],
                "usage": usage_json(&usage),
                "system_fingerprint": null,
            })
        }
    };
    Ok(Json(body).into_response())
}

/// State of one SSE response.
struct StreamState {
    rx: EventReceiver,
    meta: Meta,
    include_usage: bool,
    /// Chunks ready to send.
    out: std::collections::VecDeque<String>,
    /// Whether the chat role chunk went out.
    sent_role: bool,
    /// Text offset for legacy completion logprobs.
    offset: usize,
    done: bool,
}

impl StreamState {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut c = json!({
            "id": self.meta.id, "object": object, "created": self.meta.created, "model": self.meta.model,
            "choices": [choice], "system_fingerprint": null,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn push(&mut self, v: Value) {
        self.out.push_back(v.to_string());
    }

    /// A delta's (or the final) choice object.
    fn choice(&mut self, text: Option<&str>, lps: &[TokenLogprob], finish: Option<FinishReason>) -> Value {
        let finish = finish.map(finish_str);
        match self.meta.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if !self.sent_role {
                    self.sent_role = true;
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                let logprobs = if self.meta.logprobs && !lps.is_empty() {
                    json!({"content": chat_logprobs(lps), "refusal": null})
                } else {
                    Value::Null
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => {
                let logprobs = if self.meta.logprobs && !lps.is_empty() {
                    completion_logprobs(lps, &mut self.offset)
                } else {
                    Value::Null
                };
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// Turns one engine event into chunks; marks the stream done after the last one.
    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Started { .. }) => {}
            Some(Event::Delta { text, logprobs, .. }) => {
                let c = self.choice(Some(&text), &logprobs, None);
                let c = self.chunk(c);
                self.push(c);
            }
            Some(Event::Done { finish, usage }) => {
                let c = self.choice(None, &[], Some(finish));
                let c = self.chunk(c);
                self.push(c);
                if self.include_usage {
                    let mut u = self.chunk(Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage_json(&usage);
                    self.push(u);
                }
                self.out.push_back("[DONE]".into());
                self.done = true;
            }
            Some(Event::Failed(e)) => {
                self.push(engine_error(e).body());
                self.out.push_back("[DONE]".into());
                self.done = true;
            }
            None => {
                self.push(engine_gone().body());
                self.out.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }
}

fn sse_stream(
    rx: EventReceiver,
    meta: Meta,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut st = StreamState {
        rx,
        meta,
        include_usage,
        out: Default::default(),
        sent_role: false,
        offset: 0,
        done: false,
    };
    if st.meta.endpoint == Endpoint::Chat {
        // The first chunk carries the role, as OpenAI's does.
        let c = st.choice(Some(""), &[], None);
        let c = st.chunk(c);
        st.push(c);
    }
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.out.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let ev = next_event(&mut st.rx).await;
            st.on_event(ev);
        }
    })
}
