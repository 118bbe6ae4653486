//! The bundled demo models (`models/`, trained by `tools/train_demos.py`): gyre's perplexity
//! on the held-out text equals the PyTorch training code's (`models/reference_ppl.json`)
//! within 0.1%, and `generate` without `--model` runs the RecurrentGemma demo.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

#[test]
fn demo_perplexities_equal_the_training_code() {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("reference_ppl.json")).unwrap()).unwrap();
    let window = refs["window_tokens"].as_u64().unwrap().to_string();
    let text = models().join("heldout.txt");
    for name in ["demo-llama", "demo-recurrentgemma", "demo-rwkv5"] {
        let want = &refs["models"][name];
        let out = ok(&gyre(
            &[
                "eval",
                "--model",
                s(&models().join(name)),
                "--text",
                s(&text),
                "--window",
                &window,
                "--json",
            ],
            b"",
        ));
        let got: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(got["scored"], want["predicted_tokens"], "{name}: scored tokens");
        let (g, w) = (got["perplexity"].as_f64().unwrap(), want["ppl"].as_f64().unwrap());
        assert!(
            ((g - w) / w).abs() < 1e-3,
            "{name}: gyre perplexity {g} vs PyTorch {w}"
        );
    }
}

#[test]
fn generate_without_a_model_uses_the_recurrentgemma_demo() {
    let out = gyre(
        &[
            "generate",
            "--prompt",
            "And God said",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ],
        b"",
    );
    let text = ok(&out);
    assert!(text.trim().len() > 10, "{text:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bundled RecurrentGemma demo"), "{err}");
}
