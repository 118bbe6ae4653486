//! Llama / Mistral parity against HF transformers.
//!
//! Fixtures: `tests/fixtures/llama/<case>/`, made by `tools/make_llama_fixtures.py` with
//! transformers (eager attention, one full-sequence forward). `expected.safetensors` holds
//! the token ids and the reference logits for every position.

use std::path::PathBuf;

use gyre::loader::Checkpoint;
use gyre::models::{self, Logits, Model, SeqInput};

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(case)
}

struct Expected {
    tokens: Vec<u32>,
    /// [T, V] logits of the f32-compute reference.
    logits: Vec<f32>,
    /// The model run natively in its stored dtype (bf16/f16 cases only).
    native: Option<Vec<f32>>,
}

fn expected(case: &str) -> Expected {
    let bytes = std::fs::read(fixture(case).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Option<Vec<f32>> {
        let t = st.tensor(name).ok()?;
        Some(t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    };
    let tokens = st.tensor("tokens").unwrap();
    let tokens = tokens.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    Expected { tokens, logits: f32s("logits").unwrap(), native: f32s("logits_native") }
}

fn load(case: &str) -> Box<dyn Model> {
    let ckpt = Checkpoint::open(&fixture(case), |_, _| {}).unwrap();
    models::load(&ckpt).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prefill_all(model: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = model.new_state();
    let mut out = model.forward(&mut [SeqInput { tokens, state: &mut state }], Logits::All).unwrap();
    out.pop().unwrap()
}

fn step_by_step(model: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = model.new_state();
    let mut rows = Vec::new();
    for t in tokens {
        let out = model
            .forward(&mut [SeqInput { tokens: std::slice::from_ref(t), state: &mut state }], Logits::Last)
            .unwrap();
        rows.extend_from_slice(&out[0]);
    }
    rows
}

/// Prefill and step-by-step both match the reference within `tol`, and each other.
fn check(case: &str, tol: f32) -> (Box<dyn Model>, Expected) {
    let model = load(case);
    let exp = expected(case);
    let prefill = prefill_all(model.as_ref(), &exp.tokens);
    let d = max_abs_diff(&prefill, &exp.logits);
    assert!(d <= tol, "{case}: prefill max |Δlogit| = {d} > {tol}");
    let step = step_by_step(model.as_ref(), &exp.tokens);
    let d = max_abs_diff(&step, &exp.logits);
    assert!(d <= tol, "{case}: step-by-step max |Δlogit| = {d} > {tol}");
    let d = max_abs_diff(&step, &prefill);
    assert!(d <= 1e-5, "{case}: prefill and step-by-step differ by {d}");
    (model, exp)
}

#[test]
fn llama_gqa_f32_matches_transformers() {
    check("llama_gqa_f32", 1e-4);
}

#[test]
fn llama_old_config_spelling_matches_transformers() {
    check("llama_mha_oldconfig_f32", 1e-4);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral_window_f32", 1e-4);
}

/// bf16 storage, tied embeddings, four shards. gyre computes in f32 over the stored bf16
/// weights, so it matches the f32-compute reference to 1e-4; against transformers running
/// natively in bf16 (rounding every activation) the documented bound is 0.4.
#[test]
fn llama_tied_bf16_sharded_matches_transformers() {
    let (model, exp) = check("llama_tied_bf16", 1e-4);
    let native = exp.native.as_ref().unwrap();
    let d = max_abs_diff(&prefill_all(model.as_ref(), &exp.tokens), native);
    assert!(d <= 0.4, "bf16 native bound: {d}");
}

/// f16 storage: 1e-4 against the f32-compute reference, 0.05 against native f16.
#[test]
fn llama_f16_matches_transformers() {
    let (model, exp) = check("llama_f16", 1e-4);
    let native = exp.native.as_ref().unwrap();
    let d = max_abs_diff(&prefill_all(model.as_ref(), &exp.tokens), native);
    assert!(d <= 0.05, "f16 native bound: {d}");
}

/// Several sequences of different lengths and positions in one batched forward give the same
/// logits as each run alone.
#[test]
fn batched_forward_equals_single_sequences() {
    let model = load("mistral_window_f32");
    let exp = expected("mistral_window_f32");
    let v = model.info().vocab_size;
    let (a, b) = (&exp.tokens[..20], &exp.tokens[5..17]);
    let mut sa = model.new_state();
    let mut sb = model.new_state();
    // Warm b's state with a prefix so the batch mixes a prefill with a continuation.
    model.forward(&mut [SeqInput { tokens: &b[..4], state: &mut sb }], Logits::Last).unwrap();
    let out = model
        .forward(
            &mut [SeqInput { tokens: a, state: &mut sa }, SeqInput { tokens: &b[4..], state: &mut sb }],
            Logits::All,
        )
        .unwrap();
    let alone_a = prefill_all(model.as_ref(), a);
    let alone_b = prefill_all(model.as_ref(), b);
    assert!(max_abs_diff(&out[0], &alone_a) <= 1e-5);
    assert!(max_abs_diff(&out[1], &alone_b[4 * v..]) <= 1e-5);
}

#[test]
fn out_of_range_token_is_an_error_and_leaves_state_untouched() {
    let model = load("llama_gqa_f32");
    let mut state = model.new_state();
    let v = model.info().vocab_size as u32;
    let err = model
        .forward(&mut [SeqInput { tokens: &[1, v], state: &mut state }], Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains(&format!("token id {v} is out of range")), "{err}");
    assert_eq!(state.tokens_seen(), 0);
}

#[test]
fn sliding_window_state_stays_bounded() {
    let model = load("mistral_window_f32");
    assert_eq!(model.state_bytes(1000), model.state_bytes(32_000));
    assert!(model.state_bytes(4) < model.state_bytes(1000));
    let llama = load("llama_gqa_f32");
    assert!(llama.state_bytes(2000) > llama.state_bytes(1000));
}
