//! RWKV-5.2 parity against the `rwkv` pip package (ChatRWKV), strategy `cpu fp32`.
//!
//! Fixtures: `tests/fixtures/rwkv5/<case>/`, made by `tools/make_rwkv5_fixtures.py`: random
//! v5.2 checkpoints written by `torch.save` (and the same tensors as safetensors), the
//! package's logits for every position, its state after the sequence, and logits starting
//! from a state-tuned initial state.

mod common;

use common::*;
use gyre::state::State;

#[test]
fn rwkv5_f32_pth_matches_the_rwkv_package() {
    let dir = fixture("rwkv5", "rwkv5_tiny_f32");
    let model = load(&dir.join("model.pth"));
    let exp = Expected::read(&dir.join("expected.safetensors"));
    assert_parity(
        "rwkv5 f32",
        model.as_ref(),
        exp.ids("tokens"),
        exp.f("logits"),
        1e-4,
    );
}

#[test]
fn pth_and_safetensors_give_identical_logits() {
    let dir = fixture("rwkv5", "rwkv5_tiny_f32");
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let a = prefill_all(load(&dir.join("model.pth")).as_ref(), exp.ids("tokens"));
    let b = prefill_all(load(&dir.join("model.safetensors")).as_ref(), exp.ids("tokens"));
    assert_eq!(a, b);
}

/// bf16 storage: the package folds ln0 into the bf16 table (rounding it) and computes in f32.
#[test]
fn rwkv5_bf16_matches_the_rwkv_package() {
    let dir = fixture("rwkv5", "rwkv5_tiny_bf16");
    let model = load(&dir.join("model.pth"));
    let exp = Expected::read(&dir.join("expected.safetensors"));
    assert_parity(
        "rwkv5 bf16",
        model.as_ref(),
        exp.ids("tokens"),
        exp.f("logits"),
        1e-4,
    );
    let native = prefill_all(model.as_ref(), exp.ids("tokens"));
    let d = max_abs_diff(&native, exp.f("logits_native"));
    assert!(d <= 0.5, "against the package's cpu bf16 strategy: {d}");
}

/// After the sequence, the state equals the package's: token shifts and WKV [head, key, value].
#[test]
fn state_after_the_sequence_matches_the_package() {
    let dir = fixture("rwkv5", "rwkv5_tiny_f32");
    let model = load(&dir.join("model.pth"));
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let mut state = model.new_state();
    prefill_from(model.as_ref(), &mut state, exp.ids("tokens"));
    let State::Rwkv(st) = &state else {
        panic!("not an RWKV state")
    };
    for n in 0..st.wkv.len() {
        for (name, got) in [
            ("att_shift", &st.att_shift[n]),
            ("wkv", &st.wkv[n]),
            ("ffn_shift", &st.ffn_shift[n]),
        ] {
            let d = max_abs_diff(got, exp.f(&format!("state.{n}.{name}")));
            assert!(d <= 1e-4, "state.{n}.{name}: {d}");
        }
    }
    assert_eq!(model.state_bytes(1024), model.state_bytes(32768));
    assert_eq!(state.bytes(), model.state_bytes(1));
}

type Entry = (String, Vec<usize>, Vec<u8>);

/// Rewrites the f32 fixture's safetensors through `change` (plus `extra` tensors) into `dir`.
fn rewritten(
    dir: &tempfile::TempDir,
    change: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>,
    extra: Vec<Entry>,
) -> std::path::PathBuf {
    let src = fixture("rwkv5", "rwkv5_tiny_f32").join("model.safetensors");
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<Entry> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| change(&n, v.shape().to_vec(), v.data().to_vec()).map(|(s, d)| (n, s, d)))
        .collect();
    kept.extend(extra);
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let out = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &out).unwrap();
    out
}

fn load_err(path: &std::path::Path) -> String {
    let ckpt = gyre::loader::Checkpoint::open(path, |_, _| {}).unwrap();
    match gyre::models::load(&ckpt) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn wrong_shapes_and_other_rwkv_versions_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = rewritten(
        &dir,
        |n, s, d| {
            if n == "blocks.1.att.key.weight" {
                Some((vec![s[0] - 1, s[1]], d[..(s[0] - 1) * s[1] * 4].to_vec()))
            } else {
                Some((s, d))
            }
        },
        vec![],
    );
    let err = load_err(&bad);
    assert!(
        err.contains("blocks.1.att.key.weight") && err.contains("shape"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let v4 = rewritten(&dir, |n, s, d| (!n.contains("ln_x")).then_some((s, d)), vec![]);
    assert!(load_err(&v4).contains("unsupported RWKV version 4"));

    // RWKV-6 is recognised by its time_maa_* tensors.
    let dir = tempfile::tempdir().unwrap();
    let maa = (
        "blocks.0.att.time_maa_x".to_string(),
        vec![1, 1, 128],
        vec![0u8; 128 * 4],
    );
    let v6 = rewritten(&dir, |_, s, d| Some((s, d)), vec![maa]);
    let err = load_err(&v6);
    assert!(err.contains("unsupported RWKV version 6"), "{err}");
}
