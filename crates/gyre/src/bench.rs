//! Benchmarks: synthetic models at the real shapes, the machine's own read bandwidth, and the
//! roofline figures (bytes of weights read per decoded token, achieved GB/s, their ratio).
//!
//! Decoding one token reads every weight once (plus one embedding row), so its speed limit
//! is `bandwidth / weight bytes per token`. Both figures are measured in the same run, so the
//! ratio holds on a shared, noisy machine.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::loader::Checkpoint;
use crate::models::{Logits, Model, SeqInput};
use crate::sampling::{Draw, Sampler, SamplingParams};
use crate::state::State;
use crate::tensor::{DType, Quant, Tensor};

/// Model shapes `gyre bench --synthetic` can build.
pub const SHAPES: &[&str] = &[
    "recurrentgemma-2b",
    "recurrentgemma-9b",
    "rwkv5-1b5",
    "rwkv5-3b",
    "rwkv5-7b",
    "llama-7b",
    "mistral-7b",
    "solar-10.7b",
    "gemma-2b-like",
    "tinyllama-1.1b",
    "tiny-llama",
];

/// How a synthetic tensor is filled.
#[derive(Clone, Copy)]
enum Fill {
    /// Uniform with the standard deviation of a fan-in `n` initialisation.
    FanIn(usize),
    /// A constant.
    Const(f32),
    /// Uniform in [lo, hi).
    Range(f32, f32),
}

struct Spec {
    config: Value,
    tensors: Vec<(String, Vec<usize>, Fill)>,
}

/// A Llama-architecture shape: hidden, layers, heads, kv heads, head dim, MLP width, vocab.
struct LlamaShape(usize, usize, usize, usize, usize, usize, usize);

fn llama_spec(arch: &str, shape: LlamaShape, tied: bool) -> Spec {
    let LlamaShape(c, layers, heads, kv, hd, f, v) = shape;
    let model_type = if arch == "MistralForCausalLM" {
        "mistral"
    } else {
        "llama"
    };
    let mut config = json!({
        "architectures": [arch], "model_type": model_type, "hidden_size": c, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "intermediate_size": f,
        "vocab_size": v, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": tied,
    });
    if arch == "MistralForCausalLM" {
        config["sliding_window"] = json!(4096);
    }
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, c],
        Fill::Range(-0.05, 0.05),
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![c], Fill::Const(1.0)));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, c],
            Fill::FanIn(c),
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv * hd, c],
            Fill::FanIn(c),
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv * hd, c],
            Fill::FanIn(c),
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![c, heads * hd],
            Fill::FanIn(heads * hd),
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![c],
            Fill::Const(1.0),
        ));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![f, c], Fill::FanIn(c)));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![f, c], Fill::FanIn(c)));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![c, f], Fill::FanIn(f)));
    }
    t.push(("model.norm.weight".into(), vec![c], Fill::Const(1.0)));
    if !tied {
        t.push(("lm_head.weight".into(), vec![v, c], Fill::FanIn(c)));
    }
    Spec { config, tensors: t }
}

