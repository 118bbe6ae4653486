//! State files: a state saved mid-sequence and loaded into a fresh state continues exactly,
//! for every family (reference logits from each family's fixture).

mod common;

use common::*;
use gyre::loader::state_file;

fn round_trip(
    model_path: &std::path::Path,
    expected: &std::path::Path,
    tokens: &str,
    logits: &str,
    split: usize,
) {
    let model = load(model_path);
    let exp = Expected::read(expected);
    let (tokens, want) = (exp.ids(tokens), exp.f(logits));
    let v = model.info().vocab_size;
    let mut state = model.new_state();
    prefill_from(model.as_ref(), &mut state, &tokens[..split]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    let arch = model.info().arch.name();
    state_file::save(&file, &state, arch).unwrap();
    let mut loaded = state_file::load(&file, model.new_state(), arch).unwrap();
    assert_eq!(loaded.tokens_seen(), split);
    let rest = step_from(model.as_ref(), &mut loaded, &tokens[split..]);
    let d = max_abs_diff(&rest, &want[split * v..]);
    assert!(
        d <= 1e-4,
        "{}: resumed logits differ by {d}",
        model_path.display()
    );
    let err = state_file::load(&file, model.new_state(), "SomethingElse").unwrap_err();
    assert!(err.to_string().contains(arch), "{err}");
}

#[test]
fn llama_state_with_a_sliding_window_ring_round_trips() {
    let dir = fixture("llama", "mistral_window_f32");
    round_trip(&dir, &dir.join("expected.safetensors"), "tokens", "logits", 19);
}

#[test]
fn recurrent_gemma_state_round_trips_past_the_window() {
    let dir = fixture("griffin", "griffin_small");
    round_trip(
        &dir,
        &dir.join("expected.safetensors"),
        "tokens_long",
        "logits_long",
        13,
    );
}

#[test]
fn rwkv_state_round_trips() {
    let dir = fixture("rwkv5", "rwkv5_tiny_f32");
    round_trip(
        &dir.join("model.pth"),
        &dir.join("expected.safetensors"),
        "tokens",
        "logits",
        9,
    );
}

#[test]
fn a_state_file_of_another_shape_is_refused() {
    let a = load(&fixture("llama", "llama_gqa_f32"));
    let b = load(&fixture("llama", "llama_mha_oldconfig_f32"));
    let mut state = a.new_state();
    prefill_from(a.as_ref(), &mut state, &[1, 2, 3]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    state_file::save(&file, &state, "LlamaForCausalLM").unwrap();
    let err = state_file::load(&file, b.new_state(), "LlamaForCausalLM")
        .unwrap_err()
        .to_string();
    assert!(err.contains("kv.0.k") || err.contains("tensors"), "{err}");
}
