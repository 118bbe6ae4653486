//! RecurrentGemma parity against the DeepMind `recurrentgemma` reference (torch, f32).
//!
//! Fixtures: `tests/fixtures/griffin/<case>/`, made by `tools/make_griffin_fixtures.py`:
//! random reference models converted to HF tensor names, with the reference's logits for a
//! sequence ≥ 3× the attention window and for a short one.

mod common;

use common::*;
use gyre::models::{Logits, SeqInput};

fn check_case(case: &str) {
    let dir = fixture("griffin", case);
    let model = load(&dir);
    let exp = Expected::read(&dir.join("expected.safetensors"));
    assert_parity(
        &format!("{case} long"),
        model.as_ref(),
        exp.ids("tokens_long"),
        exp.f("logits_long"),
        1e-4,
    );
    assert_parity(
        &format!("{case} short"),
        model.as_ref(),
        exp.ids("tokens_short"),
        exp.f("logits_short"),
        1e-4,
    );
}

/// width 96 (bf16-rounded √96 multiplier), lru 128 ≠ width, 4 heads, layers R,R,A,R
/// (block_types cycled), window 8, 32 tokens.
#[test]
fn griffin_small_matches_deepmind_reference_past_the_window() {
    check_case("griffin_small");
}

/// Attention first (A,R), the older `_block_types` config spelling, window 4, and a
/// 3-token sequence shorter than the conv width.
#[test]
fn griffin_attention_first_matches_deepmind_reference() {
    check_case("griffin_attn_first");
}

/// Prefill in uneven chunks (crossing the window) equals the reference too.
#[test]
fn chunked_prefill_equals_reference() {
    let dir = fixture("griffin", "griffin_small");
    let model = load(&dir);
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let (tokens, want) = (exp.ids("tokens_long"), exp.f("logits_long"));
    let v = model.info().vocab_size;
    let mut state = model.new_state();
    let mut got = Vec::new();
    for chunk in [&tokens[..3], &tokens[3..13], &tokens[13..14], &tokens[14..]] {
        got.extend(prefill_from(model.as_ref(), &mut state, chunk));
    }
    assert_eq!(got.len(), tokens.len() * v);
    let d = max_abs_diff(&got, want);
    assert!(d <= 1e-4, "chunked prefill: {d}");
}

/// The state's size is fixed from the first token on, whatever the length.
#[test]
fn state_size_is_independent_of_sequence_length() {
    let dir = fixture("griffin", "griffin_small");
    let model = load(&dir);
    let mut state = model.new_state();
    let fresh = state.bytes();
    let tokens: Vec<u32> = (0..200).map(|i| (i * 7 % 256) as u32).collect();
    model
        .forward(
            &mut [SeqInput {
                tokens: &tokens,
                state: &mut state,
            }],
            Logits::Last,
        )
        .unwrap();
    assert_eq!(state.bytes(), fresh);
    for t in 0..50 {
        model
            .forward(
                &mut [SeqInput {
                    tokens: &[t],
                    state: &mut state,
                }],
                Logits::Last,
            )
            .unwrap();
    }
    assert_eq!(state.bytes(), fresh);
    assert_eq!(model.state_bytes(1024), model.state_bytes(32768));
    assert_eq!(model.state_bytes(1024), fresh);
}

/// Two sequences at different positions in one batch equal each run alone.
#[test]
fn batched_forward_equals_single_sequences() {
    let dir = fixture("griffin", "griffin_small");
    let model = load(&dir);
    let exp = Expected::read(&dir.join("expected.safetensors"));
    let t = exp.ids("tokens_long");
    let v = model.info().vocab_size;
    let (mut sa, mut sb) = (model.new_state(), model.new_state());
    prefill_from(model.as_ref(), &mut sb, &t[..11]);
    let out = model
        .forward(
            &mut [
                SeqInput {
                    tokens: &t[..20],
                    state: &mut sa,
                },
                SeqInput {
                    tokens: &t[11..],
                    state: &mut sb,
                },
            ],
            Logits::All,
        )
        .unwrap();
    let want = exp.f("logits_long");
    assert!(max_abs_diff(&out[0], &want[..20 * v]) <= 1e-4);
    assert!(max_abs_diff(&out[1], &want[11 * v..]) <= 1e-4);
}
