//! `gyre serve` end to end: the real binary on a loopback port, driven with raw HTTP (errors,
//! auth, limits, overload, disconnects, SIGTERM) and with the official `openai` Python client
//! (tools/test_server_openai.py: chat and completions, streaming, 32 concurrent greedy clients,
//! the prefix-state cache). The Llama model is the tiny_chat fixture (greedy reference outputs
//! from transformers in expected.json); the recurrent one is a RecurrentGemma fixture with a
//! word-level tokenizer written here.

mod common;

use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running `gyre serve`; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        Server::start_env(model, args, &[])
    }

    fn start_env(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gyre"))
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start gyre serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("");
                    let port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(120))
            .ok()
            .flatten()
            .expect("gyre serve did not print its address");
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP response.
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// Asserts the status and an OpenAI-style error body; returns the error object.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error object without `{k}`: {}", self.body);
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        e.clone()
    }
}

fn request_bytes(port: u16, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
    out
}

fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    // The server may answer (413) before it has read all of a large body.
    let _ = s.write_all(&request_bytes(port, method, path, key, body));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Resp {
        status,
        head,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

fn post(port: u16, path: &str, key: Option<&str>, body: &Value) -> Resp {
    http(port, "POST", path, key, body.to_string().as_bytes())
}

/// Opens a request and reads until the first SSE data line; returns the open stream.
fn open_stream(port: u16, key: Option<&str>, body: &Value) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&request_bytes(
        port,
        "POST",
        "/v1/completions",
        key,
        body.to_string().as_bytes(),
    ))
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    (s, text)
}

/// Reads one gauge or counter from /metrics.
fn metric(port: u16, key: Option<&str>, name: &str) -> f64 {
    let r = http(port, "GET", "/metrics", key, b"");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{}", r.body))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
           "temperature": 0})
}

