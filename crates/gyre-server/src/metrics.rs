//! `GET /metrics`: the engine's and the HTTP layer's counters in Prometheus text format.
//!
//! The engine keeps its own counters (requests, tokens, queue depth, prefix-cache hits, time to
//! first token, decode rate) and hands out snapshots; this module adds per-route response
//! counts and renders both. Names start with `gyre_`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use gyre::engine::scheduler::TTFT_BUCKETS;

use crate::AppState;

/// Responses by (route, status).
#[derive(Default)]
pub struct HttpCounters {
    counts: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl HttpCounters {
    /// Counts one response.
    pub fn record(&self, route: &'static str, status: u16) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, status)).or_default() += 1;
    }

    fn snapshot(&self) -> Vec<((&'static str, u16), u64)> {
        let m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render(&state),
    )
}

/// Writes one metric family: help, type, and samples (label text, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn one(v: impl Into<f64>) -> Vec<(String, f64)> {
    vec![(String::new(), v.into())]
}

fn render(state: &AppState) -> String {
    let m = state.engine.metrics();
    let mut o = String::new();
    let http: Vec<(String, f64)> = state
        .http
        .snapshot()
        .into_iter()
        .map(|((route, status), n)| (format!("{{route=\"{route}\",status=\"{status}\"}}"), n as f64))
        .collect();
    family(
        &mut o,
        "gyre_http_responses_total",
        "counter",
        "HTTP responses by route and status.",
        &http,
    );
    let outcomes = [
        ("completed", m.requests_completed),
        ("failed", m.requests_failed),
        ("cancelled", m.requests_cancelled),
        ("rejected", m.requests_rejected),
    ];
    family(
        &mut o,
        "gyre_requests_total",
        "counter",
        "Generation requests by outcome (rejected: queue full or shutting down).",
        &outcomes
            .iter()
            .map(|(k, v)| (format!("{{outcome=\"{k}\"}}"), *v as f64))
            .collect::<Vec<_>>(),
    );
    family(
        &mut o,
        "gyre_requests_submitted_total",
        "counter",
        "Generation requests accepted into the queue.",
        &one(m.requests_submitted as f64),
    );
    family(
        &mut o,
        "gyre_prompt_tokens_total",
        "counter",
        "Prompt tokens of admitted requests.",
        &one(m.prompt_tokens as f64),
    );
    family(
        &mut o,
        "gyre_prompt_tokens_prefilled_total",
        "counter",
        "Prompt tokens fed through the model (the rest came from the prefix cache).",
        &one(m.prompt_tokens_fed as f64),
    );
    family(
        &mut o,
        "gyre_generated_tokens_total",
        "counter",
        "Tokens sampled.",
        &one(m.generated_tokens as f64),
    );
    family(
        &mut o,
        "gyre_queue_depth",
        "gauge",
        "Requests waiting for a batch slot.",
        &one(m.queue_depth as f64),
    );
    family(
        &mut o,
        "gyre_running_sequences",
        "gauge",
        "Sequences in the running batch.",
        &one(m.running as f64),
    );
    family(
        &mut o,
        "gyre_max_batch",
        "gauge",
        "Batch slots (--max-batch).",
        &one(m.max_batch as f64),
    );
    family(
        &mut o,
        "gyre_max_queue",
        "gauge",
        "Queue bound (--max-queue).",
        &one(m.max_queue as f64),
    );
    family(
        &mut o,
        "gyre_context_tokens",
        "gauge",
        "Context bound in tokens.",
        &one(m.ctx as f64),
    );
    family(
        &mut o,
        "gyre_last_batch_size",
        "gauge",
        "Sequences in the last engine step.",
        &one(m.last_batch as f64),
    );
    family(
        &mut o,
        "gyre_engine_steps_total",
        "counter",
        "Engine steps (one batched forward each).",
        &one(m.steps as f64),
    );
    family(
        &mut o,
        "gyre_engine_step_seconds_total",
        "counter",
        "Seconds spent in engine steps.",
        &one(m.step_seconds),
    );
    family(
        &mut o,
        "gyre_decode_tokens_per_second",
        "gauge",
        "Decode throughput over recent decode-only steps (all sequences together).",
        &one(m.decode_tokens_per_second),
    );
    let mut ttft: Vec<(String, f64)> = TTFT_BUCKETS
        .iter()
        .zip(&m.ttft_buckets)
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), *n as f64))
        .collect();
    ttft.push(("_bucket{le=\"+Inf\"}".into(), m.ttft_count as f64));
    ttft.push(("_sum".into(), m.ttft_sum));
    ttft.push(("_count".into(), m.ttft_count as f64));
    family(
        &mut o,
        "gyre_time_to_first_token_seconds",
        "histogram",
        "Seconds from submission to the first sampled token.",
        &ttft,
    );
    family(
        &mut o,
        "gyre_prefix_cache_hits_total",
        "counter",
        "Requests that resumed from a cached prefix state.",
        &one(m.cache_hits as f64),
    );
    family(
        &mut o,
        "gyre_prefix_cache_misses_total",
        "counter",
        "Requests that found no cached prefix state.",
        &one(m.cache_misses as f64),
    );
    family(
        &mut o,
        "gyre_prefix_cache_tokens_saved_total",
        "counter",
        "Prompt tokens not prefilled thanks to the prefix cache.",
        &one(m.cache_tokens_saved as f64),
    );
    family(
        &mut o,
        "gyre_prefix_cache_bytes",
        "gauge",
        "Bytes held by the prefix-state cache.",
        &one(m.cache_bytes as f64),
    );
    family(
        &mut o,
        "gyre_prefix_cache_entries",
        "gauge",
        "States held by the prefix-state cache.",
        &one(m.cache_entries as f64),
    );
    o
}
