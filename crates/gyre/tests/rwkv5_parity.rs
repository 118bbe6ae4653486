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
