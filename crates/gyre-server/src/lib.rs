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
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may sit idle between requests, before it is closed.
    pub header_timeout: std::time::Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: std::time::Duration,
    /// After SIGTERM/SIGINT: how long in-flight responses may take to finish before they are
    /// cut off and the server exits.
    pub shutdown_timeout: std::time::Duration,
    /// Host names accepted besides the loopback names, when bound to a loopback address (any
    /// Host is accepted on other addresses unless this is set). `*` accepts every Host.
    pub allowed_hosts: Vec<String>,
    /// Origins whose (browser, cross-origin) requests are served and get CORS headers; `*`
    /// allows every origin. Requests with any other `Origin` header are refused.
    pub cors_origins: Vec<String>,
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
            header_timeout: std::time::Duration::from_secs(10),
            body_timeout: std::time::Duration::from_secs(30),
            shutdown_timeout: std::time::Duration::from_secs(30),
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// True when the configured address is a loopback one.
    fn loopback(&self) -> bool {
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
    // Connections still open after the shutdown deadline are dropped with the runtime (their
    // requests are cancelled in the engine); a prompt being prepared ends within its budget.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
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
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), host_and_origin))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Names a loopback server answers to without `--allowed-host`.
const LOOPBACK_HOSTS: &[&str] = &["localhost", "127.0.0.1", "[::1]", "::1"];

/// Refuses requests whose `Host` is not this server's (DNS rebinding: a page on
/// `attacker.example` resolving to 127.0.0.1) and browser requests from origins not allowed
/// (CSRF: a cross-origin `text/plain` POST needs no preflight); answers CORS preflights for the
/// allowed origins and adds the CORS headers to their responses.
async fn host_and_origin(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let cfg = &state.config;
    let forbidden =
        |msg: String| ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", msg).into_response();
    if let Some(host) = req.headers().get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        // The name without the port (an IPv6 literal keeps its brackets).
        let name = match host.rfind(':') {
            Some(i) if !host[i..].contains(']') => &host[..i],
            _ => host,
        };
        let allowed = cfg
            .allowed_hosts
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(name))
            || (cfg.allowed_hosts.is_empty() && !cfg.loopback())
            || LOOPBACK_HOSTS.iter().any(|h| h.eq_ignore_ascii_case(name));
        if !allowed {
            return forbidden(format!(
                "Host '{host}' is not allowed: this server answers to its loopback names only; start it \
                 with --allowed-host {name} to accept this name"
            ));
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("").to_string());
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    if !cfg.cors_origins.iter().any(|o| o == "*" || *o == origin) {
        return forbidden(format!(
            "cross-origin requests from '{origin}' are refused; start the server with --cors-origin {origin} \
             to allow them"
        ));
    }
    let cors = |mut resp: Response| {
        let h = resp.headers_mut();
        if let Ok(v) = axum::http::HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.insert(header::VARY, axum::http::HeaderValue::from_static("Origin"));
        resp
    };
    if req.method() == axum::http::Method::OPTIONS {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            axum::http::HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            axum::http::HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            axum::http::HeaderValue::from_static("600"),
        );
        return cors(resp);
    }
    cors(next.run(req).await)
}

/// Reads a request's whole body before the handler runs: a declared length over the limit is a
/// 413 at once (nothing is read), and a body that does not arrive within the body timeout is a
/// 408, so a client sending half a body cannot hold its connection.
async fn read_body(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(state.config.body_timeout, axum::body::to_bytes(body, limit)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    state.config.body_timeout.as_secs_f64()
                ),
            )
            .into_response()
        }
    };
    next.run(HttpRequest::from_parts(parts, axum::body::Body::from(bytes)))
        .await
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
    let (header_timeout, shutdown_timeout) = (config.header_timeout, config.shutdown_timeout);
    let app = router(config, engine);
    // hyper directly rather than `axum::serve`, for what a public server needs: a deadline on
    // request headers (which also closes idle keep-alive connections), support for clients that
    // half-close their side after sending (a disconnect is a failed write, not a read's EOF),
    // and a deadline on the graceful shutdown.
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .half_close(true)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    // Too many open files and the like: back off, keep serving.
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = builder
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut signal => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => eprintln!("gyre serve: in-flight requests finished; exiting"),
        _ = tokio::time::sleep(shutdown_timeout) => eprintln!(
            "gyre serve: in-flight requests did not finish within {} s; cutting them off",
            shutdown_timeout.as_secs_f64()
        ),
    }
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