#[test]
fn auth_limits_and_bad_input_get_openai_errors() {
    let key = "sk-test-key";
    let srv = Server::start(&tiny(), &["--api-key", key, "--max-body-bytes", "65536"]);
    let p = srv.port;
    let k = Some(key);

    // Auth: /health is open, everything else needs the key.
    assert_eq!(http(p, "GET", "/health", None, b"").status, 200);
    let e = post(p, "/v1/chat/completions", None, &chat_body("hi", 2)).error(401);
    assert_eq!(e["code"], "invalid_api_key");
    post(p, "/v1/chat/completions", Some("sk-wrong"), &chat_body("hi", 2)).error(401);
    http(p, "GET", "/metrics", None, b"").error(401);
    http(p, "GET", "/v1/models", Some("sk-test-keyX"), b"").error(401);
    let models = http(p, "GET", "/v1/models", k, b"");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "tiny_chat");

    // Malformed bodies and fields: 400 naming the field.
    let raw = |path: &str, body: &str| http(p, "POST", path, k, body.as_bytes());
    assert!(
        raw("/v1/chat/completions", "{\"messages\": [").error(400)["message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
    raw("/v1/completions", "[1, 2]").error(400);
    raw("/v1/completions", "").error(400);
    let bad = |path: &str, body: Value, param: &str| {
        let e = post(p, path, k, &body).error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
        e
    };
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    bad(chat, json!({"messages": msgs, "n": 2}), "n");
    bad(chat, json!({"messages": msgs, "max_tokens": -1}), "max_tokens");
    bad(chat, json!({"messages": msgs, "max_tokens": 0}), "max_tokens");
    bad(
        chat,
        json!({"messages": msgs, "max_completion_tokens": -3}),
        "max_completion_tokens",
    );
    bad(chat, json!({"messages": msgs, "max_tokens": "5"}), "max_tokens");
    bad(chat, json!({"messages": msgs, "max_tokens": 1.5}), "max_tokens");
    let e = bad(
        chat,
        json!({"messages": msgs, "max_tokens": 1_000_000}),
        "max_tokens",
    );
    assert_eq!(e["code"], "context_length_exceeded");
    bad(
        chat,
        json!({"messages": msgs, "temperature": "hot"}),
        "temperature",
    );
    bad(chat, json!({"messages": msgs, "temperature": -1}), "temperature");
    bad(chat, json!({"messages": msgs, "top_p": 2}), "top_p");
    bad(chat, json!({"messages": msgs, "stop": [1]}), "stop");
    bad(chat, json!({"messages": msgs, "stream": "yes"}), "stream");
    bad(
        chat,
        json!({"messages": msgs, "logprobs": true, "top_logprobs": 50}),
        "top_logprobs",
    );
    bad(chat, json!({"messages": "hi"}), "messages");
    bad(chat, json!({"messages": []}), "messages");
    bad(chat, json!({"messages": [{"content": "hi"}]}), "messages[0].role");
    bad(
        chat,
        json!({"messages": [{"role": "user", "content": 5}]}),
        "messages[0].content",
    );
    bad(chat, json!({"model": 7, "messages": msgs}), "model");
    bad(cmpl, json!({"prompt": 5}), "prompt");
    bad(cmpl, json!({"prompt": ["a", "b"]}), "prompt");
    bad(cmpl, json!({"prompt": [100000]}), "prompt");
    bad(cmpl, json!({}), "prompt");
    bad(cmpl, json!({"prompt": "a", "echo": true}), "echo");

    // Prompts longer than the context (512 tokens), as text, as ids, and streamed.
    let long = "the licence grants rights ".repeat(200);
    let e = bad(cmpl, json!({"prompt": long, "max_tokens": 1}), "prompt");
    assert_eq!(e["code"], "context_length_exceeded");
    bad(
        cmpl,
        json!({"prompt": vec![5; 600], "max_tokens": 1, "stream": true}),
        "prompt",
    );
    bad(
        chat,
        json!({"messages": [{"role": "user", "content": long}], "stream": true}),
        "messages",
    );
    // A prompt that fits, but not with max_tokens on top.
    let e = bad(
        cmpl,
        json!({"prompt": vec![5; 300], "max_tokens": 300}),
        "max_tokens",
    );
    assert_eq!(e["code"], "context_length_exceeded");

    // Fields gyre cannot honour are refused, not ignored (issue 18, item 7).
    bad(
        chat,
        json!({"messages": msgs, "response_format": {"type": "json_object"}}),
        "response_format",
    );
    bad(
        chat,
        json!({"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
        "response_format",
    );
    bad(
        cmpl,
        json!({"prompt": "a", "logit_bias": {"5": 10}}),
        "logit_bias",
    );
    bad(
        chat,
        json!({"messages": msgs, "tool_choice": "auto"}),
        "tool_choice",
    );
    bad(
        cmpl,
        json!({"prompt": "a", "grammar": "root ::= \"a\""}),
        "grammar",
    );
    let fine = post(
        p,
        chat,
        k,
        &json!({"messages": msgs, "max_tokens": 1, "response_format": {"type": "text"},
                                        "logit_bias": {}, "tool_choice": "none"}),
    );
    assert_eq!(fine.status, 200, "{}", fine.body);
    // Integers past 64 bits say so; a model this server does not serve is a 404.
    let e = bad(
        chat,
        json!({"messages": msgs, "seed": 18446744073709551616u128 as f64}),
        "seed",
    );
    assert!(e["message"].as_str().unwrap().contains("too large"), "{e}");
    let e = post(p, chat, k, &json!({"model": "gpt-4", "messages": msgs})).error(404);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    let named = post(
        p,
        chat,
        k,
        &json!({"model": "tiny_chat", "messages": msgs, "max_tokens": 1}),
    );
    assert_eq!(named.status, 200, "{}", named.body);

    // Body too large, unknown route.
    let huge = json!({"prompt": "x".repeat(70_000)});
    post(p, cmpl, k, &huge).error(413);
    http(p, "GET", "/v1/nothing", k, b"").error(404);

    // After all that, the server still answers, and counts what it answered.
    let ok = post(
        p,
        cmpl,
        k,
        &json!({"prompt": "The licence grants", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["usage"]["completion_tokens"], 4);
    assert_eq!(ok.json()["choices"][0]["finish_reason"], "length");
    assert!(
        metric(
            p,
            k,
            "gyre_http_responses_total{route=\"/v1/chat/completions\",status=\"400\"}"
        ) >= 10.0
    );
}

#[test]
fn full_queue_gets_429_and_a_disconnected_client_frees_its_slot() {
    // One slot, one queue place, and slow steps (20 ms) so requests overlap.
    let srv = Server::start(
        &tiny(),
        &["--max-batch", "1", "--max-queue", "1", "--step-pause-ms", "20"],
    );
    let p = srv.port;
    let long = json!({"prompt": "The licence grants", "max_tokens": 400, "temperature": 0, "stream": true});

    // A occupies the slot (400 tokens ≈ 8 s); B waits in the queue.
    let (a, first) = open_stream(p, None, &long);
    assert!(first.contains("data: {"), "{first}");
    wait_for("A running", || metric(p, None, "gyre_running_sequences") == 1.0);
    let b = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = post(
            p,
            "/v1/completions",
            None,
            &json!({"prompt": "Copyright", "max_tokens": 3}),
        );
        (r.status, r.body, t0.elapsed())
    });
    wait_for("B queued", || metric(p, None, "gyre_queue_depth") == 1.0);

    // C finds no room: 429 with Retry-After.
    let c = post(
        p,
        "/v1/completions",
        None,
        &json!({"prompt": "x", "max_tokens": 1}),
    );
    let e = c.error(429);
    assert_eq!(e["code"], "queue_full");
    assert_eq!(c.header("retry-after").as_deref(), Some("1"));

    // A's client goes away mid-stream: its slot is freed at once and B runs.
    let t_drop = Instant::now();
    drop(a);
    let (status, body, _) = b.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        t_drop.elapsed() < Duration::from_secs(5),
        "B waited {:?} after A disconnected",
        t_drop.elapsed()
    );
    wait_for("A counted as cancelled", || {
        metric(p, None, "gyre_requests_total{outcome=\"cancelled\"}") >= 1.0
    });
    assert!(metric(p, None, "gyre_requests_total{outcome=\"rejected\"}") >= 1.0);
    // The gauge drops when the engine retires B, just after B's last byte was sent.
    wait_for("no running sequences", || {
        metric(p, None, "gyre_running_sequences") == 0.0
    });

    // Many disconnects in a row leave the server healthy.
    for _ in 0..5 {
        let (s, _) = open_stream(p, None, &long);
        drop(s);
    }
    let r = post(
        p,
        "/v1/completions",
        None,
        &json!({"prompt": "The licence grants", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn sigterm_finishes_in_flight_streams_then_exits() {
    let mut srv = Server::start(&tiny(), &["--step-pause-ms", "20"]);
    let p = srv.port;
    let body = json!({"prompt": "The licence grants", "max_tokens": 60, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (mut s, first) = open_stream(p, None, &body);
    let status = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let all = first + &String::from_utf8_lossy(&rest);
    assert!(all.contains("\"finish_reason\":\"length\""), "{all}");
    assert!(all.contains("\"completion_tokens\":60"), "{all}");
    assert!(all.contains("data: [DONE]"), "{all}");
    let t0 = Instant::now();
    let code = loop {
        if let Some(c) = srv.child.try_wait().unwrap() {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "exit status {code:?}");
    assert!(
        TcpStream::connect(("127.0.0.1", p)).is_err(),
        "still accepting after exit"
    );
}

/// Runs tools/test_server_openai.py against a server; fails with install advice without `openai`.
fn run_openai_suite(srv: &Server, extra: &[&str]) -> String {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .expect("python3 is needed for the openai client tests");
    assert!(
        probe.status.success(),
        "the `openai` Python package is missing: run `python3 -m pip install -r tools/requirements-test.txt` \
         ({})",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let out = Command::new("python3")
        .arg(repo_root().join("tools/test_server_openai.py"))
        .args(["--base-url", &srv.url()])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tools/test_server_openai.py failed");
    stdout
}

/// The openai client suite against the tiny chat model served with `args` (and `env`).
fn openai_suite_passes(args: &[&str], env: &[(&str, &str)]) {
    let args: Vec<&str> = ["--api-key", "sk-py"].iter().chain(args).copied().collect();
    let srv = Server::start_env(&tiny(), &args, env);
    let expected = fixtures().join("expected.json");
    let out = run_openai_suite(
        &srv,
        &[
            "--api-key",
            "sk-py",
            "--expected",
            expected.to_str().unwrap(),
            "--history-words",
            "100",
        ],
    );
    assert!(
        out.contains("32 concurrent streaming clients equal their single runs"),
        "{out}"
    );
    assert!(out.contains("all checks passed"), "{out}");
}

#[test]
fn openai_client_works_unchanged_against_llama() {
    openai_suite_passes(&[], &[]);
}

/// The same suite with the model on the CUDA backend, run by the CPU emulator
/// (GYRE_CUDA_EMULATOR=1): batched device decoding behind the server, end to end.
#[test]
fn openai_client_works_unchanged_on_the_cuda_emulator() {
    openai_suite_passes(&["--device", "cuda"], &[("GYRE_CUDA_EMULATOR", "1")]);
}

#[test]
fn recurrent_model_serves_batches_and_resumes_cached_states() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gyre/tests/fixtures/griffin/griffin_small");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer.json"), word_tokenizer(256).to_string()).unwrap();
    let cfg = json!({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": true});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let srv = Server::start(dir.path(), &["--ctx", "2048"]);
    let p = srv.port;

    // Concurrent greedy outputs equal single ones (raw HTTP, distinct prompts).
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("w{} w{} w{} w20 w21", 10 + i, 30 + 2 * i, 50 + 3 * i))
        .collect();
    let run = |q: &str| {
        let r = post(p, "/v1/chat/completions", None, &chat_body(q, 12));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let single: Vec<String> = prompts.iter().map(|q| run(q)).collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|q| {
            std::thread::spawn(move || {
                let r = post(p, "/v1/chat/completions", None, &chat_body(&q, 12));
                r.json()["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&single) {
        assert_eq!(&h.join().unwrap(), want);
    }

    // A second turn resumes from the cached state after the first (recurrent: a whole prefix).
    let history: Vec<String> = (0..200).map(|i| format!("w{}", 6 + (i * 7) % 250)).collect();
    let mut messages = vec![json!({"role": "user", "content": history.join(" ")})];
    let r1 = post(
        p,
        "/v1/chat/completions",
        None,
        &json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r1.status, 200, "{}", r1.body);
    let v1 = r1.json();
    let reply = v1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    messages.push(json!({"role": "assistant", "content": reply}));
    messages.push(json!({"role": "user", "content": "w7 w8 w9"}));
    let hits = metric(p, None, "gyre_prefix_cache_hits_total");
    let r2 = post(
        p,
        "/v1/chat/completions",
        None,
        &json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r2.status, 200, "{}", r2.body);
    let v2 = r2.json();
    let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let p1 = v1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= p1,
        "turn 2 reused {cached} tokens; turn 1's prompt was {p1}"
    );
    assert_eq!(metric(p, None, "gyre_prefix_cache_hits_total"), hits + 1.0);

    // Resuming gives the same greedy answer as a cold start with the cache off.
    let cold = Server::start(dir.path(), &["--ctx", "2048", "--prefix-cache-mib", "0"]);
    let r3 = post(
        cold.port,
        "/v1/chat/completions",
        None,
        &json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r3.json()["choices"][0]["message"], v2["choices"][0]["message"]);
    assert_eq!(r3.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

/// A GGUF file serves with its own tokenizer and template: greedy completions equal `gyre
/// generate`'s, and chat renders through the file's template.
#[test]
fn a_gguf_file_serves_completions_and_chat() {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gyre/tests/fixtures/gguf/mixed_quant/model.gguf");
    let prompt = "And God said, Let there be light: and the fox was café.";
    let cli = Command::new(env!("CARGO_BIN_EXE_gyre"))
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", prompt, "--temperature", "0", "--max-tokens", "12"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let want = String::from_utf8(cli.stdout).unwrap();
    let srv = Server::start(&model, &[]);
    let r = post(
        srv.port,
        "/v1/completions",
        None,
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        format!("{}\n", r.json()["choices"][0]["text"].as_str().unwrap()),
        want
    );
    let r = post(srv.port, "/v1/chat/completions", None, &chat_body("hello", 6));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap() > 3,
        "{}",
        r.body
    );
}

/// A template that loops without end fails its own chat request with a 400, and a prompt far
/// longer than the context is refused before it is tokenized; streams running meanwhile finish
/// and later requests are served (issue 18, items 1 and 3).
#[test]
fn a_hostile_template_or_a_huge_prompt_fails_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path());
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(
        "{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}{% endfor %}{% endfor %}"
    );
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let srv = Server::start(
        dir.path(),
        &["--max-body-bytes", "16000000", "--step-pause-ms", "20"],
    );
    let p = srv.port;
    let stream = std::thread::spawn(move || {
        post(
            p,
            "/v1/completions",
            None,
            &json!({"prompt": "Copyright holders may", "max_tokens": 24, "temperature": 0}),
        )
    });
    let t0 = Instant::now();
    let r = post(p, "/v1/chat/completions", None, &chat_body("hello", 8));
    let e = r.error(400);
    assert!(e["message"].as_str().unwrap().contains("budget"), "{}", r.body);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the template ran for {:?}",
        t0.elapsed()
    );
    let huge = "All work and no play makes Jack a dull boy. ".repeat(160_000); // 7 MB
    let r = post(
        p,
        "/v1/completions",
        None,
        &json!({"prompt": huge, "max_tokens": 4}),
    );
    let e = r.error(400);
    assert_eq!(e["code"], "context_length_exceeded", "{}", r.body);
    assert!(
        e["message"].as_str().unwrap().contains("context is"),
        "{}",
        r.body
    );
    let done = stream.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.json()["usage"]["completion_tokens"], 24);
    let r = post(
        p,
        "/v1/completions",
        None,
        &json!({"prompt": "Copyright holders may", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Sends `raw` on a new connection; returns what the server sent until it closed (or `wait`
/// ran out), and how long that took.
fn raw_exchange(port: u16, raw: &[u8], half_close: bool, wait: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let t0 = Instant::now();
    s.write_all(raw).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (String::from_utf8_lossy(&got).to_string(), t0.elapsed())
}

/// A client cannot hold a connection by sending half its headers, half its body or nothing
/// at all; a declared body over the limit is refused unread; a client that half-closes after
/// its request still gets the answer; SIGTERM ends within the shutdown deadline whatever the
/// clients do (issue 18, items 2 and 11).
#[test]
fn slow_idle_and_half_closed_clients_are_handled() {
    let mut srv = Server::start(
        &tiny(),
        &[
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--shutdown-timeout",
            "2",
            "--max-body-bytes",
            "65536",
            "--step-pause-ms",
            "100",
        ],
    );
    let p = srv.port;
    let host = format!("Host: 127.0.0.1:{p}\r\n");
    let limit = Duration::from_secs(8);
    // Half the headers: the connection is closed after the header timeout.
    let (_, took) = raw_exchange(
        p,
        format!("POST /v1/completions HTTP/1.1\r\n{host}Content-Ty").as_bytes(),
        false,
        limit,
    );
    assert!(
        took < Duration::from_secs(5),
        "half headers held the connection for {took:?}"
    );
    // Half the body: a 408 after the body timeout.
    let (resp, took) = raw_exchange(
        p,
        format!("POST /v1/completions HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":").as_bytes(),
        false,
        limit,
    );
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(
        took < Duration::from_secs(5),
        "half a body held the connection for {took:?}"
    );
    // A declared length over the limit: 413 before any body is sent.
    let (resp, took) = raw_exchange(
        p,
        format!("POST /v1/completions HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n").as_bytes(),
        false,
        limit,
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // An idle keep-alive connection is closed after the header timeout.
    let (resp, took) = raw_exchange(
        p,
        format!("GET /health HTTP/1.1\r\n{host}\r\n").as_bytes(),
        false,
        limit,
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        took < Duration::from_secs(5),
        "an idle keep-alive connection stayed open for {took:?}"
    );
    // Half-closed after the request: the whole answer still comes.
    let body = json!({"prompt": "The licence grants", "max_tokens": 3, "temperature": 0}).to_string();
    let (resp, _) = raw_exchange(
        p,
        format!("POST /v1/completions HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        true,
        Duration::from_secs(60),
    );
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("\"completion_tokens\":3"),
        "{resp}"
    );

    // SIGTERM with a long stream and an idle connection open: the server is gone within the
    // shutdown deadline.
    let long = json!({"prompt": "The licence grants", "max_tokens": 400, "temperature": 0, "stream": true});
    let (_stream, _) = open_stream(p, None, &long);
    let _idle = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let t0 = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    loop {
        if srv.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bound to loopback, the server answers to loopback names only (DNS rebinding) and refuses
/// browser requests from other origins (CSRF) unless they are allowed; allowed origins get CORS
/// headers and preflight answers (issue 18, item 5).
#[test]
fn host_and_origin_checks_guard_a_loopback_server() {
    let srv = Server::start(&tiny(), &[]);
    let p = srv.port;
    let body = json!({"prompt": "The licence grants", "max_tokens": 2}).to_string();
    let req = |method: &str, extra: &str, body: &str| {
        format!(
            "{method} /v1/completions HTTP/1.1\r\nConnection: close\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let wait = Duration::from_secs(60);
    let (resp, _) = raw_exchange(
        p,
        req("POST", "Host: attacker.example\r\n", &body).as_bytes(),
        false,
        wait,
    );
    assert!(
        resp.starts_with("HTTP/1.1 403") && resp.contains("--allowed-host"),
        "{resp}"
    );
    let (resp, _) = raw_exchange(
        p,
        req("POST", &format!("Host: localhost:{p}\r\n"), &body).as_bytes(),
        false,
        wait,
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let evil = format!("Host: 127.0.0.1:{p}\r\nOrigin: http://evil.example\r\n");
    let (resp, _) = raw_exchange(p, req("POST", &evil, &body).as_bytes(), false, wait);
    assert!(
        resp.starts_with("HTTP/1.1 403") && resp.contains("--cors-origin"),
        "{resp}"
    );
    let (resp, _) = raw_exchange(p, req("OPTIONS", &evil, "").as_bytes(), false, wait);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    let srv = Server::start(
        &tiny(),
        &[
            "--cors-origin",
            "http://app.example",
            "--allowed-host",
            "gyre.internal",
        ],
    );
    let p = srv.port;
    let app = format!("Host: gyre.internal:{p}\r\nOrigin: http://app.example\r\n");
    let (resp, _) = raw_exchange(p, req("OPTIONS", &app, "").as_bytes(), false, wait);
    assert!(resp.starts_with("HTTP/1.1 204"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        lower.contains("access-control-allow-origin: http://app.example"),
        "{resp}"
    );
    assert!(
        lower.contains("access-control-allow-headers: authorization, content-type"),
        "{resp}"
    );
    let (resp, _) = raw_exchange(p, req("POST", &app, &body).as_bytes(), false, wait);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("access-control-allow-origin: http://app.example"),
        "{resp}"
    );
    let (resp, _) = raw_exchange(
        p,
        req("POST", &evil.replace("127.0.0.1", "gyre.internal"), &body).as_bytes(),
        false,
        wait,
    );
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
}

/// `--ctx` beyond the model's context is capped with a warning, not silently (issue 18, item 12).
#[test]
fn a_context_beyond_the_models_is_capped_with_a_warning() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gyre"))
        .args(["serve", "--port", "0", "--ctx", "100000", "--model"])
        .arg(tiny())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("listening on");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter()
            .any(|l| l.contains("--ctx 100000") && l.contains("512")),
        "{seen:?}"
    );
}
