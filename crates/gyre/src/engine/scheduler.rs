//! Continuous batching: many sequences share one model, one batched forward per step.
//!
//! The [`Engine`] runs on a thread of its own (the forward pass is CPU-bound and must not run
//! on an async runtime). Front ends talk to it only through an [`EngineHandle`]:
//! [`EngineHandle::submit`] queues a [`Request`] and returns an [`EventReceiver`] that yields
//! [`Event`]s: `Started` (the prompt was accepted), `Delta`s of text (with token ids and, when
//! asked for, log-probabilities), then `Done` with the finish reason and usage — or `Failed`.
//!
//! Each step of the engine loop:
//! 1. drops sequences whose receiver is gone (a client that disconnected frees its slot at once);
//! 2. admits queued requests up to `max_batch` running sequences: renders and tokenizes the
//!    prompt, checks it against the context, and starts its state from the longest matching
//!    entry of the prefix-state cache (or from the initial state);
//! 3. runs ONE forward over every running sequence: sequences still in prefill feed a chunk of
//!    their prompt (at most `prefill_chunk` tokens), decoding ones feed their last sampled token,
//!    so each weight is read once per step for the whole batch;
//! 4. samples each sequence whose prompt is consumed ([`Sampler`]), detokenizes incrementally
//!    ([`crate::tokenizer::DecodeStream`]), applies stop ids and stop strings ([`StopMatcher`])
//!    and sends the deltas.
//!
//! The queue is bounded: `submit` refuses with [`SubmitError::QueueFull`] once `max_batch +
//! max_queue` requests are running or waiting. Every sequence has its own state, sampler and
//! RNG, and the models compute each row of a batch independently; the only coupling is float
//! summation order (a step with several rows uses the tiled matrix kernel, a step with one row
//! the streaming dot product), which moves logits by ~1e-6 and can flip a greedy choice only at
//! an exact tie.
//!
//! Prefix-state cache: after a prompt is consumed and when a sequence ends, a copy of its state
//! (keyed by the token ids it has consumed, with the logits after the last one) is kept in an LRU
//! cache bounded by total bytes ([`State::bytes`]). A new prompt resumes from the entry sharing
//! its longest prefix: recurrent states (RWKV, RecurrentGemma) when the entry is a whole prefix
//! of the prompt, KV caches also from a partial overlap (the copy is rewound with
//! [`State::truncate`]). A chat that resends its history pays prefill only for the new turn.
//!
//! This module owns scheduling, cancellation, the cache and the engine's metrics. It knows no
//! HTTP and no model family: models are reached through [`Model`], text through [`Tokenizer`].

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::session::FinishReason;
use super::stop::{StopMatcher, StopOutcome};
use crate::chat::{ChatTemplate, Message};
use crate::models::{Logits, Model, SeqInput};
use crate::sampling::{log_softmax, Draw, Sampler, SamplingParams};
use crate::state::State;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// Limits of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences decoding together (the batch of one step).
    pub max_batch: usize,
    /// Most requests waiting for a free slot beyond the running ones.
    pub max_queue: usize,
    /// Context bound in tokens: prompt plus completion (plus a loaded initial state's tokens).
    pub ctx: usize,
    /// Byte budget of the prefix-state cache; 0 turns the cache off.
    pub cache_bytes: usize,
    /// Most prompt tokens one sequence feeds per step, so a long prompt does not stall the
    /// others' decoding for its whole prefill.
    pub prefill_chunk: usize,
    /// A pause after every step; zero in production. Tests use it to make requests slow enough
    /// to overlap (queue limits, disconnects, shutdown while streaming).
    pub step_pause: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            max_queue: 64,
            ctx: 4096,
            cache_bytes: 512 << 20,
            prefill_chunk: 512,
            step_pause: Duration::ZERO,
        }
    }
}

/// How chat requests are turned into prompts.
pub struct ChatFormat {
    /// The model's chat template.
    pub template: Arc<ChatTemplate>,
    /// Ids that end an assistant turn.
    pub stop_ids: Vec<u32>,
    /// Strings that end an assistant turn.
    pub stop_strings: Vec<String>,
}

/// What a request continues.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Plain text, encoded with the tokenizer's special tokens (BOS) on a fresh state.
    Text(String),
    /// Token ids, fed as given.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the chat template and answered as the assistant.
    Chat(Vec<Message>),
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    /// Most tokens to generate; `None` = up to the context bound.
    pub max_tokens: Option<usize>,
    /// Sampling settings (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Extra stop strings (chat requests also stop at the template's end-of-turn).
    pub stop: Vec<String>,
    /// Report log-probabilities: `Some(k)` gives each token's and the `k` most likely ones'.
    pub logprobs: Option<usize>,
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (its decode on its own).
    pub text: String,
    /// Natural-log probability under the model's distribution (before penalties).
    pub logprob: f32,
    /// The most likely tokens at this position, best first: text and log-probability.
    pub top: Vec<(String, f32)>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (a final stop id not counted).
    pub completion_tokens: usize,
    /// Prompt tokens that came from the prefix-state cache instead of being fed.
    pub cached_tokens: usize,
}

/// What kind of problem ended a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a client error).
    InvalidRequest,
    /// Prompt plus completion do not fit the context (a client error).
    ContextLength,
    /// The engine failed (a server error).
    Internal,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    pub kind: ErrorKind,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    pub message: String,
}