fn griffin_spec(c: usize, layers: usize, heads: usize, f: usize, v: usize) -> Spec {
    let (lru, hd, bw) = (c, c / heads, c / heads);
    let config = json!({
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma", "hidden_size": c,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1, "lru_width": lru,
        "intermediate_size": 2 * f, "vocab_size": v, "attention_window_size": 2048, "conv1d_width": 4,
        "block_types": ["recurrent", "recurrent", "attention"], "rms_norm_eps": 1e-6, "logits_soft_cap": 30.0,
    });
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, c],
        Fill::Range(-0.05, 0.05),
    )];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let tb = format!("{p}.temporal_block");
        t.push((format!("{p}.temporal_pre_norm.weight"), vec![c], Fill::Const(0.0)));
        t.push((format!("{p}.channel_pre_norm.weight"), vec![c], Fill::Const(0.0)));
        if i % 3 == 2 {
            t.push((format!("{tb}.q_proj.weight"), vec![c, c], Fill::FanIn(c)));
            t.push((format!("{tb}.k_proj.weight"), vec![hd, c], Fill::FanIn(c)));
            t.push((format!("{tb}.v_proj.weight"), vec![hd, c], Fill::FanIn(c)));
            t.push((format!("{tb}.o_proj.weight"), vec![c, c], Fill::FanIn(c)));
            t.push((format!("{tb}.o_proj.bias"), vec![c], Fill::Const(0.0)));
        } else {
            for (n, rows, cols) in [("linear_x", lru, c), ("linear_y", lru, c), ("linear_out", c, lru)] {
                t.push((format!("{tb}.{n}.weight"), vec![rows, cols], Fill::FanIn(cols)));
                t.push((format!("{tb}.{n}.bias"), vec![rows], Fill::Const(0.0)));
            }
            t.push((
                format!("{tb}.conv_1d.weight"),
                vec![lru, 1, 4],
                Fill::Range(-0.5, 0.5),
            ));
            t.push((format!("{tb}.conv_1d.bias"), vec![lru], Fill::Const(0.0)));
            t.push((
                format!("{tb}.rg_lru.recurrent_param"),
                vec![lru],
                Fill::Range(0.5, 2.0),
            ));
            for g in ["input_gate", "recurrent_gate"] {
                t.push((
                    format!("{tb}.rg_lru.{g}_weight"),
                    vec![heads, bw, bw],
                    Fill::FanIn(bw),
                ));
                t.push((format!("{tb}.rg_lru.{g}_bias"), vec![heads, bw], Fill::Const(0.0)));
            }
        }
        let m = format!("{p}.mlp_block");
        for (n, rows, cols) in [("gate_proj", f, c), ("up_proj", f, c), ("down_proj", c, f)] {
            t.push((format!("{m}.{n}.weight"), vec![rows, cols], Fill::FanIn(cols)));
            t.push((format!("{m}.{n}.bias"), vec![rows], Fill::Const(0.0)));
        }
    }
    t.push(("model.final_norm.weight".into(), vec![c], Fill::Const(0.0)));
    Spec { config, tensors: t }
}

fn rwkv_spec(c: usize, layers: usize, f: usize, v: usize) -> Spec {
    let h = c / 64;
    let mut t = vec![("emb.weight".to_string(), vec![v, c], Fill::Range(-0.05, 0.05))];
    t.push(("blocks.0.ln0.weight".into(), vec![c], Fill::Const(1.0)));
    t.push(("blocks.0.ln0.bias".into(), vec![c], Fill::Const(0.0)));
    for i in 0..layers {
        let b = format!("blocks.{i}");
        for ln in ["ln1", "ln2"] {
            t.push((format!("{b}.{ln}.weight"), vec![c], Fill::Const(1.0)));
            t.push((format!("{b}.{ln}.bias"), vec![c], Fill::Const(0.0)));
        }
        for m in ["k", "v", "r", "g"] {
            t.push((
                format!("{b}.att.time_mix_{m}"),
                vec![1, 1, c],
                Fill::Range(0.0, 1.0),
            ));
        }
        t.push((format!("{b}.att.time_decay"), vec![h, 64], Fill::Range(-6.0, 1.0)));
        t.push((format!("{b}.att.time_faaaa"), vec![h, 64], Fill::Range(-1.0, 1.0)));
        for n in ["receptance", "key", "value", "gate", "output"] {
            t.push((format!("{b}.att.{n}.weight"), vec![c, c], Fill::FanIn(c)));
        }
        t.push((format!("{b}.att.ln_x.weight"), vec![c], Fill::Const(1.0)));
        t.push((format!("{b}.att.ln_x.bias"), vec![c], Fill::Const(0.0)));
        for m in ["k", "r"] {
            t.push((
                format!("{b}.ffn.time_mix_{m}"),
                vec![1, 1, c],
                Fill::Range(0.0, 1.0),
            ));
        }
        t.push((format!("{b}.ffn.key.weight"), vec![f, c], Fill::FanIn(c)));
        t.push((format!("{b}.ffn.receptance.weight"), vec![c, c], Fill::FanIn(c)));
        t.push((format!("{b}.ffn.value.weight"), vec![c, f], Fill::FanIn(f)));
    }
    t.push(("ln_out.weight".into(), vec![c], Fill::Const(1.0)));
    t.push(("ln_out.bias".into(), vec![c], Fill::Const(0.0)));
    t.push(("head.weight".into(), vec![v, c], Fill::FanIn(c)));
    Spec {
        config: json!({}),
        tensors: t,
    }
}

