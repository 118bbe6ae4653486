//! Llama-2 / Mistral / SOLAR: pre-norm decoder-only transformers.
//!
//! Reference: transformers `models/llama/modeling_llama.py` and `models/mistral/`, summarised
//! in shared/reference/MODELS.md section C. Per layer:
//!
//! ```text
//! h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))    n1 = rmsnorm(x)
//! x = h + down_proj(silu(gate_proj(n2)) · up_proj(n2))                     n2 = rmsnorm(h)
//! logits = lm_head(rmsnorm(x))
//! ```
//! RMSNorm multiplies by `w` (not 1 + w). RoPE pairs dim i with i + head_dim/2 (rotate_half),
//! angles `pos · theta^(−2i/head_dim)` in f32. GQA: query head h reads KV head
//! `h / (heads / kv_heads)`. Mistral's window: a query at position q sees keys p with
//! `q − p < sliding_window` (transformers `masking_utils.sliding_window_overlay`), so the
//! cache is a ring of `sliding_window` slots. Activations are f32; weights stay in their
//! stored dtype.

use anyhow::{bail, Result};

use super::layers::{self, AttnDims};
use super::{check_tokens, Arch, LoadOptions, Logits, Model, ModelInfo, SeqInput};
use crate::kernels::cpu::{self as k, linear};
use crate::loader::config::LlamaConfig;
use crate::loader::Checkpoint;
use crate::state::{KvCache, State};
use crate::tensor::{Matrix, Tensor};

impl Llama {
    /// The embedding table as a dense tensor (the CUDA twin uploads it as it is).
    pub(super) fn embed_tensor(&self) -> Result<&Tensor> {
        match &self.embed {
            Matrix::Dense(t) => Ok(t),
            other => bail!(
                "the embedding table is {}, where a dense tensor is needed here",
                other.format_name()
            ),
        }
    }
}

/// One decoder layer's weights (nn.Linear layout [out, in]).
pub(super) struct Layer {
    /// input_layernorm.weight [C]
    pub(super) attn_norm: Vec<f32>,
    /// q_proj [H·hd, C], k_proj / v_proj [KV·hd, C], o_proj [C, H·hd]
    pub(super) q: Matrix,
    pub(super) k: Matrix,
    pub(super) v: Matrix,
    pub(super) o: Matrix,
    /// post_attention_layernorm.weight [C]
    pub(super) mlp_norm: Vec<f32>,
    /// gate_proj / up_proj [F, C], down_proj [C, F]
    pub(super) gate: Matrix,
    pub(super) up: Matrix,
    pub(super) down: Matrix,
}

/// A Llama-architecture model with its weights.
pub struct Llama {
    pub(super) info: ModelInfo,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) eps: f32,
    pub(super) window: Option<usize>,
    /// inv_freq [head_dim / 2]
    pub(super) inv_freq: Vec<f32>,
    /// embed_tokens [V, C] (stored dtype, or a GGUF block format)
    pub(super) embed: Matrix,
    pub(super) layers: Vec<Layer>,
    /// model.norm.weight [C]
    pub(super) norm: Vec<f32>,
    /// lm_head [V, C]; the embedding when tied
    pub(super) lm_head: Matrix,
}

