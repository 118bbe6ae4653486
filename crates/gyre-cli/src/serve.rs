//! `gyre serve`: the OpenAI-compatible server.
//!
//! Opens the model, tokenizer and chat setup, starts the engine (`gyre::engine::scheduler`) on
//! a scoped thread that borrows them, and runs the HTTP server (`gyre_server::serve`) on this
//! one until SIGTERM/SIGINT; then the engine drains and the command returns.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use gyre::engine::scheduler::{ChatFormat, Engine, EngineConfig};

/// Context bound for models whose state does not limit it (recurrent models), unless --ctx.
const DEFAULT_RECURRENT_CTX: usize = 8192;

/// Arguments of `gyre serve`.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::ModelArgs,
    /// Address to listen on (loopback by default; use 0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most sequences decoding together in one batched step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; beyond that, 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Context bound in tokens (prompt + completion); default: the model's, or 8192 for
    /// recurrent models.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Start every sequence from this state file (`gyre state save`, or an RWKV state).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Memory for the prefix-state cache, in MiB (0 turns it off).
    #[arg(long, default_value_t = 512)]
    pub prefix_cache_mib: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// The model name `/v1/models` lists (default: the model directory's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Seconds a client may take to send a request's headers (also: how long a keep-alive
    /// connection may idle between requests).
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client may take to send a request's body.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Seconds in-flight responses may take to finish after SIGTERM/SIGINT before they are cut off.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Accept this Host name too (repeatable; `*` accepts any). Bound to loopback, the server
    /// answers only to localhost, 127.0.0.1 and [::1] otherwise (DNS rebinding).
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Serve browser requests from this origin and send it CORS headers (repeatable; `*` allows
    /// any). Requests with another Origin header are refused.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Pause after every engine step, in milliseconds (for tests that need slow requests).
    #[arg(long, default_value_t = 0, hide = true)]
    pub step_pause_ms: u64,
}

/// A positive number of seconds from the command line.
fn seconds(flag: &str, v: f64) -> Result<std::time::Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e6) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// Runs `gyre serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.ctx == Some(0) {
        bail!("--ctx must be at least 1");
    }
    let loaded = crate::open(&args.model)?;
    let tokenizer = loaded.shared_tokenizer()?.clone();
    let chat = loaded.chat_setup()?;
    let initial = loaded.initial_state(args.state.as_deref())?;
    let model = loaded.model.as_ref();
    let ctx = args
        .ctx
        .or(model.info().context_length)
        .unwrap_or(DEFAULT_RECURRENT_CTX);
    if let (Some(asked), Some(limit)) = (args.ctx, model.info().context_length) {
        if asked > limit {
            eprintln!(
                "warning: --ctx {asked} is more than the model's context of {limit} tokens; serving {limit}"
            );
        }
    }
    let config = EngineConfig {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        ctx,
        cache_bytes: args.prefix_cache_mib << 20,
        step_pause: std::time::Duration::from_millis(args.step_pause_ms),
        ..EngineConfig::default()
    };
    let format = ChatFormat {
        template: std::sync::Arc::new(chat.template),
        stop_ids: chat.stop_ids,
        stop_strings: chat.stop_strings,
    };
    let (engine, handle) = Engine::new(model, tokenizer, Some(format), initial, config);
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let path = args.model.model.clone().unwrap_or_default();
        let p = path.canonicalize().unwrap_or(path);
        let p = if p.is_file() {
            p.parent().map(PathBuf::from).unwrap_or(p)
        } else {
            p
        };
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "gyre".into())
    });
    let server = gyre_server::ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        model_id,
        max_body_bytes: args.max_body_bytes,
        header_timeout: seconds("--header-timeout", args.header_timeout)?,
        body_timeout: seconds("--body-timeout", args.body_timeout)?,
        shutdown_timeout: seconds("--shutdown-timeout", args.shutdown_timeout)?,
        allowed_hosts: args.allowed_hosts.clone(),
        cors_origins: args.cors_origins.clone(),
        ..gyre_server::ServerConfig::default()
    };
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("gyre-engine".into())
            .spawn_scoped(s, move || engine.run())?;
        let served = gyre_server::serve(server, handle.clone());
        handle.shutdown();
        if worker.join().is_err() {
            bail!("the engine thread panicked");
        }
        served
    })
}