fn spec(shape: &str) -> Result<Spec> {
    Ok(match shape {
        "recurrentgemma-2b" => griffin_spec(2560, 26, 10, 7680, 256_000),
        "recurrentgemma-9b" => griffin_spec(4096, 38, 16, 12288, 256_000),
        "rwkv5-1b5" => rwkv_spec(2048, 24, 7168, 65536),
        "rwkv5-3b" => rwkv_spec(2560, 32, 8960, 65536),
        "rwkv5-7b" => rwkv_spec(4096, 32, 14336, 65536),
        "llama-7b" => llama_spec(
            "LlamaForCausalLM",
            LlamaShape(4096, 32, 32, 32, 128, 11008, 32000),
            false,
        ),
        "mistral-7b" => llama_spec(
            "MistralForCausalLM",
            LlamaShape(4096, 32, 32, 8, 128, 14336, 32000),
            false,
        ),
        "solar-10.7b" => llama_spec(
            "LlamaForCausalLM",
            LlamaShape(4096, 48, 32, 8, 128, 14336, 32000),
            false,
        ),
        "gemma-2b-like" => llama_spec(
            "LlamaForCausalLM",
            LlamaShape(2048, 18, 8, 1, 256, 16384, 256_000),
            true,
        ),
        "tinyllama-1.1b" => llama_spec(
            "LlamaForCausalLM",
            LlamaShape(2048, 22, 32, 4, 64, 5632, 32000),
            false,
        ),
        "tiny-llama" => llama_spec("LlamaForCausalLM", LlamaShape(256, 4, 4, 2, 64, 704, 4096), false),
        other => bail!("unknown shape '{other}'; known: {}", SHAPES.join(", ")),
    })
}

fn fill(numel: usize, how: Fill, seed: u64, dtype: DType) -> Tensor {
    let (lo, hi) = match how {
        Fill::FanIn(n) => {
            let a = (3.0 / n as f32).sqrt();
            (-a, a)
        }
        Fill::Const(v) => (v, v),
        Fill::Range(lo, hi) => (lo, hi),
    };
    const CHUNK: usize = 1 << 16;
    let value = |i: usize| -> f32 {
        // SplitMix64 of (seed, index): reproducible and parallel.
        let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
    };
    let bytes: Vec<u8> = match dtype {
        DType::F32 => {
            let mut v = vec![0f32; numel];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, s)| {
                s.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = value(c * CHUNK + j))
            });
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 | DType::F16 => {
            let mut v = vec![0u16; numel];
            v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, s)| {
                s.iter_mut().enumerate().for_each(|(j, x)| {
                    let f = value(c * CHUNK + j);
                    *x = if dtype == DType::BF16 {
                        bf16::from_f32(f).to_bits()
                    } else {
                        f16::from_f32(f).to_bits()
                    };
                })
            });
            bytemuck::cast_slice(&v).to_vec()
        }
    };
    Tensor::from_bytes(&bytes, dtype, vec![numel])
}

/// Builds a random model of `shape` in memory, every matrix stored as `dtype` (norms, biases
/// and the recurrence parameters in f32, as checkpoints usually keep them small).
pub fn synthetic_checkpoint(shape: &str, dtype: DType) -> Result<Checkpoint> {
    let spec = spec(shape)?;
    let mut tensors = BTreeMap::new();
    for (i, (name, dims, how)) in spec.tensors.into_iter().enumerate() {
        let numel: usize = dims.iter().product();
        let dt = if dims.len() >= 2 && dims.iter().filter(|&&d| d > 1).count() >= 2 {
            dtype
        } else {
            DType::F32
        };
        let t = fill(numel, how, 0x5EED ^ (i as u64) << 20, dt).reshape(dims)?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint::from_tensors(spec.config, tensors))
}

