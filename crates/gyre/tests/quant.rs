//! Q8 weights (`--quant q8`): every family runs quantized, prefill equals step-by-step, and
//! the logit error against the reference stays within a documented bound on the fixtures.

mod common;

use common::*;
use gyre::loader::Checkpoint;
use gyre::models::{self, LoadOptions, Model};
use gyre::tensor::Quant;

fn load_q8(path: &std::path::Path) -> Box<dyn Model> {
    let ckpt = Checkpoint::open(path, |_, _| {}).unwrap();
    models::load_with(
        &ckpt,
        LoadOptions {
            quant: Some(Quant::Q8),
        },
    )
    .unwrap()
}

/// Returns the max |Δlogit| of the quantized model against the reference logits.
fn q8_error(model_path: &std::path::Path, expected: &std::path::Path, tokens: &str, logits: &str) -> f32 {
    let model = load_q8(model_path);
    let exp = Expected::read(expected);
    let (tokens, want) = (exp.ids(tokens), exp.f(logits));
    let prefill = prefill_all(model.as_ref(), tokens);
    let step = step_by_step(model.as_ref(), tokens);
    assert!(max_abs_diff(&prefill, &step) <= 1e-4, "q8 prefill vs step");
    let d = max_abs_diff(&prefill, want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!(
        "{}: q8 max |Δlogit| {d} (logits up to {scale})",
        model_path.display()
    );
    d / scale
}

/// Bound: the max |Δlogit| stays under 5% of the largest logit on these random-weight
/// fixtures (int8 with a scale per 32 weights: relative weight error ≤ 1/254 per group).
#[test]
fn q8_error_is_bounded_for_every_family() {
    let llama = fixture("llama", "llama_gqa_f32");
    let griffin = fixture("griffin", "griffin_small");
    let rwkv = fixture("rwkv5", "rwkv5_tiny_f32");
    for rel in [
        q8_error(&llama, &llama.join("expected.safetensors"), "tokens", "logits"),
        q8_error(
            &griffin,
            &griffin.join("expected.safetensors"),
            "tokens_long",
            "logits_long",
        ),
        q8_error(
            &rwkv.join("model.pth"),
            &rwkv.join("expected.safetensors"),
            "tokens",
            "logits",
        ),
    ] {
        assert!(rel > 0.0 && rel < 0.05, "relative q8 error {rel}");
    }
}

#[test]
fn q8_halves_the_bytes_of_a_matrix() {
    let t = gyre::tensor::Tensor::from_f32_as_bf16(&vec![0.5; 64 * 128], vec![64, 128]);
    let q = gyre::tensor::Matrix::new(t.clone(), Some(Quant::Q8));
    assert_eq!(q.nbytes(), 64 * 128 + 64 * 4 * 4);
    assert_eq!(q.nbytes() * 16, t.nbytes() * 9); // 1.125 bytes per weight against 2
}
