//! What a GGUF file's keys and tensors mean for gyre's models: the `llama` architecture
//! (Llama-2, Mistral, SOLAR, TinyLlama, SmolLM, Llama-3) as the Hugging Face names and
//! `config.json` fields that `models::llama` reads.
//!
//! Hyperparameters come from the `llama.*` keys (llama.cpp `src/llama-arch.cpp`,
//! `src/models/llama.cpp`). Tensors are renamed to their transformers names; llama.cpp's
//! converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of `attn_q` and
//! `attn_k` within each head for ggml's adjacent-pair rotary, and they are put back in the
//! transformers order here (a lossless move of whole rows), so the model computes what the
//! original checkpoint computes. Everything else stays memory-mapped in its stored format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::gguf::{GgufFile, TensorInfo};
use super::safetensors::NamedTensor;
use crate::tensor::{GgmlMatrix, Tensor};

/// A block-format tensor under its transformers name, with the name it has in the file.
#[derive(Clone, Debug)]
pub struct NamedBlocks {
    pub matrix: Arc<GgmlMatrix>,
    /// The GGUF tensor name (for messages).
    pub stored_name: String,
}

/// A GGUF checkpoint as the loader hands it on.
pub struct GgufCheckpoint {
    /// `config.json` as transformers would write it for this model.
    pub config: Value,
    /// F32 / F16 / BF16 tensors.
    pub dense: BTreeMap<String, NamedTensor>,
    /// Block-quantized tensors.
    pub blocks: BTreeMap<String, NamedBlocks>,
    /// transformers name → GGUF name, for every tensor.
    pub stored_names: BTreeMap<String, String>,
    pub file: Arc<GgufFile>,
}