/// The machine's own read bandwidth, probed by parallel sums over a 1 GiB buffer laid out
/// like the weights (huge pages when the kernel offers them).
pub struct ReadProbe {
    buffer: Tensor,
}

impl ReadProbe {
    pub fn new() -> ReadProbe {
        let n = (1usize << 30) / 4;
        let values: Vec<f32> = (0..n).map(|i| (i & 1023) as f32).collect();
        ReadProbe {
            buffer: Tensor::from_f32(&values, vec![n]),
        }
    }

    /// One pass over the buffer, split over the current rayon pool's threads: GB/s.
    pub fn pass(&self) -> f64 {
        let buf: &[f32] = bytemuck::cast_slice(self.buffer.raw());
        let t0 = Instant::now();
        let s: f32 = buf.par_chunks(1 << 20).map(crate::kernels::cpu::sum).sum();
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        self.buffer.nbytes() as f64 / dt / 1e9
    }
}

/// Something that measures read bandwidth in GB/s, one pass at a time (host memory for the
/// CPU, device memory for a GPU).
pub trait Probe {
    fn pass(&self) -> f64;
}

impl Probe for ReadProbe {
    fn pass(&self) -> f64 {
        ReadProbe::pass(self)
    }
}

impl Probe for crate::kernels::cuda::DeviceReadProbe {
    fn pass(&self) -> f64 {
        crate::kernels::cuda::DeviceReadProbe::pass(self)
    }
}

impl Default for ReadProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// The median of `reps` probe passes, in GB/s (the median, because on a shared virtual
/// machine a single pass now and then runs far above or below the sustained rate).
pub fn read_bandwidth_gbs(reps: usize) -> f64 {
    let probe = ReadProbe::new();
    let mut v: Vec<f64> = (0..reps.max(1)).map(|_| probe.pass()).collect();
    median(&mut v)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Weights at least this large stream from memory every step, so the bandwidth probe runs
/// right before each decode step (smaller ones would be evicted from the cache by it).
const INTERLEAVE_BYTES: usize = 64 << 20;

/// Bytes of weights one decode step reads: every matrix once (at its quantized size when
/// `quant` is set), plus one row of the embedding table (all of it when it doubles as the
/// output head).
pub fn weight_bytes_per_token(ckpt: &Checkpoint, quant: Option<Quant>) -> usize {
    let embed_names = ["model.embed_tokens.weight", "emb.weight"];
    let tied = !ckpt.has("lm_head.weight") && !ckpt.has("head.weight");
    let mut bytes = 0;
    for name in ckpt.names() {
        let Some((shape, nbytes, block)) = ckpt.stored_size(name) else {
            continue;
        };
        let is_matrix = shape.len() == 2 && shape[0] > 1 && shape[1] > 1 && name.ends_with("weight");
        // `quant` applies to dense matrices; GGUF block tensors stay as stored.
        let stored = match (quant, is_matrix && !block) {
            (Some(q), true) => q.matrix_bytes(shape[0], shape[1]),
            _ => nbytes,
        };
        bytes += if embed_names.contains(&name) {
            // One gathered row, plus the whole table when it is also the head.
            nbytes / shape[0] + if tied { stored } else { 0 }
        } else {
            stored
        };
    }
    bytes
}

/// How far a quantized model's logits are from the unquantized model's on the same tokens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantError {
    /// Largest |Δlogit| over all positions.
    pub max_abs: f32,
    /// Mean |Δlogit|.
    pub mean_abs: f32,
    /// Fraction of positions whose top-1 token is unchanged.
    pub top1_agreement: f32,
}