impl RequestError {
    fn new(kind: ErrorKind, param: Option<&'static str>, message: impl Into<String>) -> RequestError {
        RequestError {
            kind,
            param,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

/// What a request's receiver yields, in order: `Started`, `Delta`s, then `Done` (or `Failed`
/// at any point, after which nothing follows).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt was accepted and is being processed.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// New text and the ids sampled since the last delta (with log-probabilities when asked).
    Delta {
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// Generation ended.
    Done { finish: FinishReason, usage: Usage },
    /// The request failed.
    Failed(RequestError),
}

/// Why `submit` refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is busy and the queue is full; try again later.
    QueueFull { waiting: usize },
    /// The engine is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { waiting } => write!(
                f,
                "the server is busy: every slot is in use and {waiting} requests are waiting; retry later"
            ),
            SubmitError::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

impl std::error::Error for SubmitError {}

// ---------------------------------------------------------------------------------------------
// The event channel: std-only, usable from async code (poll) and from threads (blocking).

/// The shared half of one request's event channel.
#[derive(Default)]
struct Chan {
    inner: Mutex<ChanInner>,
    ready: Condvar,
}

#[derive(Default)]
struct ChanInner {
    events: VecDeque<Event>,
    /// The task to wake when an event arrives.
    waker: Option<Waker>,
    /// The engine dropped its end: no more events will come.
    sender_gone: bool,
    /// The client dropped its end: the engine should stop working on the request.
    receiver_gone: bool,
}

/// Recovers a guard from a poisoned mutex: every critical section here leaves data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The engine's end of a request's events.
struct EventSender {
    chan: Arc<Chan>,
}

impl EventSender {
    /// Queues an event; false when the receiver is gone.
    fn send(&self, event: Event) -> bool {
        let mut g = lock(&self.chan.inner);
        if g.receiver_gone {
            return false;
        }
        g.events.push_back(event);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
        drop(g);
        self.chan.ready.notify_all();
        true
    }

    fn is_closed(&self) -> bool {
        lock(&self.chan.inner).receiver_gone
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        let mut g = lock(&self.chan.inner);
        g.sender_gone = true;
        if let Some(w) = g.waker.take() {
            w.wake();
        }
        drop(g);
        self.chan.ready.notify_all();
    }
}

/// The client's end of a request's events; dropping it cancels the request.
pub struct EventReceiver {
    chan: Arc<Chan>,
    shared: Arc<Shared>,
}

impl EventReceiver {
    /// The next event, `Poll::Ready(None)` once the engine has sent everything.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut g = lock(&self.chan.inner);
        if let Some(e) = g.events.pop_front() {
            return Poll::Ready(Some(e));
        }
        if g.sender_gone {
            return Poll::Ready(None);
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Blocks for the next event; `None` once the engine has sent everything.
    pub fn recv(&mut self) -> Option<Event> {
        let mut g = lock(&self.chan.inner);
        loop {
            if let Some(e) = g.events.pop_front() {
                return Some(e);
            }
            if g.sender_gone {
                return None;
            }
            g = self.chan.ready.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut g = lock(&self.chan.inner);
        let finished = g.sender_gone;
        g.receiver_gone = true;
        g.events.clear();
        drop(g);
        if !finished {
            // Wake the engine so it frees the slot now rather than at its next step.
            self.shared.wake.notify_all();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state between the handle and the engine loop.

/// A request waiting for a slot.
struct Pending {
    request: Request,
    prepared: Prepared,
    events: EventSender,
    submitted: Instant,
}

/// A request whose prompt is rendered, tokenized and checked against the context
/// ([`EngineHandle::prepare`]), ready for [`EngineHandle::submit_prepared`].
pub struct PreparedRequest {
    request: Request,
    prepared: Prepared,
}

impl PreparedRequest {
    /// Tokens of the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prepared.prompt.len()
    }
}

struct Queue {
    waiting: VecDeque<Pending>,
    /// Sequences the engine is running.
    running: usize,
    shutdown: bool,
}

/// Counters and gauges of an engine; read them with [`EngineHandle::metrics`].
#[derive(Default)]
struct Counters {
    requests_submitted: AtomicU64,
    requests_rejected: AtomicU64,
    requests_completed: AtomicU64,
    requests_failed: AtomicU64,
    requests_cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    prompt_tokens_fed: AtomicU64,
    generated_tokens: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_tokens_saved: AtomicU64,
    cache_bytes: AtomicU64,
    cache_entries: AtomicU64,
    steps: AtomicU64,
    step_seconds_bits: AtomicU64,
    decode_tokens_per_second_bits: AtomicU64,
    last_batch: AtomicU64,
    ttft_count: AtomicU64,
    ttft_sum_bits: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
}

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
pub const TTFT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn add_f64(a: &AtomicU64, v: f64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some((f64::from_bits(b) + v).to_bits())
    });
}

fn get_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled on submit, on shutdown and when a receiver is dropped.
    wake: Condvar,
    counters: Counters,
    limits: EngineConfig,
    /// Set once the engine loop has returned.
    stopped: AtomicBool,
}

/// A snapshot of the engine's metrics.
#[derive(Clone, Debug, Default)]
pub struct EngineMetrics {
    /// Requests accepted by `submit`.
    pub requests_submitted: u64,
    /// Requests refused by `submit` (queue full or shutting down).
    pub requests_rejected: u64,
    /// Requests that ended with `Done`.
    pub requests_completed: u64,
    /// Requests that ended with `Failed`.
    pub requests_failed: u64,
    /// Requests whose receiver was dropped before the end.
    pub requests_cancelled: u64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Prompt tokens actually fed (the rest came from the prefix cache).
    pub prompt_tokens_fed: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Prefix-cache lookups that found a usable entry.
    pub cache_hits: u64,
    /// Prefix-cache lookups that found none.
    pub cache_misses: u64,
    /// Prompt tokens the cache saved from prefill.
    pub cache_tokens_saved: u64,
    /// Bytes held by the cache.
    pub cache_bytes: u64,
    /// Entries in the cache.
    pub cache_entries: u64,
    /// Requests waiting for a slot.
    pub queue_depth: u64,
    /// Sequences running.
    pub running: u64,
    /// Engine steps (batched forwards) so far.
    pub steps: u64,
    /// Seconds spent in steps.
    pub step_seconds: f64,
    /// Decode throughput of recent decode-only steps (moving average), tokens per second.
    pub decode_tokens_per_second: f64,
    /// Sequences in the last step's batch.
    pub last_batch: u64,
    /// Time-to-first-token observations, their sum (seconds) and cumulative bucket counts
    /// (bounds in [`TTFT_BUCKETS`]).
    pub ttft_count: u64,
    pub ttft_sum: f64,
    pub ttft_buckets: Vec<u64>,
    /// Limits the engine runs with.
    pub max_batch: usize,
    pub max_queue: usize,
    pub ctx: usize,
}

/// The front ends' way into a running [`Engine`]: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    prep: Arc<Preparer>,
}

impl EngineHandle {
    /// Renders, tokenizes and checks a request's prompt, on the calling thread (the engine's
    /// thread never renders or tokenizes: a slow template or a huge prompt holds up only its
    /// own request). Run it where blocking is fine (a blocking task in async code).
    pub fn prepare(&self, request: Request) -> Result<PreparedRequest, RequestError> {
        match self.prep.prepare(&request) {
            Ok(prepared) => Ok(PreparedRequest { request, prepared }),
            Err(e) => {
                // A request that fails here counts as submitted and failed, as one that fails
                // in the engine does.
                let c = &self.shared.counters;
                c.requests_submitted.fetch_add(1, Ordering::Relaxed);
                c.requests_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Prepares and queues a request; a request that cannot be prepared fails through its
    /// receiver (`Event::Failed`), as one that fails later does.
    pub fn submit(&self, request: Request) -> Result<EventReceiver, SubmitError> {
        match self.prepare(request) {
            Ok(p) => self.submit_prepared(p),
            Err(e) => {
                let chan = Arc::new(Chan::default());
                EventSender { chan: chan.clone() }.send(Event::Failed(e));
                Ok(EventReceiver {
                    chan,
                    shared: self.shared.clone(),
                })
            }
        }
    }

    /// Queues a prepared request; its events arrive on the returned receiver.
    pub fn submit_prepared(&self, prepared: PreparedRequest) -> Result<EventReceiver, SubmitError> {
        let PreparedRequest { request, prepared } = prepared;
        let c = &self.shared.counters;
        let mut q = lock(&self.shared.queue);
        if q.shutdown || self.shared.stopped.load(Ordering::Acquire) {
            c.requests_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::ShuttingDown);
        }
        let limits = &self.shared.limits;
        if q.waiting.len() + q.running >= limits.max_batch + limits.max_queue {
            c.requests_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull {
                waiting: q.waiting.len(),
            });
        }
        let chan = Arc::new(Chan::default());
        q.waiting.push_back(Pending {
            request,
            prepared,
            events: EventSender { chan: chan.clone() },
            submitted: Instant::now(),
        });
        drop(q);
        c.requests_submitted.fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_all();
        Ok(EventReceiver {
            chan,
            shared: self.shared.clone(),
        })
    }

    /// Stops accepting requests; the engine finishes the running and queued ones, then returns.
    pub fn shutdown(&self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
    }

    /// False once the engine loop has ended (shut down, or failed).
    pub fn is_running(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire)
    }

    /// The engine's limits.
    pub fn limits(&self) -> &EngineConfig {
        &self.shared.limits
    }

    /// Current metrics.
    pub fn metrics(&self) -> EngineMetrics {
        let c = &self.shared.counters;
        let (queue_depth, running) = {
            let q = lock(&self.shared.queue);
            (q.waiting.len() as u64, q.running as u64)
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineMetrics {
            requests_submitted: get(&c.requests_submitted),
            requests_rejected: get(&c.requests_rejected),
            requests_completed: get(&c.requests_completed),
            requests_failed: get(&c.requests_failed),
            requests_cancelled: get(&c.requests_cancelled),
            prompt_tokens: get(&c.prompt_tokens),
            prompt_tokens_fed: get(&c.prompt_tokens_fed),
            generated_tokens: get(&c.generated_tokens),
            cache_hits: get(&c.cache_hits),
            cache_misses: get(&c.cache_misses),
            cache_tokens_saved: get(&c.cache_tokens_saved),
            cache_bytes: get(&c.cache_bytes),
            cache_entries: get(&c.cache_entries),
            queue_depth,
            running,
            steps: get(&c.steps),
            step_seconds: get_f64(&c.step_seconds_bits),
            decode_tokens_per_second: get_f64(&c.decode_tokens_per_second_bits),
            last_batch: get(&c.last_batch),
            ttft_count: get(&c.ttft_count),
            ttft_sum: get_f64(&c.ttft_sum_bits),
            ttft_buckets: c.ttft_buckets.iter().map(get).collect(),
            max_batch: self.shared.limits.max_batch,
            max_queue: self.shared.limits.max_queue,
            ctx: self.shared.limits.ctx,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The prefix-state cache.

/// Fewest shared tokens for which a partial overlap (a rewound KV copy) is used.
const MIN_PARTIAL_REUSE: usize = 16;

/// A state after `tokens` (fed on top of the initial state), and the logits after the last one.
struct CacheEntry {
    tokens: Vec<u32>,
    state: State,
    logits: Vec<f32>,
    bytes: usize,
    /// Recency stamp for LRU eviction.
    used: u64,
}

/// Snapshots of states keyed by the ids they consumed, LRU-evicted to a byte budget.
struct PrefixCache {
    entries: Vec<CacheEntry>,
    budget: usize,
    bytes: usize,
    clock: u64,
}

/// A state resumed from the cache.
struct Resumed {
    state: State,
    /// Prompt tokens the state already holds.
    tokens: usize,
    /// The logits after them, when the state holds the whole prompt.
    logits: Option<Vec<f32>>,
}

impl PrefixCache {
    fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes: 0,
            clock: 0,
        }
    }

    /// The state sharing the longest prefix with `prompt`, if any entry shares one.
    fn lookup(&mut self, prompt: &[u32]) -> Option<Resumed> {
        // (usable length, entry index), best first.
        let mut cands: Vec<(usize, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let common = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                // Without logits at the end, at least one prompt token must be left to feed.
                let whole = common == e.tokens.len() && (common < prompt.len() || !e.logits.is_empty());
                // A partial overlap costs a copy of the whole entry: only worth it when long.
                let usable = if whole {
                    common
                } else {
                    common.min(prompt.len() - 1)
                };
                (usable > 0 && (whole || usable >= MIN_PARTIAL_REUSE)).then_some((usable, i))
            })
            .collect();
        cands.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (usable, i) in cands {
            let e = &self.entries[i];
            if usable == e.tokens.len() {
                let logits = (usable == prompt.len()).then(|| e.logits.clone());
                self.clock += 1;
                self.entries[i].used = self.clock;
                return Some(Resumed {
                    state: self.entries[i].state.clone(),
                    tokens: usable,
                    logits,
                });
            }
            // A partial overlap: only states that can rewind (KV caches) can use it.
            if e.state.family() != "kv-cache" {
                continue;
            }
            let mut state = e.state.clone();
            let base = state.tokens_seen() - e.tokens.len();
            if state.truncate(base + usable) {
                self.clock += 1;
                self.entries[i].used = self.clock;
                return Some(Resumed {
                    state,
                    tokens: usable,
                    logits: None,
                });
            }
        }
        None
    }

    /// Keeps a state; evicts the least recently used entries to stay within the budget.
    fn insert(&mut self, tokens: Vec<u32>, state: State, logits: Vec<f32>) {
        if tokens.is_empty() {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens == tokens) {
            e.used = self.clock;
            return;
        }
        let bytes = state.bytes() + 4 * (logits.len() + tokens.len()) + std::mem::size_of::<CacheEntry>();
        if bytes > self.budget {
            return;
        }
        while self.bytes + bytes > self.budget {
            let Some((oldest, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used) else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes;
        }
        self.bytes += bytes;
        self.entries.push(CacheEntry {
            tokens,
            state,
            logits,
            bytes,
            used: self.clock,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The engine.

/// One running sequence.
struct Seq<'t> {
    events: EventSender,
    submitted: Instant,
    /// Whether a token has been sampled yet (for time to first token).
    sampled_any: bool,
    /// Prompt then generated ids.
    history: Vec<u32>,
    prompt_len: usize,
    /// Ids of `history` the state holds.
    state_len: usize,
    /// Prompt tokens that came from the cache.
    cached: usize,
    state: State,
    /// Logits after the state's last token, when they have not been sampled from yet.
    logits: Option<Vec<f32>>,
    /// The greedy next token, picked by the model where it runs (see `step`), when it has
    /// not been taken yet.
    picked: Option<u32>,
    /// The logits last sampled from (after the state's last token): kept for the cache.
    /// Empty when the last token was picked without them.
    end_logits: Vec<f32>,
    /// No penalty and no logprobs: decode steps draw where the logits are
    /// (`Model::forward_drawn`) and need none on the host.
    drawn: bool,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    stop: StopMatcher,
    stop_ids: Vec<u32>,
    detok: DecodeStream<'t>,
    logprobs: Option<usize>,
    /// Text, ids and logprobs produced since the last delta.
    text: String,
    ids: Vec<u32>,
    token_logprobs: Vec<TokenLogprob>,
    finished: Option<FinishReason>,
}

impl Seq<'_> {
    /// Whether the prompt is in and a sampled token waits to be fed.
    fn has_token_to_feed(&self) -> bool {
        self.state_len >= self.prompt_len && self.state_len < self.history.len() && self.finished.is_none()
    }

    /// Sends what was produced since the last delta (text, or ids when logprobs are wanted).
    fn flush_delta(&mut self) {
        if self.text.is_empty() && (self.token_logprobs.is_empty() || self.ids.is_empty()) {
            return;
        }
        self.events.send(Event::Delta {
            text: std::mem::take(&mut self.text),
            tokens: std::mem::take(&mut self.ids),
            logprobs: std::mem::take(&mut self.token_logprobs),
        });
    }
}

/// Turns requests into what the engine runs (see [`EngineHandle::prepare`]).
struct Preparer {
    tokenizer: Arc<Tokenizer>,
    chat: Option<ChatFormat>,
    vocab_size: usize,
    /// Tokens the initial state already holds.
    base: usize,
    /// The engine's context bound.
    ctx: usize,
}

impl Preparer {
    /// Refuses a text of `bytes` bytes without tokenizing it when even at the most bytes per
    /// token it would not fit the context (a multi-megabyte prompt costs no tokenizer memory).
    fn refuse_surely_too_long(&self, bytes: usize, param: &'static str) -> Result<(), RequestError> {
        let at_least = bytes / self.tokenizer.max_token_bytes();
        let room = self.ctx.saturating_sub(self.base);
        if at_least >= room {
            return Err(RequestError::new(
                ErrorKind::ContextLength,
                Some(param),
                format!(
                    "the prompt ({bytes} bytes) is at least {at_least} tokens, but the context is {} \
                     tokens{}: shorten the prompt",
                    self.ctx,
                    if self.base > 0 {
                        format!(" ({} of them taken by the loaded state)", self.base)
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Renders and tokenizes a request's prompt and works out its limits.
    fn prepare(&self, r: &Request) -> Result<Prepared, RequestError> {
        let invalid =
            |param: &'static str, msg: String| RequestError::new(ErrorKind::InvalidRequest, Some(param), msg);
        r.sampling
            .validate()
            .map_err(|e| invalid("sampling", format!("{e:#}")))?;
        let fresh = self.base == 0;
        let mut stop = r.stop.clone();
        let mut stop_ids = self.tokenizer.specials().eos.clone();
        let (prompt, param) = match &r.prompt {
            Prompt::Text(t) => {
                self.refuse_surely_too_long(t.len(), "prompt")?;
                (
                    self.tokenizer
                        .encode(t, fresh)
                        .map_err(|e| invalid("prompt", format!("cannot tokenize the prompt: {e:#}")))?,
                    "prompt",
                )
            }
            Prompt::Tokens(ids) => {
                let vocab = self.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(invalid(
                        "prompt",
                        format!("token id {bad} is out of range: the vocabulary has {vocab} tokens"),
                    ));
                }
                (ids.clone(), "prompt")
            }
            Prompt::Chat(messages) => {
                let Some(chat) = &self.chat else {
                    return Err(invalid("messages", "this model has no chat template".into()));
                };
                let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
                self.refuse_surely_too_long(bytes, "messages")?;
                // Message contents are text: only the template's markup makes control tokens.
                let mut ids = chat
                    .template
                    .tokenize(&self.tokenizer, messages, true)
                    .map_err(|e| invalid("messages", format!("{e:#}")))?;
                if !fresh
                    && ids
                        .first()
                        .is_some_and(|&t| Some(t) == self.tokenizer.specials().bos)
                {
                    ids.remove(0); // resuming a loaded state: BOS is already behind it
                }
                stop.extend(chat.stop_strings.iter().cloned());
                stop_ids.clone_from(&chat.stop_ids);
                (ids, "messages")
            }
        };
        if prompt.is_empty() {
            return Err(invalid(
                param,
                "the prompt is empty: there is nothing to continue from".into(),
            ));
        }
        let ctx = self.ctx;
        let base = self.base;
        let room = ctx.saturating_sub(base);
        let taken = if base > 0 {
            format!(" ({base} of them taken by the loaded state)")
        } else {
            String::new()
        };
        if prompt.len() >= room {
            return Err(RequestError::new(
                ErrorKind::ContextLength,
                Some(param),
                format!(
                    "the prompt is {} tokens, but the context is {ctx} tokens{taken}: shorten the prompt",
                    prompt.len()
                ),
            ));
        }
        let max_tokens = match r.max_tokens {
            None => room - prompt.len(),
            Some(m) if prompt.len() + m > room => {
                return Err(RequestError::new(
                    ErrorKind::ContextLength,
                    Some("max_tokens"),
                    format!(
                        "the context is {ctx} tokens{taken}, but the prompt ({} tokens) plus max_tokens \
                         ({m}) exceed it: lower max_tokens or shorten the prompt",
                        prompt.len()
                    ),
                ));
            }
            Some(m) => m,
        };
        Ok(Prepared {
            prompt,
            max_tokens,
            stop,
            stop_ids,
        })
    }
}

/// The scheduler loop; see the module documentation. Build with [`Engine::new`], run with
/// [`Engine::run`] on a thread of its own.
pub struct Engine<'a> {
    model: &'a dyn Model,
    prep: Arc<Preparer>,
    initial: State,
    shared: Arc<Shared>,
    cache: PrefixCache,
}

impl<'a> Engine<'a> {
    /// An engine over `model`; sequences start from `initial` (a fresh state, or a loaded one).
    /// `config.ctx` is clamped to the model's context length.
    pub fn new(
        model: &'a dyn Model,
        tokenizer: Arc<Tokenizer>,
        chat: Option<ChatFormat>,
        initial: State,
        mut config: EngineConfig,
    ) -> (Engine<'a>, EngineHandle) {
        if let Some(c) = model.info().context_length {
            config.ctx = config.ctx.min(c);
        }
        config.max_batch = config.max_batch.max(1);
        config.prefill_chunk = config.prefill_chunk.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                running: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
            limits: config.clone(),
            stopped: AtomicBool::new(false),
        });
        let prep = Arc::new(Preparer {
            tokenizer,
            chat,
            vocab_size: model.info().vocab_size,
            base: initial.tokens_seen(),
            ctx: config.ctx,
        });
        let engine = Engine {
            model,
            prep: prep.clone(),
            initial,
            shared: shared.clone(),
            cache: PrefixCache::new(config.cache_bytes),
        };
        (engine, EngineHandle { shared, prep })
    }

    /// Runs until [`EngineHandle::shutdown`] has been called and every accepted request ended.
    pub fn run(mut self) {
        // However the loop ends (even by a panic), later submits are refused and queued
        // requests see their channel close instead of waiting forever.
        let _stop = StopGuard(self.shared.clone());
        let prep = self.prep.clone();
        let tokenizer: &Tokenizer = &prep.tokenizer;
        let counters = self.shared.clone();
        let c = &counters.counters;
        let mut running: Vec<Seq<'_>> = Vec::new();
        loop {
            // Free the slots of clients that went away.
            let before = running.len();
            running.retain(|s| !s.events.is_closed());
            c.requests_cancelled
                .fetch_add((before - running.len()) as u64, Ordering::Relaxed);

            // Admit new requests, or wait for some.
            let admitted: Vec<Pending> = {
                let mut q = lock(&self.shared.queue);
                q.running = running.len();
                while running.is_empty() && q.waiting.is_empty() && !q.shutdown {
                    q = self.shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if running.is_empty() && q.waiting.is_empty() {
                    break; // shut down, and nothing left to do
                }
                let free = self.shared.limits.max_batch.saturating_sub(running.len());
                let n = free.min(q.waiting.len());
                q.running += n;
                q.waiting.drain(..n).collect()
            };
            for p in admitted {
                if p.events.is_closed() {
                    c.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match self.admit(p, tokenizer) {
                    Ok(seq) => running.push(seq),
                    Err((events, err)) => {
                        c.requests_failed.fetch_add(1, Ordering::Relaxed);
                        events.send(Event::Failed(err));
                    }
                }
            }
            lock(&self.shared.queue).running = running.len();
            if running.is_empty() {
                continue;
            }

            // One batched step; a panic in the model fails the batch instead of the server.
            let step = catch_unwind(AssertUnwindSafe(|| self.step(&mut running)));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("the model failed: {e:#}")),
                Err(p) => {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Some(format!("internal error in the model: {what}"))
                }
            };
            if let Some(msg) = failure {
                tracing::error!("{msg}");
                for s in running.drain(..) {
                    c.requests_failed.fetch_add(1, Ordering::Relaxed);
                    s.events.send(Event::Failed(RequestError::new(
                        ErrorKind::Internal,
                        None,
                        msg.clone(),
                    )));
                }
            }

            if !self.shared.limits.step_pause.is_zero() {
                std::thread::sleep(self.shared.limits.step_pause);
            }

            // Retire finished sequences.
            let mut i = 0;
            while i < running.len() {
                if running[i].finished.is_some() {
                    let s = running.swap_remove(i);
                    self.retire(s);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Turns a queued request into a running sequence, or says why it cannot run.
    #[allow(clippy::result_large_err)]
    fn admit<'t>(
        &mut self,
        p: Pending,
        tokenizer: &'t Tokenizer,
    ) -> Result<Seq<'t>, (EventSender, RequestError)> {
        let Pending {
            request,
            prepared,
            events,
            submitted,
        } = p;
        let Prepared {
            prompt,
            max_tokens,
            stop,
            stop_ids,
        } = prepared;
        let c = &self.shared.counters;
        let (state, cached, logits) = match self.cache.lookup(&prompt) {
            Some(r) => {
                c.cache_hits.fetch_add(1, Ordering::Relaxed);
                c.cache_tokens_saved.fetch_add(r.tokens as u64, Ordering::Relaxed);
                (r.state, r.tokens, r.logits)
            }
            None => {
                if self.cache.budget > 0 {
                    c.cache_misses.fetch_add(1, Ordering::Relaxed);
                }
                (self.initial.clone(), 0, None)
            }
        };
        c.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::Relaxed);
        events.send(Event::Started {
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
        });
        Ok(Seq {
            events,
            submitted,
            sampled_any: false,
            prompt_len: prompt.len(),
            history: prompt,
            state_len: cached,
            cached,
            state,
            logits,
            picked: None,
            end_logits: Vec::new(),
            drawn: !request.sampling.has_penalties() && request.logprobs.is_none(),
            generated: 0,
            max_tokens,
            sampler: Sampler::new(request.sampling),
            stop: StopMatcher::new(stop),
            stop_ids,
            detok: tokenizer.decode_stream(true),
            logprobs: request.logprobs,
            text: String::new(),
            ids: Vec::new(),
            token_logprobs: Vec::new(),
            finished: None,
        })
    }

    /// One batched forward over every running sequence that needs one, then sampling. A
    /// decode step whose sequences need no penalty or logprobs asks the model for its draws
    /// only (`Model::forward_drawn`: on a GPU the logits never leave it).
    fn step(&mut self, running: &mut [Seq<'_>]) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let chunk = self.shared.limits.prefill_chunk;
        let (mut decode_rows, mut prefill_rows) = (0usize, 0usize);
        let mut picks_only = true;
        let mut fed: Vec<(usize, usize)> = Vec::new(); // (sequence, tokens fed)
        let mut batch: Vec<SeqInput<'_>> = Vec::with_capacity(running.len());
        let mut samplers: Vec<&mut Sampler> = Vec::with_capacity(running.len());
        for (i, s) in running.iter_mut().enumerate() {
            if s.logits.is_some() || s.finished.is_some() {
                continue; // logits at hand (a whole-prompt cache hit): sample without a forward
            }
            let range = if s.state_len < s.prompt_len {
                let end = (s.state_len + chunk).min(s.prompt_len);
                prefill_rows += end - s.state_len;
                s.state_len..end
            } else if s.has_token_to_feed() {
                decode_rows += s.history.len() - s.state_len;
                s.state_len..s.history.len()
            } else {
                continue;
            };
            picks_only &= s.drawn && s.state_len >= s.prompt_len;
            fed.push((i, range.len()));
            batch.push(SeqInput {
                tokens: &s.history[range],
                state: &mut s.state,
            });
            samplers.push(&mut s.sampler);
        }
        // Only a step that draws spends the samplers' uniforms (else sampling does, after).
        let draws: Option<Vec<Draw>> =
            (!batch.is_empty() && picks_only).then(|| samplers.into_iter().map(|s| s.next_draw()).collect());
        if let Some(draws) = draws {
            let picks = self.model.forward_drawn(&mut batch, &draws)?;
            drop(batch);
            for (&(i, n), id) in fed.iter().zip(picks) {
                let s = &mut running[i];
                s.state_len += n;
                s.picked = Some(id);
            }
        } else if !batch.is_empty() {
            let out = self.model.forward(&mut batch, Logits::Last)?;
            for (logits, seq) in out.iter().zip(batch.iter()) {
                crate::models::check_finite_logits(logits, seq.state.tokens_seen().saturating_sub(1))?;
            }
            drop(batch);
            for (&(i, n), logits) in fed.iter().zip(out) {
                let s = &mut running[i];
                let prefill = s.state_len < s.prompt_len;
                s.state_len += n;
                if prefill {
                    self.shared
                        .counters
                        .prompt_tokens_fed
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if s.state_len < s.prompt_len {
                        continue; // more prompt chunks to come
                    }
                    // The state after the whole prompt: the next turn of a chat resumes here.
                    if self.cache.budget > 0 {
                        self.cache.insert(
                            s.history[..s.prompt_len].to_vec(),
                            s.state.clone(),
                            logits.clone(),
                        );
                    }
                }
                s.logits = Some(logits);
            }
        } else {
            drop(batch);
        }

        let mut sampled = 0u64;
        for s in running.iter_mut() {
            if let Some(logits) = s.logits.take() {
                sampled += self.sample_one(s, &logits) as u64;
                s.end_logits = logits;
            } else if let Some(id) = s.picked.take() {
                s.end_logits.clear();
                sampled += self.take_token(s, id, None) as u64;
            }
        }

        let dt = t0.elapsed().as_secs_f64();
        let c = &self.shared.counters;
        c.steps.fetch_add(1, Ordering::Relaxed);
        add_f64(&c.step_seconds_bits, dt);
        c.last_batch.store(running.len() as u64, Ordering::Relaxed);
        c.generated_tokens.fetch_add(sampled, Ordering::Relaxed);
        if prefill_rows == 0 && decode_rows > 0 && dt > 0.0 {
            let rate = decode_rows as f64 / dt;
            let old = get_f64(&c.decode_tokens_per_second_bits);
            let new = if old == 0.0 { rate } else { 0.8 * old + 0.2 * rate };
            c.decode_tokens_per_second_bits
                .store(new.to_bits(), Ordering::Relaxed);
        }
        let c_bytes = self.cache.bytes as u64;
        c.cache_bytes.store(c_bytes, Ordering::Relaxed);
        c.cache_entries
            .store(self.cache.entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Samples a sequence's next token from `logits`, streams its text and applies the stop
    /// rules; returns whether a token was generated.
    fn sample_one(&self, s: &mut Seq<'_>, logits: &[f32]) -> bool {
        let id = s.sampler.sample(logits, &s.history, s.prompt_len);
        self.take_token(s, id, Some(logits))
    }

    /// Takes `id` as the sequence's next token (sampled from `logits`, or picked by the model
    /// when `None`): streams its text and applies the stop rules; returns whether a token
    /// was generated.
    fn take_token(&self, s: &mut Seq<'_>, id: u32, logits: Option<&[f32]>) -> bool {
        if s.generated >= s.max_tokens {
            self.finish(s, FinishReason::Length);
            return false;
        }
        if !s.sampled_any {
            s.sampled_any = true;
            self.observe_ttft(s.submitted.elapsed());
        }
        if s.stop_ids.contains(&id) {
            self.finish(s, FinishReason::Stop);
            return true;
        }
        if let (Some(k), Some(logits)) = (s.logprobs, logits) {
            s.token_logprobs.push(self.logprob_of(logits, id, k));
        }
        s.history.push(id);
        s.ids.push(id);
        s.generated += 1;
        match s.detok.push(id) {
            Ok(Some(delta)) => match s.stop.push(&delta) {
                StopOutcome::Continue(t) => s.text.push_str(&t),
                StopOutcome::Stop(t) => {
                    s.text.push_str(&t);
                    self.finish(s, FinishReason::Stop);
                    return true;
                }
            },
            Ok(None) => {}
            Err(e) => {
                // An id the tokenizer cannot decode: report, end the sequence.
                s.events.send(Event::Failed(RequestError::new(
                    ErrorKind::Internal,
                    None,
                    format!("cannot decode token {id}: {e:#}"),
                )));
                s.finished = Some(FinishReason::Stop);
                return true;
            }
        }
        if s.generated >= s.max_tokens {
            self.finish(s, FinishReason::Length);
        } else {
            s.flush_delta();
        }
        true
    }

    /// Flushes held text and marks the sequence finished (`retire` sends `Done`).
    fn finish(&self, s: &mut Seq<'_>, reason: FinishReason) {
        if !s.stop.is_stopped() {
            let rest = s.detok.finish().unwrap_or_default();
            match s.stop.push(&rest) {
                StopOutcome::Continue(t) | StopOutcome::Stop(t) => s.text.push_str(&t),
            }
            let held = s.stop.finish();
            s.text.push_str(&held);
        }
        s.flush_delta();
        s.finished = Some(reason);
    }

    /// The chosen token's log-probability and the `k` most likely tokens'.
    fn logprob_of(&self, logits: &[f32], id: u32, k: usize) -> TokenLogprob {
        let lp = log_softmax(logits);
        let text = |t: u32| self.prep.tokenizer.decode(&[t], false).unwrap_or_default();
        let mut top = Vec::new();
        if k > 0 {
            let mut order: Vec<u32> = (0..lp.len() as u32).collect();
            let k = k.min(order.len());
            let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
            if k < order.len() {
                order.select_nth_unstable_by(k - 1, by);
                order.truncate(k);
            }
            order.sort_by(by);
            top = order.into_iter().map(|t| (text(t), lp[t as usize])).collect();
        }
        TokenLogprob {
            text: text(id),
            logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
            top,
        }
    }

    fn observe_ttft(&self, d: Duration) {
        let c = &self.shared.counters;
        let secs = d.as_secs_f64();
        c.ttft_count.fetch_add(1, Ordering::Relaxed);
        add_f64(&c.ttft_sum_bits, secs);
        for (b, bound) in c.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends `Done` and keeps the final state in the prefix cache.
    fn retire(&mut self, s: Seq<'_>) {
        let Some(finish) = s.finished else { return };
        let c = &self.shared.counters;
        let delivered = s.events.send(Event::Done {
            finish,
            usage: Usage {
                prompt_tokens: s.prompt_len,
                completion_tokens: s.generated,
                cached_tokens: s.cached,
            },
        });
        if delivered {
            c.requests_completed.fetch_add(1, Ordering::Relaxed);
        } else {
            c.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        }
        // The state holds history[..state_len] and `end_logits` follow it (empty when the
        // last token was picked without logits: the entry then serves longer prompts only).
        if self.cache.budget > 0 && s.state_len > s.prompt_len {
            let mut tokens = s.history;
            tokens.truncate(s.state_len);
            self.cache.insert(tokens, s.state, s.end_logits);
        }
    }
}

/// Marks the engine stopped and closes the channels of requests still queued.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        let left: Vec<Pending> = {
            let mut q = lock(&self.0.queue);
            q.running = 0;
            q.waiting.drain(..).collect()
        };
        drop(left);
    }
}

/// A request's prompt and limits, ready to run.
struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{KvCache, RwkvState};

    fn rwkv_after(tokens: usize) -> State {
        let mut r = RwkvState::new(1, 4, 1, 2);
        r.pos = tokens;
        State::Rwkv(r)
    }

    fn kv_after(tokens: usize) -> State {
        let mut c = KvCache::new(1, 2, None);
        for _ in 0..tokens {
            c.write(0, &[0.0, 0.0], &[0.0, 0.0]);
            c.advance(1);
        }
        State::Kv(c)
    }

    fn ids(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    #[test]
    fn recurrent_states_resume_from_the_longest_whole_prefix() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(ids(5), rwkv_after(5), vec![0.5; 3]);
        cache.insert(ids(9), rwkv_after(9), vec![0.9; 3]);
        let r = cache.lookup(&ids(12)).unwrap();
        assert_eq!((r.tokens, r.state.tokens_seen(), r.logits), (9, 9, None));
        // The whole prompt cached: its logits come along, nothing needs feeding.
        let r = cache.lookup(&ids(9)).unwrap();
        assert_eq!((r.tokens, r.logits), (9, Some(vec![0.9; 3])));
        // A prompt that diverges inside an entry: a recurrent state cannot rewind.
        let mut p = ids(9);
        p[7] = 100;
        assert_eq!(cache.lookup(&p).unwrap().tokens, 5);
        assert!(cache.lookup(&[7, 8]).is_none());
    }

    #[test]
    fn kv_states_rewind_to_a_long_enough_partial_overlap() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(ids(40), kv_after(40), vec![0.0; 3]);
        let mut p = ids(30);
        p[25] = 999;
        let r = cache.lookup(&p).unwrap();
        assert_eq!((r.tokens, r.state.tokens_seen()), (25, 25));
        // A short overlap is not worth copying the whole entry.
        let mut p = ids(30);
        p[10] = 999;
        assert!(cache.lookup(&p).is_none());
        // The prompt is a prefix of the entry: rewind to leave the last token to feed.
        let r = cache.lookup(&ids(20)).unwrap();
        assert_eq!((r.tokens, r.logits), (19, None));
    }

    #[test]
    fn eviction_keeps_the_recently_used_within_budget() {
        let one = rwkv_after(1).bytes() + 4 * 4 + std::mem::size_of::<CacheEntry>();
        let mut cache = PrefixCache::new(2 * one + 8);
        cache.insert(vec![1], rwkv_after(1), vec![]);
        cache.insert(vec![2], rwkv_after(1), vec![]);
        assert!(cache.lookup(&[1, 5]).is_some()); // touches [1]
        cache.insert(vec![3], rwkv_after(1), vec![]); // evicts [2], the least recently used
        assert!(cache.lookup(&[2, 5]).is_none());
        assert!(cache.lookup(&[1, 5]).is_some() && cache.lookup(&[3, 5]).is_some());
        assert!(cache.bytes <= cache.budget);
        // An entry larger than the whole budget is not kept.
        cache.insert(ids(10), kv_after(100_000), vec![]);
        assert!(cache.lookup(&ids(11)).is_none_or(|r| r.tokens < 10));
    }
}
