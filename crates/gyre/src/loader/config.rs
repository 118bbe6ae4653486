//! `config.json` as Hugging Face writes it, across transformers versions.
//!
//! Older files say `rope_theta` and `torch_dtype`; newer ones say `rope_parameters.rope_theta`
//! and `dtype`. Missing optional fields take the transformers defaults.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// The fields of a Llama / Mistral `config.json` that the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA), as in transformers.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Filled from `rope_theta` or `rope_parameters.rope_theta`; transformers' default 10000.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Mistral only: keys older than this many positions are masked.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Parses and checks a Llama-family config; `source` names the file in errors.
    pub fn from_value(value: &Value, source: &str) -> Result<LlamaConfig> {
        let mut cfg: LlamaConfig = serde_json::from_value(value.clone())
            .with_context(|| format!("{source}: not a valid Llama config"))?;
        if cfg.rope_theta.is_none() {
            cfg.rope_theta = cfg
                .rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64);
        }
        let rope_type = cfg
            .rope_parameters
            .as_ref()
            .or(cfg.rope_scaling.as_ref())
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if !matches!(rope_type, "default" | "linear" | "llama3") {
            bail!("{source}: rope type '{rope_type}' is not supported yet (default, linear and llama3 are)");
        }
        cfg.rope_inv_freq()?;
        if cfg.hidden_act != "silu" {
            bail!(
                "{source}: hidden_act '{}' is not supported (Llama uses silu)",
                cfg.hidden_act
            );
        }
        if cfg.attention_bias || cfg.mlp_bias {
            bail!("{source}: attention_bias / mlp_bias are not supported");
        }
        if cfg.num_attention_heads == 0
            || cfg.hidden_size == 0
            || cfg.num_hidden_layers == 0
            || cfg.vocab_size == 0
        {
            bail!("{source}: hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be positive");
        }
        let kv = cfg.kv_heads();
        if kv == 0 || !cfg.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "{source}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                cfg.num_attention_heads
            );
        }
        if !cfg.head_dim().is_multiple_of(2) {
            bail!("{source}: head_dim {} must be even for RoPE", cfg.head_dim());
        }
        check_positive(source, "rope_theta", cfg.theta())?;
        check_positive(source, "rms_norm_eps", cfg.rms_norm_eps)?;
        Ok(cfg)
    }

    /// Key/value heads (GQA groups).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base frequency.
    pub fn theta(&self) -> f64 {
        self.rope_theta.unwrap_or(10000.0)
    }

    /// The rotary frequencies [head_dim / 2] (transformers `modeling_rope_utils`): the default
    /// `theta^(−2i/d)`, divided by `factor` for `linear`, and for `llama3` divided by `factor`
    /// at long wavelengths and blended between `low_freq_factor` and `high_freq_factor`
    /// (`_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Result<Vec<f32>> {
        let mut inv = crate::kernels::cpu::rope_inv_freq(self.theta(), self.head_dim());
        let Some(p) = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|p| p.is_object())
        else {
            return Ok(inv);
        };
        let num = |k: &str, default: Option<f64>| -> Result<f64> {
            p.get(k)
                .and_then(Value::as_f64)
                .or(default)
                .with_context(|| format!("rope scaling needs a numeric '{k}'"))
        };
        match p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
        {
            Some("linear") => {
                let factor = num("factor", None)? as f32;
                inv.iter_mut().for_each(|f| *f /= factor);
            }
            Some("llama3") => {
                let factor = num("factor", None)? as f32;
                let low = num("low_freq_factor", Some(1.0))? as f32;
                let high = num("high_freq_factor", Some(4.0))? as f32;
                let old = num("original_max_position_embeddings", Some(8192.0))? as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            _ => {}
        }
        Ok(inv)
    }

    /// The attention window, when one applies.
    pub fn window(&self) -> Option<usize> {
        if self.use_sliding_window == Some(false) {
            return None;
        }
        self.sliding_window.filter(|&w| w > 0)
    }
}

/// Refuses a value the model cannot run with (zero, negative, NaN or infinite).
fn check_positive(source: &str, field: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{source}: {field} is {v}; it must be a positive number");
    }
    Ok(())
}

/// The declared storage dtype (`dtype` or the older `torch_dtype`), if any.
pub fn declared_dtype(config: &Value) -> Option<&str> {
    config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))
        .and_then(Value::as_str)
}