/// Compares logits `[T, V]` of a quantized model (`got`) with the reference (`want`).
pub fn quant_error(got: &[f32], want: &[f32], vocab: usize) -> QuantError {
    let (mut max_abs, mut sum) = (0f32, 0f64);
    for (a, b) in got.iter().zip(want) {
        let d = (a - b).abs();
        max_abs = max_abs.max(d);
        sum += d as f64;
    }
    let rows = want.len() / vocab;
    let agree = got
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .filter(|(a, b)| crate::sampling::argmax(a) == crate::sampling::argmax(b))
        .count();
    QuantError {
        max_abs,
        mean_abs: (sum / want.len() as f64) as f32,
        top1_agreement: agree as f32 / rows as f32,
    }
}

/// Logits of every position of `tokens` from a fresh state.
pub fn all_logits(model: &dyn Model, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut state = model.new_state();
    let mut out = model.forward(
        &mut [SeqInput {
            tokens,
            state: &mut state,
        }],
        Logits::All,
    )?;
    Ok(out.pop().unwrap_or_default())
}

/// The token ids the benchmark feeds (deterministic, spread over the vocabulary).
pub fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect()
}

/// What a benchmark decodes: `batch` sequences, each prefilled with `prompt` tokens, then
/// `gen` decode steps of the whole batch, each step drawing every sequence's next token as
/// `sampling` says (greedy by default; sequence i's seed is the seed + i, 0 if unset).
#[derive(Clone, Debug)]
pub struct Workload {
    pub prompt: usize,
    pub gen: usize,
    pub batch: usize,
    pub sampling: SamplingParams,
}

impl Workload {
    /// One sampler per sequence. Penalties are refused: they need each sequence's token
    /// history on the host, and the benchmark times the draws a model makes where its
    /// logits are ([`Model::forward_drawn`]), as `generate` and `serve` decode.
    fn samplers(&self) -> Result<Vec<Sampler>> {
        self.sampling.validate()?;
        if self.sampling.has_penalties() {
            bail!("the benchmark draws without penalties: leave out the repetition, presence and frequency penalties");
        }
        let seed = self.sampling.seed.unwrap_or(0);
        Ok((0..self.batch as u64)
            .map(|i| {
                Sampler::new(SamplingParams {
                    seed: Some(seed.wrapping_add(i)),
                    ..self.sampling.clone()
                })
            })
            .collect())
    }

    /// How each step draws, for reports: `greedy`, or the sampling parameters in effect.
    pub fn draw_name(&self) -> String {
        let p = &self.sampling;
        if p.temperature.is_nan() || p.temperature <= 0.0 {
            return "greedy".into();
        }
        let mut parts = vec![format!("temperature {}", p.temperature)];
        if p.top_k > 0 {
            parts.push(format!("top-k {}", p.top_k));
        }
        if p.top_p < 1.0 {
            parts.push(format!("top-p {}", p.top_p));
        }
        if p.min_p > 0.0 {
            parts.push(format!("min-p {}", p.min_p));
        }
        parts.join(", ")
    }
}

/// One benchmark run's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub weight_bytes_per_token: usize,
    pub achieved_read_gbs: f64,
    pub machine_read_gbs: f64,
    /// Median over decode steps of (this step's achieved read ÷ the probe just before it).
    pub bandwidth_ratio: f64,
    /// Probe passes behind `machine_read_gbs`.
    pub bandwidth_probes: usize,
    /// Whether a probe ran before each decode step (else five ran before decoding).
    pub bandwidth_interleaved: bool,
    pub batch: usize,
    pub prompt: usize,
    pub gen: usize,
    /// How each decode step drew its tokens ([`Workload::draw_name`]).
    pub draw: String,
}