impl Llama {
    /// Builds the model from a checkpoint whose architecture is Llama or Mistral.
    pub fn load(ckpt: &Checkpoint, arch: Arch, opts: LoadOptions) -> Result<Llama> {
        let source = ckpt.config_source.clone();
        let cfg = LlamaConfig::from_value(ckpt.config()?, &source)?;
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let vec =
            |name: &str, n: usize| -> Result<Vec<f32>> { Ok(ckpt.get_shaped(name, &[n])?.to_f32_vec()) };
        let mat = |name: &str, rows: usize, cols: usize| ckpt.matrix(name, rows, cols, opts.quant);
        let embed = ckpt.matrix("model.embed_tokens.weight", v, c, None)?;
        let lm_head = match (&embed, ckpt.has("lm_head.weight")) {
            (_, true) => mat("lm_head.weight", v, c)?,
            (Matrix::Dense(t), false) => Matrix::new(t.clone(), opts.quant),
            (tied, false) => tied.clone(),
        };
        let mut inv_freq = cfg
            .rope_inv_freq()
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        // llama.cpp's converter stores Llama-3's frequency factors as a tensor.
        if ckpt.has("rope_freqs.weight") {
            let factors = vec("rope_freqs.weight", hd / 2)?;
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: vec(&format!("{p}.input_layernorm.weight"), c)?,
                q: mat(&format!("{p}.self_attn.q_proj.weight"), heads * hd, c)?,
                k: mat(&format!("{p}.self_attn.k_proj.weight"), kv_heads * hd, c)?,
                v: mat(&format!("{p}.self_attn.v_proj.weight"), kv_heads * hd, c)?,
                o: mat(&format!("{p}.self_attn.o_proj.weight"), c, heads * hd)?,
                mlp_norm: vec(&format!("{p}.post_attention_layernorm.weight"), c)?,
                gate: mat(&format!("{p}.mlp.gate_proj.weight"), f, c)?,
                up: mat(&format!("{p}.mlp.up_proj.weight"), f, c)?,
                down: mat(&format!("{p}.mlp.down_proj.weight"), c, f)?,
            });
        }
        let norm = vec("model.norm.weight", c)?;
        let (params, weight_bytes, dtypes) = ckpt.summary();
        let window = if arch == Arch::Mistral { cfg.window() } else { None };
        Ok(Llama {
            info: ModelInfo {
                arch,
                vocab_size: v,
                hidden_size: c,
                n_layers: cfg.num_hidden_layers,
                params,
                weight_bytes,
                dtypes,
                context_length: Some(cfg.max_position_embeddings),
                fingerprint: ckpt.fingerprint(),
            },
            heads,
            kv_heads,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
            window,
            inv_freq,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn cache<'s>(&self, state: &'s mut State) -> Result<&'s mut KvCache> {
        match state {
            State::Kv(c) if c.shape_matches(self.layers.len(), self.kv_dim(), self.window) => Ok(c),
            _ => bail!(
                "this state does not belong to a {} model of this shape",
                self.info.arch.name()
            ),
        }
    }
}

impl Model for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_state(&self) -> State {
        State::Kv(KvCache::new(self.layers.len(), self.kv_dim(), self.window))
    }

    fn state_bytes(&self, tokens: usize) -> usize {
        KvCache::bytes_at(self.layers.len(), self.kv_dim(), self.window, tokens)
    }

    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> Result<Vec<Vec<f32>>> {
        layers::on_pool(|| {
            check_tokens(batch, self.info.vocab_size)?;
            let mut positions = Vec::with_capacity(batch.len());
            for seq in batch.iter_mut() {
                positions.push(self.cache(seq.state)?.len());
            }
            let (segments, rows) = layers::segments(batch, |i| positions[i]);
            let (c, hd, h) = (self.info.hidden_size, self.head_dim, self.heads);
            let dims = AttnDims::scaled(h, self.kv_heads, hd);
            let window = self.window;
            let first_visible = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));

            // x: [rows, C] residual stream
            let mut x = vec![0f32; rows * c];
            layers::gather_embedding_rows(batch, &self.embed, 1.0, &mut x);
            let f = self.layers.first().map_or(0, |l| l.gate.rows());
            let mut normed = vec![0f32; rows * c];
            let mut attn = vec![0f32; rows * h * hd];
            let mut proj = vec![0f32; rows * c];
            let (mut gate, mut up) = (vec![0f32; rows * f], vec![0f32; rows * f]);

            for (li, layer) in self.layers.iter().enumerate() {
                k::rmsnorm(&x, &layer.attn_norm, self.eps, &mut normed);
                let mut caches = batch
                    .iter_mut()
                    .map(|s| self.cache(s.state))
                    .collect::<Result<Vec<_>>>()?;
                let w = layers::QkvWeights {
                    q: &layer.q,
                    k: &layer.k,
                    v: &layer.v,
                };
                layers::rope_attention(
                    dims,
                    w,
                    &self.inv_freq,
                    &normed,
                    &segments,
                    &mut caches,
                    li,
                    first_visible,
                    &mut attn,
                );
                linear(&attn, rows, &layer.o, &mut proj);
                k::add_assign(&mut x, &proj);

                k::rmsnorm(&x, &layer.mlp_norm, self.eps, &mut normed);
                k::linear_group(
                    rows,
                    &mut [(&normed, &layer.gate, &mut gate), (&normed, &layer.up, &mut up)],
                );
                k::swiglu(&mut gate, &up);
                linear(&gate, rows, &layer.down, &mut proj);
                k::add_assign(&mut x, &proj);
            }
            for (seg, seq) in segments.iter().zip(batch.iter_mut()) {
                self.cache(seq.state)?.advance(seg.len);
            }

            let norm = |x: &[f32], out: &mut [f32]| k::rmsnorm(x, &self.norm, self.eps, out);
            Ok(layers::head_logits(&x, c, &segments, which, norm, &self.lm_head))
        })
    }
}
