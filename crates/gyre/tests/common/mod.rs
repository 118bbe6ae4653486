//! Helpers shared by the parity tests: fixture paths, expected tensors, prefill and step runs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gyre::loader::Checkpoint;
use gyre::models::{self, Logits, Model, SeqInput};
use gyre::state::State;

/// `tests/fixtures/<family>/<case>`.
pub fn fixture(family: &str, case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(family)
        .join(case)
}

/// Tensors of an `expected.safetensors`: f32 ones as values, int64 ones as token ids.
pub struct Expected {
    pub floats: HashMap<String, Vec<f32>>,
    pub ints: HashMap<String, Vec<u32>>,
}

impl Expected {
    pub fn read(path: &Path) -> Expected {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (mut floats, mut ints) = (HashMap::new(), HashMap::new());
        for (name, t) in st.tensors() {
            match t.dtype() {
                safetensors::Dtype::F32 => {
                    let v = t
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    floats.insert(name, v);
                }
                safetensors::Dtype::I64 => {
                    let v = t
                        .data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                        .collect();
                    ints.insert(name, v);
                }
                other => panic!("unexpected dtype {other:?} for {name}"),
            }
        }
        Expected { floats, ints }
    }

    pub fn f(&self, name: &str) -> &[f32] {
        self.floats
            .get(name)
            .unwrap_or_else(|| panic!("expected tensor {name}"))
    }

    pub fn ids(&self, name: &str) -> &[u32] {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("expected ids {name}"))
    }
}

/// Loads the model of a fixture directory (or file).
pub fn load(path: &Path) -> Box<dyn Model> {
    let ckpt = Checkpoint::open(path, |_, _| {}).unwrap();
    models::load(&ckpt).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits of every position from one prefill of `tokens`, starting at `state`.
pub fn prefill_from(model: &dyn Model, state: &mut State, tokens: &[u32]) -> Vec<f32> {
    let mut out = model
        .forward(&mut [SeqInput { tokens, state }], Logits::All)
        .unwrap();
    out.pop().unwrap()
}

/// Logits of every position from one prefill of `tokens` on a fresh state.
pub fn prefill_all(model: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    prefill_from(model, &mut model.new_state(), tokens)
}

/// Logits of every position, feeding one token at a time, starting at `state`.
pub fn step_from(model: &dyn Model, state: &mut State, tokens: &[u32]) -> Vec<f32> {
    let mut rows = Vec::new();
    for t in tokens {
        let out = model
            .forward(
                &mut [SeqInput {
                    tokens: std::slice::from_ref(t),
                    state,
                }],
                Logits::Last,
            )
            .unwrap();
        rows.extend_from_slice(&out[0]);
    }
    rows
}

/// Logits of every position, one token at a time on a fresh state.
pub fn step_by_step(model: &dyn Model, tokens: &[u32]) -> Vec<f32> {
    step_from(model, &mut model.new_state(), tokens)
}

/// How far two f32 computations of the same logits may be apart when they sum the same
/// products in different orders (a prefill's blocked GEMM against a decode step's 16-lane
/// products): tens of ulps of the largest logit. A wrong position, mask or state moves
/// logits by 1e-3 and more.
pub fn rounding_bound(logits: &[f32]) -> f32 {
    4e-6 * (1.0 + logits.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// Asserts prefill and step-by-step both match `want` within `tol`, and each other within
/// [`rounding_bound`].
pub fn assert_parity(what: &str, model: &dyn Model, tokens: &[u32], want: &[f32], tol: f32) {
    let prefill = prefill_all(model, tokens);
    let d = max_abs_diff(&prefill, want);
    assert!(d <= tol, "{what}: prefill max |Δlogit| = {d} > {tol}");
    let step = step_by_step(model, tokens);
    let d = max_abs_diff(&step, want);
    assert!(d <= tol, "{what}: step-by-step max |Δlogit| = {d} > {tol}");
    let (d, bound) = (max_abs_diff(&step, &prefill), rounding_bound(&prefill));
    assert!(
        d <= bound,
        "{what}: prefill and step-by-step differ by {d} > {bound}"
    );
}
