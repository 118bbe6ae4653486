//! Quantized weights (`--quant q8|q4`): every family runs quantized, prefill equals
//! step-by-step, and the logit error against the reference stays within a documented bound
//! on the fixtures.

mod common;

use std::path::Path;

use common::*;
use gyre::loader::Checkpoint;
use gyre::models::{self, LoadOptions};
use gyre::tensor::{Matrix, Quant, Tensor};

/// The max |Δlogit| of the quantized model against the reference logits, relative to the
/// largest reference logit.
fn quant_error(quant: Quant, model_path: &Path, expected: &Path, tokens: &str, logits: &str) -> f32 {
    let ckpt = Checkpoint::open(model_path, |_, _| {}).unwrap();
    let model = models::load_with(
        &ckpt,
        LoadOptions {
            quant: Some(quant),
            ..Default::default()
        },
    )
    .unwrap();
    let exp = Expected::read(expected);
    let (tokens, want) = (exp.ids(tokens), exp.f(logits));
    let prefill = prefill_all(model.as_ref(), tokens);
    let step = step_by_step(model.as_ref(), tokens);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    // Quantized products multiply the activation rounded per group of 32 (tensor::quant), and
    // a value 1e-7 from a rounding boundary can round differently in the two paths: one int16
    // step for Q8, bounded at 2e-4 of the largest logit (measured ≤ 7.5e-5); one int8 step
    // for Q4, bounded at 5% (measured ≤ 1.5%).
    let gap = max_abs_diff(&prefill, &step);
    let bound = match quant {
        Quant::Q8 => 2e-4 * scale,
        Quant::Q4 => 0.05 * scale,
    };
    assert!(
        gap <= bound,
        "{quant:?} prefill vs step: {gap} ({})",
        model_path.display()
    );
    let d = max_abs_diff(&prefill, want);
    eprintln!(
        "{}: {quant:?} max |Δlogit| {d} (logits up to {scale})",
        model_path.display()
    );
    d / scale
}

/// Relative errors of one format on the three families' fixtures.
fn errors(quant: Quant) -> [f32; 3] {
    let llama = fixture("llama", "llama_gqa_f32");
    let griffin = fixture("griffin", "griffin_small");
    let rwkv = fixture("rwkv5", "rwkv5_tiny_f32");
    [
        quant_error(
            quant,
            &llama,
            &llama.join("expected.safetensors"),
            "tokens",
            "logits",
        ),
        quant_error(
            quant,
            &griffin,
            &griffin.join("expected.safetensors"),
            "tokens_long",
            "logits_long",
        ),
        quant_error(
            quant,
            &rwkv.join("model.pth"),
            &rwkv.join("expected.safetensors"),
            "tokens",
            "logits",
        ),
    ]
}

/// Q8 bound: max |Δlogit| under 5% of the largest logit on these random-weight fixtures
/// (int8 with a scale per 32 weights: weight error ≤ 1/254 of the group's range).
#[test]
fn q8_error_is_bounded_for_every_family() {
    for rel in errors(Quant::Q8) {
        assert!(rel > 0.0 && rel < 0.05, "relative q8 error {rel}");
    }
}

/// Q4 bound: under 75% of the largest logit. Values −7..7 make a step 1/14 of a group's
/// range; on these tiny random-weight fixtures (uniform weights, hidden sizes 96–128) that
/// moves the logits far more than on trained models, so this only guards against a broken
/// format (a wrong nibble order or scale gives errors of several times the logit range).
#[test]
fn q4_error_is_bounded_for_every_family_and_larger_than_q8() {
    let (q4, q8) = (errors(Quant::Q4), errors(Quant::Q8));
    for (a, b) in q4.iter().zip(&q8) {
        assert!(*a < 0.75, "relative q4 error {a}");
        assert!(a > b, "q4 ({a}) should lose more than q8 ({b})");
    }
}

#[test]
fn quantized_matrices_take_the_documented_bytes() {
    let t = Tensor::from_f32_as_bf16(&vec![0.5; 64 * 128], vec![64, 128]);
    let q8 = Matrix::new(t.clone(), Some(Quant::Q8));
    assert_eq!(q8.nbytes() * 32, t.nbytes() * 17); // 1.0625 bytes per weight against 2
    let q4 = Matrix::new(t.clone(), Some(Quant::Q4));
    assert_eq!(q4.nbytes() * 32, t.nbytes() * 9); // 0.5625 bytes per weight
}
