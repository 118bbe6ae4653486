//! Helpers shared by the tests that drive the `gyre` binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny() -> PathBuf {
    fixtures().join("tiny_chat")
}

pub fn gyre(args: &[&str], stdin: &[u8]) -> Output {
    gyre_env(args, stdin, &[])
}

/// `gyre` with extra environment variables.
pub fn gyre_env(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gyre"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "gyre failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Runs gyre expecting failure; returns stderr after checking it is a clean error.
pub fn fails(args: &[&str], stdin: &[u8]) -> String {
    let out = gyre(args, stdin);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, got success"
    );
    assert!(
        err.lines().any(|l| l.starts_with("error: ")),
        "stderr should hold an error message: {err}"
    );
    assert!(!err.contains("panicked"), "gyre panicked: {err}");
    err
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn gyre_fixture(family: &str, case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../gyre/tests/fixtures")
        .join(family)
        .join(case)
}

/// A word-level tokenizer.json of `n` entries with Gemma's special tokens at their ids.
pub fn word_tokenizer(n: usize) -> Value {
    let specials = ["<pad>", "<eos>", "<bos>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    vocab.insert("<start_of_turn>".into(), 4.into());
    vocab.insert("<end_of_turn>".into(), 5.into());
    for i in 6..n {
        vocab.insert(format!("w{i}"), i.into());
    }
    let added: Vec<Value> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| {
        serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
    })
    .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The rows of `gyre logits` JSON output.
pub fn logits_rows(out: &str) -> Vec<Vec<f32>> {
    let v: Value = serde_json::from_str(out).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Token ids as a `--tokens` / `--ids` argument.
pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}