/// Prefill the workload's prompt into each of its sequences, then decode its steps; decode
/// speed is the median step.
///
/// The machine's bandwidth drifts on a shared host (this project's machine moves between
/// about 30 and 60 GB/s from minute to minute), so for weights that stream from memory the
/// probe runs right before every decode step and the ratio is the median of the per-step
/// ratios; smaller models get five probe passes up front.
pub fn run(
    model: &dyn Model,
    work: &Workload,
    bytes_per_token: usize,
    probe: &dyn Probe,
) -> Result<BenchReport> {
    let Workload {
        prompt, gen, batch, ..
    } = *work;
    let mut samplers = work.samplers()?;
    let v = model.info().vocab_size as u32;
    let tokens = prompt_tokens(prompt, v as usize);
    let (mut states, prefill_s) = prefilled(model, &tokens, batch)?;
    let prefill_tok_s = (prompt * batch) as f64 / prefill_s;
    let interleave = bytes_per_token >= INTERLEAVE_BYTES;
    let mut machine: Vec<f64> = if interleave {
        Vec::with_capacity(gen)
    } else {
        (0..5).map(|_| probe.pass()).collect()
    };
    let up_front = median(&mut machine);
    let (mut steps, mut ratios) = (Vec::with_capacity(gen), Vec::with_capacity(gen));
    let mut next: Vec<u32> = (0..batch as u32).map(|b| (b * 31 + 5) % v).collect();
    for _ in 0..gen {
        let bw = if interleave {
            let bw = probe.pass();
            machine.push(bw);
            bw
        } else {
            up_front
        };
        let t = Instant::now();
        next = decode_step(model, &mut states, &next, &mut samplers)?;
        let dt = t.elapsed().as_secs_f64();
        steps.push(dt);
        ratios.push(bytes_per_token as f64 / dt / 1e9 / bw);
    }
    let step = median(&mut steps);
    Ok(BenchReport {
        prefill_tok_s,
        decode_tok_s: batch as f64 / step,
        weight_bytes_per_token: bytes_per_token,
        achieved_read_gbs: bytes_per_token as f64 / step / 1e9,
        machine_read_gbs: median(&mut machine),
        bandwidth_ratio: median(&mut ratios),
        bandwidth_probes: machine.len(),
        bandwidth_interleaved: interleave,
        batch,
        prompt,
        gen,
        draw: work.draw_name(),
    })
}

/// `batch` fresh states, each prefilled with `tokens` in its own pass, and the seconds that took.
fn prefilled(model: &dyn Model, tokens: &[u32], batch: usize) -> Result<(Vec<State>, f64)> {
    let mut states: Vec<State> = (0..batch).map(|_| model.new_state()).collect();
    let t0 = Instant::now();
    for state in states.iter_mut() {
        model.forward(&mut [SeqInput { tokens, state }], Logits::Last)?;
    }
    Ok((states, t0.elapsed().as_secs_f64()))
}

/// One batched decode step, drawn where the logits are (as `generate` decodes without
/// penalties): sequence i is fed `next[i]` and draws with `samplers[i]`'s next draw; returns
/// the tokens drawn.
fn decode_step(
    model: &dyn Model,
    states: &mut [State],
    next: &[u32],
    samplers: &mut [Sampler],
) -> Result<Vec<u32>> {
    let mut inputs: Vec<SeqInput<'_>> = states
        .iter_mut()
        .zip(next)
        .map(|(state, t)| SeqInput {
            tokens: std::slice::from_ref(t),
            state,
        })
        .collect();
    let draws: Vec<Draw> = samplers.iter_mut().map(Sampler::next_draw).collect();
    model.forward_drawn(&mut inputs, &draws)
}

/// The largest batch whose states fit in `free` bytes at `tokens` tokens each, after a
/// reserve of 1 GiB and 10% of `free` for scratch (the prefill's, cuBLAS's, graphs). Each
/// sequence counts its state (sized now for `tokens`, as [`curve`] reserves it) plus its
/// logits and activations of a decode step. Returns the batch and the bytes per sequence.
pub fn max_batch(model: &dyn Model, tokens: usize, free: usize) -> Result<(usize, usize)> {
    let mut probe = model.new_state();
    probe.reserve(tokens)?;
    let info = model.info();
    let state = probe.bytes().max(model.state_bytes(tokens));
    let per_seq = state + 8 * info.vocab_size + 256 * info.hidden_size;
    let room = free.saturating_sub((1 << 30) + free / 10);
    let batch = room / per_seq;
    if batch == 0 {
        bail!(
            "not even one sequence of {tokens} tokens fits: it needs {} MB, {} MB are free",
            per_seq >> 20,
            free >> 20
        );
    }
    Ok((batch, per_seq))
}

