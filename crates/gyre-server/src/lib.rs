//! gyre-server: the OpenAI-compatible HTTP front end over the engine's handle.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or SSE streaming),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Around them: bearer-key
//! auth (everything but `/health`), a request body limit, OpenAI-style JSON errors for every
//! failure, 429 with `Retry-After` when the engine's queue is full, and a graceful shutdown on
//! SIGTERM/SIGINT that stops accepting connections, lets in-flight responses and streams finish,
//! then stops the engine.
//!
//! This crate talks to the model only through [`EngineHandle`] (submit a request, read its
//! events); it never touches model code, tokenizers or states. The engine runs on its own
//! thread; HTTP runs on a small tokio runtime that [`serve`] builds.

mod error;
mod metrics;
mod openai;
mod params;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use gyre::engine::scheduler::EngineHandle;

pub use error::ApiError;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to bind (loopback by default in the CLI).
    pub host: String,
    /// Port to bind; 0 picks a free one (the chosen address is printed).
    pub port: u16,
    /// Required bearer key, if any.
    pub api_key: Option<String>,
    /// The id `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Tokio worker threads for HTTP (the model runs on the engine's own threads).
    pub http_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_id: "gyre".into(),
            max_body_bytes: 8 << 20,
            http_threads: 2,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: EngineHandle,
    pub config: ServerConfig,
    pub http: metrics::HttpCounters,
    pub started: std::time::SystemTime,
}

/// Serves until SIGTERM or SIGINT, then finishes in-flight responses and shuts the engine down.
///
/// Blocks the calling thread. Prints `gyre serve: listening on http://ADDR` to stderr once the
/// socket is bound (with `port` 0, ADDR shows the port chosen).
pub fn serve(config: ServerConfig, engine: EngineHandle) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http_threads.max(1))
        .thread_name("gyre-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let result = rt.block_on(serve_async(config, engine.clone()));
    engine.shutdown();
    result
}

/// The router with every route and layer, for [`serve`] and for tests.
pub fn router(config: ServerConfig, engine: EngineHandle) -> Router {
    let state = Arc::new(AppState {
        engine,
        http: metrics::HttpCounters::default(),
        started: std::time::SystemTime::now(),
        config,
    });
    let limit = state.config.max_body_bytes;
    let protected = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/metrics", get(metrics::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn serve_async(config: ServerConfig, engine: EngineHandle) -> Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    eprintln!(
        "gyre serve: listening on http://{local} (model '{}')",
        config.model_id
    );
    let app = router(config, engine);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    eprintln!("gyre serve: in-flight requests finished; exiting");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("gyre serve: shutting down: no new connections; finishing in-flight requests");
}

/// 200 while the engine runs, 503 once it has stopped (so a load balancer drops this replica).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_running() {
        axum::Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine has stopped",
        )
        .into_response()
    }
}

async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no route {} {}: gyre serves POST /v1/chat/completions, POST /v1/completions, \
             GET /v1/models, GET /health, GET /metrics",
            req.method(),
            req.uri().path()
        ),
    )
    .with_code("not_found")
}

/// Rejects requests without the configured bearer key.
async fn auth(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_some() {
                "incorrect API key provided"
            } else {
                "missing API key: send the header `Authorization: Bearer KEY` (the key given to --api-key)"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg)
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so timing does not leak how much of a key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Counts every response by route and status for `/metrics`.
async fn count(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let path: &'static str = match req.uri().path() {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    };
    let resp = next.run(req).await;
    state.http.record(path, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