/// The fields of a RecurrentGemma `config.json` (transformers `RecurrentGemmaConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct GriffinConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` in transformers; real checkpoints say 1 (MQA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size`.
    #[serde(default)]
    pub lru_width: Option<usize>,
    #[serde(default = "default_window")]
    pub attention_window_size: usize,
    #[serde(default = "default_conv")]
    pub conv1d_width: usize,
    #[serde(default = "default_softcap")]
    pub logits_soft_cap: f64,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default = "default_block_types")]
    pub block_types: Vec<String>,
    #[serde(default = "default_gelu")]
    pub hidden_activation: String,
    #[serde(default = "default_true")]
    pub embeddings_scale_by_sqrt_dim: bool,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
}

fn default_window() -> usize {
    2048
}
fn default_conv() -> usize {
    4
}
fn default_softcap() -> f64 {
    30.0
}
fn default_block_types() -> Vec<String> {
    vec!["recurrent".into(), "recurrent".into(), "attention".into()]
}
fn default_gelu() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_true() -> bool {
    true
}

/// The temporal block of one Griffin layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Recurrent,
    Attention,
}

impl GriffinConfig {
    /// Parses and checks a RecurrentGemma config; `source` names the file in errors.
    pub fn from_value(value: &Value, source: &str) -> Result<GriffinConfig> {
        // Checkpoints written by transformers before v4.40 spell the field `_block_types`.
        let mut value = value.clone();
        if let Some(obj) = value.as_object_mut() {
            if !obj.contains_key("block_types") {
                if let Some(old) = obj.remove("_block_types") {
                    obj.insert("block_types".into(), old);
                }
            }
        }
        let cfg: GriffinConfig = serde_json::from_value(value)
            .with_context(|| format!("{source}: not a valid RecurrentGemma config"))?;
        if cfg.hidden_size == 0 || cfg.num_attention_heads == 0 || cfg.num_hidden_layers == 0 {
            bail!("{source}: hidden_size, num_attention_heads and num_hidden_layers must be positive");
        }
        check_positive(source, "rope_theta", cfg.theta())?;
        check_positive(source, "rms_norm_eps", cfg.rms_norm_eps)?;
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!("{source}: hidden_size must be a multiple of num_attention_heads");
        }
        if !cfg.lru_width().is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "{source}: lru_width {} must be a multiple of num_attention_heads",
                cfg.lru_width()
            );
        }
        let kv = cfg.kv_heads();
        if kv == 0 || !cfg.num_attention_heads.is_multiple_of(kv) {
            bail!("{source}: num_attention_heads must be a multiple of num_key_value_heads ({kv})");
        }
        if cfg.block_types.is_empty() {
            bail!("{source}: block_types is empty");
        }
        for b in &cfg.block_types {
            if b != "recurrent" && b != "attention" {
                bail!("{source}: block_types has '{b}'; expected 'recurrent' or 'attention'");
            }
        }
        if !cfg.hidden_activation.starts_with("gelu") {
            bail!(
                "{source}: hidden_activation '{}' is not supported (RecurrentGemma uses gelu_pytorch_tanh)",
                cfg.hidden_activation
            );
        }
        if cfg.conv1d_width == 0 || cfg.attention_window_size == 0 {
            bail!("{source}: conv1d_width and attention_window_size must be positive");
        }
        if !cfg.rot_dim().is_multiple_of(2) || cfg.rot_dim() > cfg.head_dim() {
            bail!(
                "{source}: the rotary part of the head ({}) must be even and fit in head_dim",
                cfg.rot_dim()
            );
        }
        Ok(cfg)
    }

    /// Width of the recurrence.
    pub fn lru_width(&self) -> usize {
        self.lru_width.unwrap_or(self.hidden_size)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// RoPE base.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0)
    }

    /// Dimensions of each head that RoPE rotates (the first `partial_rotary_factor` of it).
    pub fn rot_dim(&self) -> usize {
        let factor = self
            .partial_rotary_factor
            .or_else(|| {
                self.rope_parameters
                    .as_ref()?
                    .get("partial_rotary_factor")?
                    .as_f64()
            })
            .unwrap_or(0.5);
        (self.head_dim() as f64 * factor) as usize
    }

    /// The kind of layer `i`: `block_types` repeated.
    pub fn block(&self, i: usize) -> BlockKind {
        match self.block_types[i % self.block_types.len()].as_str() {
            "attention" => BlockKind::Attention,
            _ => BlockKind::Recurrent,
        }
    }
}
