//! Model families behind one trait, and the architecture detection that picks one.
//!
//! A model owns its read-only weights and computes logits for a batch of sequences, each
//! bringing its own [`State`]. Models never do I/O: they receive an opened [`Checkpoint`].

pub mod cuda;
pub mod griffin;
pub mod layers;
pub mod llama;
pub mod rwkv5;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::loader::Checkpoint;
use crate::sampling::Draw;
use crate::state::State;
use crate::tensor::{DType, Quant};

/// Which family and variant a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama-2, SOLAR-10.7B).
    Llama,
    /// `MistralForCausalLM` (Llama with a sliding attention window).
    Mistral,
    /// `RecurrentGemmaForCausalLM` (Griffin).
    RecurrentGemma,
    /// RWKV-5.2 "Eagle" (ChatRWKV checkpoint names).
    Rwkv5,
}

impl Arch {
    /// The Hugging Face class name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::RecurrentGemma => "RecurrentGemmaForCausalLM",
            Arch::Rwkv5 => "RWKV-5.2",
        }
    }
}

/// What `gyre info` reports about a loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    /// Parameters stored in the checkpoint (tied tensors counted once).
    pub params: usize,
    /// Bytes of weights as stored.
    pub weight_bytes: usize,
    /// Stored dtypes of the weights.
    pub dtypes: Vec<DType>,
    /// Longest sequence the model supports, if bounded.
    pub context_length: Option<usize>,
    /// The checkpoint's fingerprint ([`Checkpoint::fingerprint`]), recorded in state files.
    pub fingerprint: String,
}

/// One sequence's slice of a batched forward pass.
pub struct SeqInput<'a> {
    /// New tokens to feed (at least one).
    pub tokens: &'a [u32],
    /// The sequence's state; advanced by `tokens.len()`.
    pub state: &'a mut State,
}

/// Which positions to return logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only each sequence's last position: `[vocab]` per sequence.
    Last,
    /// Every fed position: `[n_tokens · vocab]` per sequence.
    All,
}

/// A causal language model.
pub trait Model: Send + Sync {
    /// Shape and size facts.
    fn info(&self) -> &ModelInfo;
    /// A fresh state for a new sequence.
    fn new_state(&self) -> State;
    /// Bytes a sequence's state holds after `tokens` tokens.
    fn state_bytes(&self, tokens: usize) -> usize;
    /// Feeds every sequence its tokens (one batched pass: each weight is read once) and
    /// returns logits per sequence. On error no state has been changed.
    fn forward(&self, batch: &mut [SeqInput<'_>], which: Logits) -> Result<Vec<Vec<f32>>>;
    /// [`Model::forward`], returning each sequence's next token as `draws[i]` picks it from
    /// its last logits ([`Draw::pick`]). A device model draws where the logits are, and only
    /// the tokens cross to the host.
    fn forward_drawn(&self, batch: &mut [SeqInput<'_>], draws: &[Draw]) -> Result<Vec<u32>> {
        check_draws(batch, draws)?;
        let logits = self.forward(batch, Logits::Last)?;
        for (l, seq) in logits.iter().zip(batch.iter()) {
            check_finite_logits(l, seq.state.tokens_seen().saturating_sub(1))?;
        }
        Ok(logits.iter().zip(draws).map(|(l, d)| d.pick(l)).collect())
    }

    /// Each sequence's greedy next token ([`crate::sampling::argmax`] of its last logits).
    fn forward_greedy(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<u32>> {
        let draws = vec![Draw::GREEDY; batch.len()];
        self.forward_drawn(batch, &draws)
    }
}

/// Refuses logits holding NaN or infinity (at sequence position `position`): broken weights or a
/// broken state, from which sampling would go on silently producing garbage.
pub fn check_finite_logits(logits: &[f32], position: usize) -> Result<()> {
    if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
        bail!(
            "the model produced {bad} logits at position {position}: its weights (or the loaded state) \
             hold NaN or infinite values; check the checkpoint"
        );
    }
    Ok(())
}

/// Checks that a batch has one draw per sequence.
pub fn check_draws(batch: &[SeqInput<'_>], draws: &[Draw]) -> Result<()> {
    if draws.len() != batch.len() {
        bail!("{} draws for a batch of {} sequences", draws.len(), batch.len());
    }
    Ok(())
}

/// Checks the token ids of a batch against the vocabulary before any state changes.
pub fn check_tokens(batch: &[SeqInput<'_>], vocab_size: usize) -> Result<()> {
    for (s, seq) in batch.iter().enumerate() {
        if seq.tokens.is_empty() {
            bail!("sequence {s} of the batch has no tokens to feed");
        }
        if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            bail!(
                "token id {bad} is out of range: the vocabulary has {vocab_size} tokens (0..{})",
                vocab_size - 1
            );
        }
    }
    Ok(())
}

/// Reads the architecture from `config.json` (`architectures`, else `model_type`).
pub fn detect(ckpt: &Checkpoint) -> Result<Arch> {
    // ChatRWKV checkpoints have no config.json; their tensor names say what they are.
    if ckpt.has("emb.weight") && ckpt.has("blocks.0.att.key.weight") {
        return Ok(Arch::Rwkv5);
    }
    let config = ckpt.config()?;
    let archs: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
    for a in &archs {
        match *a {
            "LlamaForCausalLM" => return Ok(Arch::Llama),
            "MistralForCausalLM" => return Ok(Arch::Mistral),
            "RecurrentGemmaForCausalLM" => return Ok(Arch::RecurrentGemma),
            _ => {}
        }
    }
    match model_type {
        "llama" if archs.is_empty() => Ok(Arch::Llama),
        "mistral" if archs.is_empty() => Ok(Arch::Mistral),
        "recurrent_gemma" if archs.is_empty() => Ok(Arch::RecurrentGemma),
        _ => bail!(
            "{}/config.json: unknown architecture (architectures {:?}, model_type '{}'); gyre runs \
             LlamaForCausalLM, MistralForCausalLM and RecurrentGemmaForCausalLM",
            ckpt.dir.display(),
            archs,
            model_type
        ),
    }
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("unknown device '{s}': use cpu, cuda or cuda:N"),
            },
        }
    }
}

/// How to build a model from its checkpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Quantize the weight matrices (linear layers and output head) at load.
    pub quant: Option<Quant>,
    /// Where the model runs.
    pub device: Device,
}