/// The transformers name of a `llama` GGUF tensor, and whether its rows were permuted for
/// ggml's rotary (`Some(n_heads)` of the permutation).
fn hf_name(gguf: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    let plain = |s: &str| Some((s.to_string(), None));
    match gguf {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        "rope_freqs.weight" => return plain("rope_freqs.weight"),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let p = format!("model.layers.{layer}");
    let (name, perm) = match part {
        "attn_norm.weight" => (format!("{p}.input_layernorm.weight"), None),
        "attn_q.weight" => (format!("{p}.self_attn.q_proj.weight"), Some(heads)),
        "attn_k.weight" => (format!("{p}.self_attn.k_proj.weight"), Some(kv_heads)),
        "attn_v.weight" => (format!("{p}.self_attn.v_proj.weight"), None),
        "attn_output.weight" => (format!("{p}.self_attn.o_proj.weight"), None),
        "ffn_norm.weight" => (format!("{p}.post_attention_layernorm.weight"), None),
        "ffn_gate.weight" => (format!("{p}.mlp.gate_proj.weight"), None),
        "ffn_up.weight" => (format!("{p}.mlp.up_proj.weight"), None),
        "ffn_down.weight" => (format!("{p}.mlp.down_proj.weight"), None),
        _ => return None,
    };
    Some((name, perm))
}

/// The GGUF name of a transformers tensor name of a llama model (the inverse of `hf_name`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// The GGUF row that holds row `r` of the transformers matrix, for `attn_q` / `attn_k` rows of
/// `head_dim` per head: within a head, transformers row `a·hd/2 + b` is GGUF row `2b + a`
/// (the inverse of `convert_hf_to_gguf.py`'s `permute`).
pub fn unpermuted_source(r: usize, head_dim: usize) -> usize {
    let (head, j) = (r / head_dim, r % head_dim);
    let half = head_dim / 2;
    head * head_dim + 2 * (j % half) + j / half
}

/// Opens a GGUF file of the `llama` architecture.
pub fn open(path: &Path) -> Result<GgufCheckpoint> {
    let file = Arc::new(GgufFile::open(path)?);
    let shown = path.display().to_string();
    let arch = file
        .opt_str("general.architecture")?
        .with_context(|| format!("{shown}: metadata key 'general.architecture' is missing"))?;
    if arch != "llama" {
        bail!(
            "{shown}: GGUF architecture '{arch}' is not supported; gyre runs GGUF files of the \
             'llama' architecture (Llama-2, Mistral, SOLAR, TinyLlama, Llama-3) and RecurrentGemma \
             and RWKV-5 from safetensors or .pth checkpoints"
        );
    }
    let key = |k: &str| format!("llama.{k}");
    let required = |k: &str| -> Result<usize> { Ok(file.u64_key(&key(k))? as usize) };
    let uniform = |k: &str| -> Result<Option<usize>> {
        // A few converters write per-layer arrays; gyre runs models whose layers agree.
        match file.get(&key(k)) {
            Some(super::gguf::Value::Array(items)) => {
                let vals: Vec<Option<u64>> = items.iter().map(|v| v.as_u64()).collect();
                match vals.first() {
                    Some(Some(first)) if vals.iter().all(|v| *v == Some(*first)) => Ok(Some(*first as usize)),
                    _ => bail!(
                        "{shown}: metadata key '{}' differs between layers, which gyre does not run",
                        key(k)
                    ),
                }
            }
            Some(_) => Ok(Some(file.u64_key(&key(k))? as usize)),
            None => Ok(None),
        }
    };
    let hidden = required("embedding_length")?;
    let layers = required("block_count")?;
    let ffn = uniform("feed_forward_length")?
        .with_context(|| format!("{shown}: metadata key 'llama.feed_forward_length' is missing"))?;
    let heads = uniform("attention.head_count")?
        .with_context(|| format!("{shown}: metadata key 'llama.attention.head_count' is missing"))?;
    let kv_heads = uniform("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || hidden == 0 || layers == 0 || kv_heads == 0 {
        bail!("{shown}: embedding_length, block_count and the head counts must be positive");
    }
    if file.opt_u64(&key("expert_count"))?.unwrap_or(0) > 0 {
        bail!(
            "{shown}: this is a mixture-of-experts model (llama.expert_count); gyre runs dense Llama models"
        );
    }
    let head_dim = file
        .opt_u64(&key("attention.key_length"))?
        .map_or(hidden / heads, |v| v as usize);
    if let Some(v) = file.opt_u64(&key("attention.value_length"))? {
        if v as usize != head_dim {
            bail!("{shown}: llama.attention.value_length {v} differs from key_length {head_dim}");
        }
    }
    if let Some(rot) = file.opt_u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            bail!("{shown}: llama.rope.dimension_count {rot} differs from the head size {head_dim}; partial rotary is not supported");
        }
    }
    let eps = file
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .with_context(|| {
            format!("{shown}: metadata key 'llama.attention.layer_norm_rms_epsilon' is missing")
        })?;
    let theta = file.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let context = file.opt_u64(&key("context_length"))?.map_or(4096, |v| v as usize);
    let rope_scaling = match file.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => Value::Null,
        Some("linear") => {
            let factor = file
                .opt_f64(&key("rope.scaling.factor"))?
                .with_context(|| format!("{shown}: linear RoPE scaling without llama.rope.scaling.factor"))?;
            json!({"rope_type": "linear", "factor": factor})
        }
        Some(other) => {
            bail!("{shown}: RoPE scaling '{other}' (llama.rope.scaling.type) is not supported yet")
        }
    };
    let window = file.opt_u64(&key("attention.sliding_window"))?.filter(|&w| w > 0);

    // Tensors: checked against the names llama.cpp expects, renamed, q/k rows put back.
    let mut dense = BTreeMap::new();
    let mut blocks = BTreeMap::new();
    let mut stored_names = BTreeMap::new();
    let mut vocab = None;
    for t in &file.tensors {
        let (name, perm) = hf_name(&t.name, heads, kv_heads).with_context(|| {
            format!(
                "{shown}: tensor '{}' is not part of a llama model as gyre runs it (biases, fused \
                 qkv and experts are not supported)",
                t.name
            )
        })?;
        if t.name == "token_embd.weight" {
            vocab = t.ne.get(1).map(|&v| v as usize);
        }
        stored_names.insert(name.clone(), t.name.clone());
        let perm_dim = perm.map(|_| head_dim);
        match t.ty.dense() {
            Some(dtype) => {
                let tensor = Tensor::from_mmap(file.map.clone(), t.start, t.len, dtype, t.shape())
                    .with_context(|| format!("{shown}: tensor '{}'", t.name))?;
                let tensor = match perm_dim {
                    Some(hd) => permute_dense_rows(&tensor, hd, t, &shown)?,
                    None => tensor,
                };
                dense.insert(
                    name,
                    NamedTensor {
                        tensor,
                        file: PathBuf::from(path),
                    },
                );
            }
            None => {
                if t.ne.len() != 2 {
                    bail!(
                        "{shown}: tensor '{}' is {} with {} dimensions; gyre reads block formats for matrices only",
                        t.name,
                        t.ty,
                        t.ne.len()
                    );
                }
                let (rows, cols) = (t.ne[1] as usize, t.ne[0] as usize);
                let m = GgmlMatrix::from_mmap(file.map.clone(), t.start, t.len, t.ty, rows, cols)
                    .with_context(|| format!("{shown}: tensor '{}'", t.name))?;
                let m = match perm_dim {
                    Some(hd) => {
                        check_permutable(rows, hd, t, &shown)?;
                        m.permute_rows(|r| unpermuted_source(r, hd))
                    }
                    None => m,
                };
                blocks.insert(
                    name,
                    NamedBlocks {
                        matrix: Arc::new(m),
                        stored_name: t.name.clone(),
                    },
                );
            }
        }
    }
    let vocab = vocab.with_context(|| format!("{shown}: tensor 'token_embd.weight' is missing"))?;
    if let Some(v) = file.opt_u64(&key("vocab_size"))? {
        if v as usize != vocab {
            bail!("{shown}: llama.vocab_size {v} differs from the {vocab} rows of token_embd.weight");
        }
    }
    let arch_name = if window.is_some() {
        "MistralForCausalLM"
    } else {
        "LlamaForCausalLM"
    };
    let config = json!({
        "architectures": [arch_name],
        "model_type": if window.is_some() { "mistral" } else { "llama" },
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": context,
        "sliding_window": window,
        "tie_word_embeddings": !stored_names.contains_key("lm_head.weight"),
    });
    Ok(GgufCheckpoint {
        config,
        dense,
        blocks,
        stored_names,
        file,
    })
}

