//! State files: a state saved mid-sequence and loaded into a fresh state continues exactly,
//! for every family (reference logits from each family's fixture).

mod common;

use common::*;
use gyre::loader::{state_file, Checkpoint};
use gyre::models;

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
    state_file::save(&file, &state, arch, &model.info().fingerprint).unwrap();
    let mut loaded = state_file::load(&file, model.new_state(), arch, &model.info().fingerprint).unwrap();
    assert_eq!(loaded.tokens_seen(), split);
    let rest = step_from(model.as_ref(), &mut loaded, &tokens[split..]);
    let d = max_abs_diff(&rest, &want[split * v..]);
    assert!(
        d <= 1e-4,
        "{}: resumed logits differ by {d}",
        model_path.display()
    );
    let err = state_file::load(
        &file,
        model.new_state(),
        "SomethingElse",
        &model.info().fingerprint,
    )
    .unwrap_err();
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
fn a_state_file_of_another_model_is_refused() {
    let a = load(&fixture("llama", "llama_gqa_f32"));
    let b = load(&fixture("llama", "llama_mha_oldconfig_f32"));
    let mut state = a.new_state();
    prefill_from(a.as_ref(), &mut state, &[1, 2, 3]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    state_file::save(&file, &state, "LlamaForCausalLM", &a.info().fingerprint).unwrap();
    // Another shape: refused by its fingerprint, and by its tensors when the file has none.
    let err = format!(
        "{:#}",
        state_file::load(&file, b.new_state(), "LlamaForCausalLM", &b.info().fingerprint).unwrap_err()
    );
    assert!(err.contains("fingerprint"), "{err}");
    rewrite(&file, |meta, _| {
        meta.remove("weights");
    });
    let err = format!(
        "{:#}",
        state_file::load(&file, b.new_state(), "LlamaForCausalLM", &b.info().fingerprint).unwrap_err()
    );
    assert!(err.contains("kv.0.k") || err.contains("tensors"), "{err}");

    // The same shapes with other weights: refused by the fingerprint alone.
    let ckpt = Checkpoint::open(&fixture("llama", "llama_gqa_f32"), |_, _| {}).unwrap();
    let tensors = ckpt
        .names()
        .map(|n| {
            let t = ckpt.get(n).unwrap();
            let v: Vec<f32> = t.to_f32_vec().iter().map(|x| x * 1.001).collect();
            (
                n.to_string(),
                gyre::tensor::Tensor::from_f32(&v, t.shape().to_vec()),
            )
        })
        .collect();
    let other = models::load(&Checkpoint::from_tensors(ckpt.config().unwrap().clone(), tensors)).unwrap();
    assert_ne!(other.info().fingerprint, a.info().fingerprint);
    state_file::save(&file, &state, "LlamaForCausalLM", &a.info().fingerprint).unwrap();
    let err = format!(
        "{:#}",
        state_file::load(
            &file,
            other.new_state(),
            "LlamaForCausalLM",
            &other.info().fingerprint
        )
        .unwrap_err()
    );
    assert!(err.contains("another model"), "{err}");
}

/// A state file's metadata is checked against its tensors before anything is sized by it,
/// and NaN or infinite values are refused (issue 18, items 4 and 8).
#[test]
fn damaged_state_files_are_refused() {
    let m = load(&fixture("llama", "llama_gqa_f32"));
    let fp = m.info().fingerprint.clone();
    let mut state = m.new_state();
    prefill_from(m.as_ref(), &mut state, &[1, 2, 3]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    state_file::save(&file, &state, "LlamaForCausalLM", &fp).unwrap();
    assert!(state_file::load(&file, m.new_state(), "LlamaForCausalLM", &fp).is_ok());
    rewrite(&file, |meta, _| {
        meta.insert("tokens".into(), "2000000000".into());
    });
    let err = format!(
        "{:#}",
        state_file::load(&file, m.new_state(), "LlamaForCausalLM", &fp).unwrap_err()
    );
    assert!(err.contains("2000000000") && err.contains("kv."), "{err}");
    state_file::save(&file, &state, "LlamaForCausalLM", &fp).unwrap();
    rewrite(&file, |_, tensors| {
        if let Some(v) = tensors.get_mut("kv.1.v") {
            v[5] = f32::NAN;
        }
    });
    let err = format!(
        "{:#}",
        state_file::load(&file, m.new_state(), "LlamaForCausalLM", &fp).unwrap_err()
    );
    assert!(err.contains("kv.1.v") && err.contains("NaN"), "{err}");
}

/// Rewrites a gyre state file with `edit` applied to its metadata and f32 tensors.
fn rewrite(
    path: &std::path::Path,
    edit: impl FnOnce(
        &mut std::collections::HashMap<String, String>,
        &mut std::collections::BTreeMap<String, Vec<f32>>,
    ),
) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: std::collections::BTreeMap<String, Vec<f32>> = std::collections::BTreeMap::new();
    let mut shapes = std::collections::BTreeMap::new();
    for (name, t) in st.tensors() {
        shapes.insert(name.clone(), t.shape().to_vec());
        tensors.insert(
            name,
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        );
    }
    edit(&mut meta, &mut tensors);
    let raw: Vec<(String, Vec<u8>)> = tensors
        .iter()
        .map(|(n, v)| (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shapes[n].clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}