/// Detects the architecture and builds the model with weights as stored.
pub fn load(ckpt: &Checkpoint) -> Result<Box<dyn Model>> {
    load_with(ckpt, LoadOptions::default())
}

/// Detects the architecture and builds the model.
pub fn load_with(ckpt: &Checkpoint, opts: LoadOptions) -> Result<Box<dyn Model>> {
    let gpu = match opts.device {
        Device::Cpu => None,
        Device::Cuda(n) => {
            if opts.quant.is_some() {
                bail!("--quant runs on the CPU only; on --device cuda weights stay in their stored dtype");
            }
            Some(crate::kernels::cuda::Gpu::open(n)?)
        }
    };
    // The CUDA backend has no kernels for GGUF block formats: they are dequantized to f16
    // once, here, and run as an f16 model.
    let dequantized;
    let ckpt = if gpu.is_some() && ckpt.has_blocks() {
        dequantized = ckpt.with_blocks_as_f16();
        &dequantized
    } else {
        ckpt
    };
    match (detect(ckpt)?, gpu) {
        (arch @ (Arch::Llama | Arch::Mistral), None) => Ok(Box::new(llama::Llama::load(ckpt, arch, opts)?)),
        (arch @ (Arch::Llama | Arch::Mistral), Some(g)) => Ok(Box::new(cuda::llama::CudaLlama::new(
            llama::Llama::load(ckpt, arch, opts)?,
            &g,
        )?)),
        (Arch::RecurrentGemma, None) => Ok(Box::new(griffin::Griffin::load(ckpt, opts)?)),
        (Arch::RecurrentGemma, Some(g)) => Ok(Box::new(cuda::griffin::CudaGriffin::new(
            griffin::Griffin::load(ckpt, opts)?,
            &g,
        )?)),
        (Arch::Rwkv5, None) => Ok(Box::new(rwkv5::Rwkv5::load(ckpt, opts)?)),
        (Arch::Rwkv5, Some(g)) => Ok(Box::new(cuda::rwkv5::CudaRwkv5::new(
            rwkv5::Rwkv5::load(ckpt, opts)?,
            &g,
        )?)),
    }
}