/// One point of a throughput-against-length curve (`gyre bench --curve`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CurvePoint {
    /// Tokens generated per sequence so far.
    pub generated: usize,
    /// Tokens per second (all sequences) over the steps since the previous point.
    pub window_tok_s: f64,
    /// Tokens per second (all sequences) since decoding began.
    pub total_tok_s: f64,
    /// Bytes the batch's states hold now.
    pub state_bytes: usize,
}

/// The RecurrentGemma paper's Figure 1a experiment: the workload's sequences share one
/// prefilled prompt, then decode its steps together, reporting throughput at `points` evenly
/// spaced lengths. Returns the prefill time (one sequence) in seconds and the curve.
pub fn curve(
    model: &dyn Model,
    work: &Workload,
    points: usize,
    mut on_point: impl FnMut(&CurvePoint),
) -> Result<(f64, Vec<CurvePoint>)> {
    let Workload {
        prompt, gen, batch, ..
    } = *work;
    let mut samplers = work.samplers()?;
    let v = model.info().vocab_size as u32;
    let tokens = prompt_tokens(prompt, v as usize);
    // Every sequence holds the same prompt: prefill it once and share the state (a device
    // state is copied at its first decode step), sized for the whole run up front.
    let mut first = model.new_state();
    first.reserve(prompt + gen)?;
    let t0 = Instant::now();
    let mut next = model.forward_drawn(
        &mut [SeqInput {
            tokens: &tokens,
            state: &mut first,
        }],
        &[samplers[0].next_draw()],
    )?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut states = vec![first; batch];
    next.resize(batch, next[0]);
    let every = (gen / points.max(1)).max(1);
    let (start, mut window) = (Instant::now(), Instant::now());
    let mut out = Vec::with_capacity(points);
    for step in 1..=gen {
        next = decode_step(model, &mut states, &next, &mut samplers)?;
        if step % every == 0 || step == gen {
            let since = out.last().map_or(0, |p: &CurvePoint| p.generated);
            out.push(CurvePoint {
                generated: step,
                window_tok_s: ((step - since) * batch) as f64 / window.elapsed().as_secs_f64(),
                total_tok_s: (step * batch) as f64 / start.elapsed().as_secs_f64(),
                state_bytes: states.iter().map(State::bytes).sum(),
            });
            on_point(&out[out.len() - 1]);
            window = Instant::now();
        }
    }
    Ok((prefill_s, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Box<dyn Model> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama_gqa_f32");
        crate::models::load(&Checkpoint::open(&dir, |_, _| {}).unwrap()).unwrap()
    }

    #[test]
    fn max_batch_divides_the_free_memory_left_after_the_reserve() {
        let m = tiny_llama();
        let tokens = 100;
        let per_seq = m.state_bytes(tokens) + 8 * m.info().vocab_size + 256 * m.info().hidden_size;
        let free = 4usize << 30;
        let (n, got) = max_batch(m.as_ref(), tokens, free).unwrap();
        assert_eq!(got, per_seq);
        assert_eq!(n, (free - (1 << 30) - free / 10) / per_seq);
        // Longer sequences fit fewer; nothing fitting is an error, not a batch of 0.
        assert!(max_batch(m.as_ref(), 10 * tokens, free).unwrap().0 < n);
        let err = max_batch(m.as_ref(), tokens, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("not even one sequence"), "{err}");
    }

    #[test]
    fn curve_reports_evenly_spaced_points_of_the_whole_batch() {
        let m = tiny_llama();
        let mut seen = Vec::new();
        let work = Workload {
            prompt: 8,
            gen: 6,
            batch: 3,
            sampling: SamplingParams::default(),
        };
        let (prefill_s, points) = curve(m.as_ref(), &work, 3, |p| seen.push(p.generated)).unwrap();
        assert!(prefill_s > 0.0);
        assert_eq!(seen, [2, 4, 6]);
        assert_eq!(points.iter().map(|p| p.generated).collect::<Vec<_>>(), [2, 4, 6]);
        // Three sequences of 8 + 6 tokens: the caches hold (at least) 14 positions each at
        // the end, and never shrink.
        assert!(points[2].state_bytes >= 3 * m.state_bytes(14));
        assert!(points[0].state_bytes <= points[2].state_bytes);
        assert!(points.iter().all(|p| p.window_tok_s > 0.0 && p.total_tok_s > 0.0));
    }

    fn sampled(batch: usize, seed: u64) -> Workload {
        Workload {
            prompt: 5,
            gen: 4,
            batch,
            sampling: SamplingParams {
                temperature: 1.3,
                top_k: 50,
                top_p: 0.9,
                seed: Some(seed),
                ..SamplingParams::default()
            },
        }
    }

    #[test]
    fn sampled_decode_steps_draw_what_each_sequences_sampler_draws_on_the_host() {
        let m = tiny_llama();
        let work = sampled(3, 7);
        let mut samplers = work.samplers().unwrap();
        let mut host = work.samplers().unwrap();
        let tokens = prompt_tokens(work.prompt, m.info().vocab_size);
        let (mut states, _) = prefilled(m.as_ref(), &tokens, work.batch).unwrap();
        let mut next = vec![1u32, 2, 3];
        let mut drawn = std::collections::BTreeSet::new();
        for _ in 0..work.gen {
            // The host's reference: each sequence's logits from a copy of its state, drawn by
            // its own sampler as `generate` samples.
            let want: Vec<u32> = states
                .iter()
                .zip(&next)
                .zip(host.iter_mut())
                .map(|((state, &t), sampler)| {
                    let mut state = state.clone();
                    let logits = m
                        .forward(
                            &mut [SeqInput {
                                tokens: &[t],
                                state: &mut state,
                            }],
                            Logits::Last,
                        )
                        .unwrap();
                    sampler.sample(&logits[0], &[], 0)
                })
                .collect();
            next = decode_step(m.as_ref(), &mut states, &next, &mut samplers).unwrap();
            assert_eq!(next, want);
            drawn.extend(next.iter().copied());
        }
        // Seeds differ per sequence and the draws are not the argmax every time.
        assert!(drawn.len() > work.gen, "{drawn:?}");
    }

    #[test]
    fn workloads_name_their_draws_and_refuse_penalties() {
        let work = sampled(2, 0);
        assert_eq!(work.draw_name(), "temperature 1.3, top-k 50, top-p 0.9");
        assert_eq!(work.samplers().unwrap().len(), 2);
        let greedy = Workload {
            sampling: SamplingParams::default(),
            ..work.clone()
        };
        assert_eq!(greedy.draw_name(), "greedy");
        let penalised = Workload {
            sampling: SamplingParams {
                repetition_penalty: 1.2,
                ..work.sampling.clone()
            },
            ..work
        };
        let err = penalised.samplers().unwrap_err().to_string();
        assert!(err.contains("penalties"), "{err}");
    }

    #[test]
    fn a_sampled_run_reports_its_draws() {
        let m = tiny_llama();
        struct Fixed;
        impl Probe for Fixed {
            fn pass(&self) -> f64 {
                50.0
            }
        }
        let r = run(m.as_ref(), &sampled(2, 3), 1000, &Fixed).unwrap();
        assert_eq!(r.draw, "temperature 1.3, top-k 50, top-p 0.9");
        assert_eq!((r.batch, r.prompt, r.gen), (2, 5, 4));
        assert!(r.decode_tok_s > 0.0 && r.prefill_tok_s > 0.0);
    }
}
