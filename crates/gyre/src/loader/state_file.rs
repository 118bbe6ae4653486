//! State files: a sequence's state saved after a prompt and loaded to resume from it, and
//! RWKV "state-tuned" initial states.
//!
//! gyre's own layout is a safetensors file of f32 tensors named as [`State::parts`] lists
//! them, with metadata `format = "gyre-state"`, `version = "1"`, `arch` (the model's
//! architecture name), `tokens` (how many tokens the state has consumed) and `weights` (the
//! model's [`crate::loader::Checkpoint::fingerprint`]). Loading checks all of them against the
//! model and the tensors before anything is allocated for them, and refuses NaN or infinite
//! values.
//!
//! RWKV state-tuned files (a `.pth` or `.safetensors` dict of `blocks.{n}.att.time_state`,
//! stored [H, value, key]; MODELS.md B.6) set the WKV matrices, transposed to [H, key, value],
//! with zero token shifts and no tokens consumed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::safetensors::NamedTensor;
use crate::state::State;

const FORMAT: &str = "gyre-state";

/// Writes `state` (of a model whose architecture is `arch` and whose weights have
/// `fingerprint`) to `path`.
pub fn save(path: &Path, state: &State, arch: &str, fingerprint: &str) -> Result<()> {
    let mut state = state.clone();
    let tokens = state.tokens_seen();
    let parts: Vec<(String, Vec<usize>, Vec<u8>)> = state
        .parts()?
        .into_iter()
        .map(|(name, shape, values)| (name, shape, bytemuck::cast_slice::<f32, u8>(values).to_vec()))
        .collect();
    let views = parts
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("state tensor {name}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", "1".to_string()),
        ("arch", arch.to_string()),
        ("tokens", tokens.to_string()),
        ("weights", fingerprint.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("cannot write the state file {}", path.display()))
}

fn read_tensors(path: &Path) -> Result<(BTreeMap<String, NamedTensor>, HashMap<String, String>)> {
    if path.extension().is_some_and(|e| e == "pth" || e == "pt") {
        return Ok((super::pth::read_file(path)?, HashMap::new()));
    }
    let tensors = super::safetensors::read_file(path)?;
    let map = super::safetensors::map_file(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file ({e})", path.display()))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// True when `path` is a gyre state file (what `gyre state save` may overwrite).
pub fn is_state_file(path: &Path) -> bool {
    read_tensors(path).is_ok_and(|(_, meta)| meta.get("format").map(String::as_str) == Some(FORMAT))
}

/// Loads the state file at `path` into `fresh` (a new state of the model it must fit, whose
/// architecture is `arch` and whose weights have `fingerprint`) and returns it.
pub fn load(path: &Path, mut fresh: State, arch: &str, fingerprint: &str) -> Result<State> {
    let (tensors, meta) = read_tensors(path)?;
    let file = path.display();
    if tensors.contains_key("blocks.0.att.time_state") {
        let state = load_time_state(path, &tensors, fresh)?;
        return check_finite(path, state);
    }
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("{file} is not a gyre state file (no format=gyre-state metadata) nor an RWKV time_state file");
    }
    if meta.get("arch").map(String::as_str) != Some(arch) {
        bail!(
            "{file} holds the state of a {} model, but this model is {arch}",
            meta.get("arch").map_or("unknown", String::as_str)
        );
    }
    if let Some(saved) = meta.get("weights") {
        if saved != fingerprint {
            bail!(
                "{file} was saved from another model: its weights' fingerprint is {saved}, this model's \
                 is {fingerprint} (the architecture and shapes match, the weights do not)"
            );
        }
    }
    let tokens: usize = meta
        .get("tokens")
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("{file}: metadata 'tokens' is missing or not a number"))?;
    // The caches' rows are in the file: `tokens` must agree with them before anything is
    // sized by it.
    if let Some(rows) = fresh.cache_rows_for(tokens) {
        for (name, t) in &tensors {
            if name.starts_with("kv.") && t.tensor.shape().first() != Some(&rows) {
                bail!(
                    "{file}: metadata 'tokens' says {tokens}, so state tensor '{name}' should hold {rows} \
                     rows, but it has shape {:?}: the file is damaged",
                    t.tensor.shape()
                );
            }
        }
    }
    fresh.prepare_for(tokens);
    let expected = fresh.parts()?.len();
    if tensors.len() != expected {
        bail!(
            "{file} has {} tensors; this model's state has {expected}: it was saved from another model",
            tensors.len()
        );
    }
    for (name, shape, values) in fresh.parts()? {
        let t = tensors.get(&name).with_context(|| {
            format!("{file}: state tensor '{name}' is missing (saved from another model?)")
        })?;
        if t.tensor.shape() != shape.as_slice() {
            bail!(
                "{file}: state tensor '{name}' has shape {:?}, this model needs {shape:?} (saved from another model?)",
                t.tensor.shape()
            );
        }
        values.copy_from_slice(&t.tensor.to_f32_vec());
    }
    check_finite(path, fresh)
}

/// Refuses a state holding NaN or infinite values (it would turn every logit into NaN).
fn check_finite(path: &Path, mut state: State) -> Result<State> {
    for (name, _, values) in state.parts()? {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: state tensor '{name}' holds {} at element {i}: the file is damaged",
                path.display(),
                values[i]
            );
        }
    }
    Ok(state)
}

fn load_time_state(path: &Path, tensors: &BTreeMap<String, NamedTensor>, mut fresh: State) -> Result<State> {
    if let State::Device(d) = &mut fresh {
        let host = load_time_state(path, tensors, d.to_host()?)?;
        d.load_host(host);
        return Ok(fresh);
    }
    let file = path.display();
    let State::Rwkv(st) = &mut fresh else {
        bail!("{file} is an RWKV state-tuning file (blocks.N.att.time_state); this model is not RWKV");
    };
    let (h, n) = (st.heads, st.head_size);
    let layers = st.wkv.len();
    let found = tensors.keys().filter(|k| k.ends_with(".att.time_state")).count();
    if found != layers {
        bail!("{file} has time_state for {found} layers; this model has {layers}");
    }
    for (l, wkv) in st.wkv.iter_mut().enumerate() {
        let name = format!("blocks.{l}.att.time_state");
        let t = tensors
            .get(&name)
            .with_context(|| format!("{file}: '{name}' is missing"))?;
        if t.tensor.shape() != [h, n, n] {
            bail!(
                "{file}: '{name}' has shape {:?}, this model needs [{h}, {n}, {n}]",
                t.tensor.shape()
            );
        }
        // Stored [head, value j, key i]; the recurrence keeps [head, key i, value j].
        let stored = t.tensor.to_f32_vec();
        for hh in 0..h {
            for j in 0..n {
                for i in 0..n {
                    wkv[hh * n * n + i * n + j] = stored[hh * n * n + j * n + i];
                }
            }
        }
    }
    Ok(fresh)
}