fn check_permutable(rows: usize, head_dim: usize, t: &TensorInfo, shown: &str) -> Result<()> {
    if head_dim < 2 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        bail!(
            "{shown}: tensor '{}' has {rows} rows, not whole heads of {head_dim} (an even head size)",
            t.name
        );
    }
    Ok(())
}

/// A dense q/k matrix with its rows put back in the transformers order.
fn permute_dense_rows(t: &Tensor, head_dim: usize, info: &TensorInfo, shown: &str) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    if shape.len() != 2 {
        bail!(
            "{shown}: tensor '{}' must be a matrix, found shape {shape:?}",
            info.name
        );
    }
    check_permutable(shape[0], head_dim, info, shown)?;
    let row_bytes = shape[1] * t.dtype().size();
    let raw = t.raw();
    let mut out = Vec::with_capacity(raw.len());
    for r in 0..shape[0] {
        let s = unpermuted_source(r, head_dim);
        out.extend_from_slice(&raw[s * row_bytes..(s + 1) * row_bytes]);
    }
    Ok(Tensor::from_bytes(&out, t.dtype(), shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of llama.cpp's `permute`: `w.reshape(n_head, 2, hd/2, C).swapaxes(1, 2)`.
    #[test]
    fn unpermuting_inverts_the_converters_permutation() {
        let (heads, hd) = (3, 8);
        // permute: GGUF row h·hd + 2b + a holds transformers row h·hd + a·hd/2 + b.
        let mut gguf_of_hf = vec![0; heads * hd];
        for h in 0..heads {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    gguf_of_hf[h * hd + a * hd / 2 + b] = h * hd + 2 * b + a;
                }
            }
        }
        for (r, &g) in gguf_of_hf.iter().enumerate() {
            assert_eq!(unpermuted_source(r, hd), g, "row {r}");
        }
    }
}
