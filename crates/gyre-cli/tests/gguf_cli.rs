//! GGUF files through the `gyre` binary: every model command on the llama.cpp-made fixture
//! (`crates/gyre/tests/fixtures/gguf/mixed_quant`, every block format in one model), and
//! damaged files as clear errors.

mod common;

use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn case() -> PathBuf {
    gyre_fixture("gguf", "mixed_quant")
}

fn file() -> PathBuf {
    case().join("model.gguf")
}

/// The fixture's tokens, greedy continuation, f64 logits and llama.cpp's logits.
fn expected() -> (Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(case().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |n: &str| -> Vec<u32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let floats = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    (
        ints("tokens"),
        ints("greedy"),
        floats("logits"),
        floats("llamacpp_logits"),
    )
}

fn text() -> String {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(case().join("meta.json")).unwrap()).unwrap();
    meta["text"].as_str().unwrap().to_string()
}

fn mean_abs(rows: &str, want: &[f32]) -> f64 {
    let got: Vec<f32> = logits_rows(rows).concat();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / want.len() as f64
}

#[test]
fn a_gguf_file_runs_through_every_model_command() {
    let (tokens, greedy, want, llamacpp) = expected();
    let (m, text) = (file(), text());

    let info = ok(&gyre(&["info", "--model", s(&m)], b""));
    for needle in [
        "LlamaForCausalLM",
        "tensors:",
        "Q4_K ×",
        "Q6_K ×",
        "Q2_K ×",
        "F32 ×",
    ] {
        assert!(info.contains(needle), "info lacks {needle:?}: {info}");
    }

    // The file's own tokenizer.
    let ids: Value =
        serde_json::from_str(&ok(&gyre(&["tokenize", "--model", s(&m)], text.as_bytes()))).unwrap();
    let ids: Vec<u32> = ids["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, tokens);
    let back = ok(&gyre(
        &["detokenize", "--model", s(&m), "--ids", &ids_arg(&tokens)],
        b"",
    ));
    assert_eq!(back.trim_end_matches('\n'), text);

    // Logits, prefill and step by step: ten times closer to float64 than llama.cpp's.
    let theirs = want
        .iter()
        .zip(&llamacpp)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / want.len() as f64;
    for step in [false, true] {
        let mut args = vec!["logits", "--model", s(&m)];
        let t = ids_arg(&tokens);
        args.extend(["--tokens", &t]);
        if step {
            args.push("--step");
        }
        let ours = mean_abs(&ok(&gyre(&args, b"")), &want);
        assert!(
            ours * 10.0 <= theirs,
            "step {step}: gyre {ours:.2e} vs llama.cpp {theirs:.2e}"
        );
    }

    // Greedy generation (BOS + the text) prints the float64 model's continuation.
    let out = ok(&gyre(
        &[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            &text,
            "--temperature",
            "0",
            "--max-tokens",
            &greedy.len().to_string(),
        ],
        b"",
    ));
    let want_text = ok(&gyre(
        &["detokenize", "--model", s(&m), "--ids", &ids_arg(&greedy)],
        b"",
    ));
    assert_eq!(out, want_text);

    // A directory holding one .gguf is a model too, and chat uses the file's template.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&m, dir.path().join("Some-Model.Q4_K_M.gguf")).unwrap();
    let chat = gyre(
        &[
            "chat",
            "--model",
            s(dir.path()),
            "--temperature",
            "0",
            "--max-tokens",
            "6",
        ],
        b"hello there\n",
    );
    ok(&chat);
    let err = String::from_utf8_lossy(&chat.stderr);
    assert!(!err.contains("no chat template"), "{err}");

    // A saved state resumes where the prompt ended.
    let st = dir.path().join("prompt.state");
    ok(&gyre(
        &[
            "state",
            "save",
            "--model",
            s(&m),
            "--prompt",
            &text,
            "--out",
            s(&st),
        ],
        b"",
    ));
    let rest = ids_arg(&greedy[..3]);
    let resumed = ok(&gyre(
        &["logits", "--model", s(&m), "--state", s(&st), "--tokens", &rest],
        b"",
    ));
    let all: Vec<u32> = std::iter::once(1)
        .chain(tokens.iter().copied())
        .chain(greedy[..3].iter().copied())
        .collect();
    let full = ok(&gyre(
        &["logits", "--model", s(&m), "--tokens", &ids_arg(&all)],
        b"",
    ));
    let rows = |out: &str| -> Vec<Vec<f64>> {
        let v: Value = serde_json::from_str(out).unwrap();
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (resumed, full) = (rows(&resumed), rows(&full));
    for (a, b) in resumed.iter().zip(&full[full.len() - 3..]) {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(d <= 1e-3, "resumed logits differ by {d}");
    }

    // eval and bench take the file as well.
    let corpus = dir.path().join("text.txt");
    std::fs::write(&corpus, text.repeat(4)).unwrap();
    let eval = ok(&gyre(
        &["eval", "--model", s(&m), "--text", s(&corpus), "--window", "16"],
        b"",
    ));
    assert!(eval.contains("perplexity"), "{eval}");
    let bench = ok(&gyre(
        &["bench", "--model", s(&m), "--prompt", "8", "--gen", "2", "--json"],
        b"",
    ));
    let bench: Value = serde_json::from_str(bench.lines().last().unwrap()).unwrap();
    assert!(bench["decode_tok_s"].as_f64().unwrap_or(0.0) > 0.0, "{bench}");
    let bytes = bench["weight_bytes_per_token"].as_u64().unwrap();
    assert!(bytes > 800_000, "a decode step reads every matrix once: {bench}");
}

/// Copies the fixture with `edit` applied to its bytes.
fn damaged(edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(file()).unwrap();
    edit(&mut bytes);
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

/// Where the bytes of `needle` start in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

/// The position right after tensor `name`'s entry name in the tensor table (then: n_dims u32,
/// ne u64 × n_dims, type u32, offset u64).
fn tensor_entry(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend(name.as_bytes());
    find(bytes, &pat) + pat.len()
}

fn info_error(p: &Path) -> String {
    fails(&["info", "--model", s(p)], b"")
}

#[test]
fn damaged_gguf_files_are_clear_errors() {
    // Truncated: the tensor that no longer fits is named.
    let (_d, p) = damaged(|b| b.truncate(b.len() * 2 / 3));
    let e = info_error(&p);
    assert!(
        e.contains("broken.gguf") && e.contains("truncated") && e.contains("tensor '"),
        "{e}"
    );
    // Not GGUF at all.
    let (_d, p) = damaged(|b| b[..4].copy_from_slice(b"GGML"));
    assert!(info_error(&p).contains("not a GGUF file"));
    // An architecture gyre does not run.
    let (_d, p) = damaged(|b| {
        let at = find(b, b"general.architecture") + "general.architecture".len() + 4 + 8;
        b[at..at + 5].copy_from_slice(b"qwen2");
    });
    let e = info_error(&p);
    assert!(e.contains("'qwen2'") && e.contains("not supported"), "{e}");
    // A tensor type gyre does not run (IQ4_XS).
    let (_d, p) = damaged(|b| {
        let at = tensor_entry(b, "blk.0.attn_q.weight") + 4 + 16;
        b[at..at + 4].copy_from_slice(&23u32.to_le_bytes());
    });
    let e = info_error(&p);
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("IQ4_XS"), "{e}");
    // A misaligned offset.
    let (_d, p) = damaged(|b| {
        let at = tensor_entry(b, "blk.0.attn_q.weight") + 4 + 16 + 4;
        let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        b[at..at + 8].copy_from_slice(&(off + 2).to_le_bytes());
    });
    let e = info_error(&p);
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("alignment"),
        "{e}"
    );
    // Metadata that disagrees with a tensor's shape names the tensor and the metadata.
    let (_d, p) = damaged(|b| {
        let at = find(b, b"llama.feed_forward_length") + "llama.feed_forward_length".len() + 4;
        b[at..at + 4].copy_from_slice(&768u32.to_le_bytes());
    });
    let e = info_error(&p);
    assert!(e.contains("ffn_") && e.contains("metadata"), "{e}");
    // A string longer than the file.
    let (_d, p) = damaged(|b| {
        let at = find(b, b"general.architecture") - 8;
        b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    });
    let e = info_error(&p);
    assert!(e.contains("broken.gguf") && e.contains("metadata key"), "{e}");
}
