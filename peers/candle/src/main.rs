//! gyre vs candle, side by side, in one process, on the very same weights.
//!
//! usage: gyre-vs-candle --shape SHAPE [--dtype bf16|f16|f32] [--candle-dtype bf16|f16|f32]
//!                       [--prompt 16] [--gen 16] [--json]
//!
//! One synthetic checkpoint is built with `gyre::bench::synthetic_checkpoint`; candle gets
//! candle tensors made from the same raw bytes (renamed where candle's model asks for other
//! names), so both engines compute the same function. Each engine then runs the same protocol:
//! a warm-up prefill of the prompt on a fresh state (its last-position logits are compared
//! across the engines), a timed prefill on a fresh state, then `gen` single-token decode steps
//! (greedy); decode speed is the median step. Candle runs first and is dropped before gyre
//! loads, so only one engine's weights and the checkpoint are alive at a time.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType as CDType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, recurrent_gemma, rwkv_v5};
use gyre::loader::Checkpoint;
use gyre::models::{Logits, Model, SeqInput};
use gyre::tensor::{DType, Tensor};
use serde_json::{json, Value};

/// Shapes this tool knows: gyre's own synthetic shapes of the three families candle has, plus
/// `tinyllama-1.1b` (the shape of the published llama.cpp/candle peer figures), built here
/// with gyre's `Checkpoint::from_tensors`.
const SHAPES: &[&str] = &[
    "recurrentgemma-2b",
    "recurrentgemma-9b",
    "rwkv5-1b5",
    "rwkv5-3b",
    "rwkv5-7b",
    "tiny-llama",
    "tinyllama-1.1b",
    "gemma-2b-like",
    "llama-7b",
    "solar-10.7b",
];

struct Args {
    shape: String,
    dtype: DType,
    candle_dtype: DType,
    prompt: usize,
    gen: usize,
    json: bool,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        o => bail!("unknown dtype '{o}' (bf16, f16, f32)"),
    })
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        shape: String::new(),
        dtype: DType::BF16,
        candle_dtype: DType::BF16,
        prompt: 16,
        gen: 16,
        json: false,
    };
    let mut candle_dtype = None;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let val = |i: usize| -> Result<&String> { argv.get(i + 1).with_context(|| format!("{} needs a value", argv[i])) };
    while i < argv.len() {
        match argv[i].as_str() {
            "--shape" => a.shape = val(i)?.clone(),
            "--dtype" => a.dtype = parse_dtype(val(i)?)?,
            "--candle-dtype" => candle_dtype = Some(parse_dtype(val(i)?)?),
            "--prompt" => a.prompt = val(i)?.parse()?,
            "--gen" => a.gen = val(i)?.parse()?,
            "--json" => {
                a.json = true;
                i += 1;
                continue;
            }
            "-h" | "--help" => {
                println!(
                    "usage: gyre-vs-candle --shape SHAPE [--dtype bf16|f16|f32] [--candle-dtype bf16|f16|f32] \
                     [--prompt 16] [--gen 16] [--json]\nshapes: {}",
                    SHAPES.join(", ")
                );
                std::process::exit(0);
            }
            o => bail!("unknown argument '{o}' (see --help)"),
        }
        i += 2;
    }
    if a.shape.is_empty() {
        bail!("--shape is required; one of {}", SHAPES.join(", "));
    }
    if a.prompt == 0 {
        bail!("--prompt must be at least 1");
    }
    a.candle_dtype = candle_dtype.unwrap_or(a.dtype);
    Ok(a)
}

// ---------------------------------------------------------------- checkpoint

/// A Llama of TinyLlama-1.1B's shape (not among gyre's synthetic shapes), built with gyre's
/// public tensor type: uniform fan-in weights, unit norms.
fn tinyllama_checkpoint(dtype: DType) -> Result<Checkpoint> {
    let (c, layers, heads, kv, hd, f, v) = (2048usize, 22usize, 32usize, 4usize, 64usize, 5632usize, 32000usize);
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "intermediate_size": f, "vocab_size": v, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": false,
    });
    let mut seed = 0x7111_1a3a_u64;
    let mut mat = |rows: usize, cols: usize, bound: f32| -> Tensor {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut s = seed;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| {
                // xorshift64*: plenty for random benchmark weights
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect();
        match dtype {
            DType::F32 => Tensor::from_f32(&vals, vec![rows, cols]),
            DType::BF16 => Tensor::from_f32_as_bf16(&vals, vec![rows, cols]),
            DType::F16 => Tensor::from_f32_as_f16(&vals, vec![rows, cols]),
        }
    };
    let fan = |n: usize| (3.0 / n as f32).sqrt();
    let ones = |n: usize| Tensor::from_f32(&vec![1.0; n], vec![n]);
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_string(), mat(v, c, 0.05));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), ones(c));
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(c));
        t.insert(format!("{p}.self_attn.q_proj.weight"), mat(heads * hd, c, fan(c)));
        t.insert(format!("{p}.self_attn.k_proj.weight"), mat(kv * hd, c, fan(c)));
        t.insert(format!("{p}.self_attn.v_proj.weight"), mat(kv * hd, c, fan(c)));
        t.insert(format!("{p}.self_attn.o_proj.weight"), mat(c, heads * hd, fan(heads * hd)));
        t.insert(format!("{p}.mlp.gate_proj.weight"), mat(f, c, fan(c)));
        t.insert(format!("{p}.mlp.up_proj.weight"), mat(f, c, fan(c)));
        t.insert(format!("{p}.mlp.down_proj.weight"), mat(c, f, fan(f)));
    }
    t.insert("model.norm.weight".into(), ones(c));
    t.insert("lm_head.weight".into(), mat(v, c, fan(c)));
    Ok(Checkpoint::from_tensors(config, t))
}

fn build_checkpoint(shape: &str, dtype: DType) -> Result<Checkpoint> {
    if !SHAPES.contains(&shape) {
        bail!("shape '{shape}' is not supported here; one of {}", SHAPES.join(", "));
    }
    if shape == "tinyllama-1.1b" {
        tinyllama_checkpoint(dtype)
    } else {
        gyre::bench::synthetic_checkpoint(shape, dtype)
    }
}

// ---------------------------------------------------------------- candle side

fn cdtype(d: DType) -> CDType {
    match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
    }
}

/// A candle tensor holding a copy of `t`'s bytes, converted to `want`.
fn to_candle(t: &Tensor, want: CDType) -> Result<CTensor> {
    let ct = CTensor::from_raw_buffer(t.raw(), cdtype(t.dtype()), t.shape(), &Device::Cpu)?;
    Ok(if ct.dtype() == want { ct } else { ct.to_dtype(want)? })
}

/// ChatRWKV name → the name candle's `rwkv_v5` asks for (Hugging Face RWKV5 layout).
fn rwkv_candle_name(n: &str) -> Option<String> {
    Some(match n {
        "emb.weight" => "rwkv.embeddings.weight".into(),
        "head.weight" => "head.weight".into(),
        "ln_out.weight" => "rwkv.ln_out.weight".into(),
        "ln_out.bias" => "rwkv.ln_out.bias".into(),
        _ => {
            let rest = n.strip_prefix("blocks.")?;
            let (layer, rest) = rest.split_once('.')?;
            let mapped = match rest {
                "ln0.weight" => "pre_ln.weight".to_string(),
                "ln0.bias" => "pre_ln.bias".to_string(),
                r if r.starts_with("ln1.") || r.starts_with("ln2.") => r.to_string(),
                r => {
                    let (part, leaf) = r.split_once('.')?;
                    let part = match part {
                        "att" => "attention",
                        "ffn" => "feed_forward",
                        _ => return None,
                    };
                    let leaf = match leaf {
                        "time_mix_k" => "time_mix_key",
                        "time_mix_v" => "time_mix_value",
                        "time_mix_r" => "time_mix_receptance",
                        "time_mix_g" => "time_mix_gate",
                        l => l,
                    };
                    format!("{part}.{leaf}")
                }
            };
            format!("rwkv.blocks.{layer}.{mapped}")
        }
    })
}

fn cfg_usize(cfg: &Value, k: &str) -> Result<usize> {
    cfg.get(k).and_then(Value::as_u64).map(|v| v as usize).with_context(|| format!("config has no {k}"))
}

enum CandleModel {
    RGemma { pristine: recurrent_gemma::Model, live: recurrent_gemma::Model, pos: usize },
    Rwkv { model: rwkv_v5::Model, cfg: rwkv_v5::Config, state: rwkv_v5::State, dtype: CDType },
    Llama { model: llama::Llama, cfg: llama::Config, cache: llama::Cache, dtype: CDType, pos: usize },
}

// candle's rwkv_v5::State::new always allocates f32 state; a bf16/f16 model needs it cast.
fn rwkv_state(cfg: &rwkv_v5::Config, dtype: CDType) -> Result<rwkv_v5::State> {
    let mut st = rwkv_v5::State::new(1, cfg, &Device::Cpu)?;
    for l in st.per_layer.iter_mut() {
        l.extract_key_value = l.extract_key_value.to_dtype(dtype)?;
        l.linear_attention = l.linear_attention.to_dtype(dtype)?;
        l.feed_forward = l.feed_forward.to_dtype(dtype)?;
    }
    Ok(st)
}

fn logits_vec(t: &CTensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(CDType::F32)?.to_vec1::<f32>()?)
}

impl CandleModel {
    fn build(ckpt: &Checkpoint, family: Family, dtype: CDType) -> Result<CandleModel> {
        // Tensors named as candle asks, each a copy of gyre's bytes converted to `dtype` one
        // at a time (so only one f32 widening is alive at once).
        let mut map: HashMap<String, CTensor> = HashMap::new();
        for name in ckpt.names() {
            let t = ckpt.get(name)?;
            let cname = match family {
                Family::Rwkv => rwkv_candle_name(name).with_context(|| format!("no candle name for {name}"))?,
                _ => name.to_string(),
            };
            map.insert(cname, to_candle(t, dtype)?);
        }
        let vb = VarBuilder::from_tensors(map, dtype, &Device::Cpu);
        Ok(match family {
            Family::RGemma => {
                let c = ckpt.config()?;
                use recurrent_gemma::TemporalBlockType::{Attention as A, Recurrent as R};
                let hidden = cfg_usize(c, "hidden_size")?;
                let heads = cfg_usize(c, "num_attention_heads")?;
                let cfg = recurrent_gemma::Config {
                    num_hidden_layers: cfg_usize(c, "num_hidden_layers")?,
                    vocab_size: cfg_usize(c, "vocab_size")?,
                    hidden_size: hidden,
                    // candle's MLP is intermediate_size / 2 wide, as in HF's config
                    intermediate_size: cfg_usize(c, "intermediate_size")?,
                    num_attention_heads: heads,
                    num_key_value_heads: cfg_usize(c, "num_key_value_heads")?,
                    head_dim: hidden / heads,
                    lru_width: Some(cfg_usize(c, "lru_width")?),
                    attention_window_size: cfg_usize(c, "attention_window_size")?,
                    conv1d_width: cfg_usize(c, "conv1d_width")?,
                    logits_soft_cap: c["logits_soft_cap"].as_f64().unwrap_or(30.0),
                    hidden_activation: candle_nn::Activation::GeluPytorchTanh,
                    partial_rotary_factor: 0.5,
                    rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
                    rope_theta: 10000.0,
                    block_types: vec![R, R, A],
                    attention_bias: false,
                    max_seq_len: 8192,
                };
                let m = recurrent_gemma::Model::new(&cfg, vb.pp("model"))?;
                CandleModel::RGemma { pristine: m.clone(), live: m, pos: 0 }
            }
            Family::Rwkv => {
                let emb = ckpt.get("emb.weight")?.shape().to_vec();
                let layers = ckpt.names().filter(|n| n.ends_with(".ln1.weight")).count();
                let f = ckpt.get("blocks.0.ffn.key.weight")?.shape()[0];
                let cfg = rwkv_v5::Config {
                    vocab_size: emb[0],
                    hidden_size: emb[1],
                    num_hidden_layers: layers,
                    attention_hidden_size: emb[1],
                    // candle's State takes hidden / num_attention_heads as the head count
                    // (its comment: "a weird convention ... from modeling_rwkv5.py"), so this
                    // is the head size.
                    num_attention_heads: 64,
                    head_size: 64,
                    intermediate_size: Some(f),
                    layer_norm_epsilon: 1e-5,
                    rescale_every: 6,
                };
                let model = rwkv_v5::Model::new(&cfg, vb)?;
                let state = rwkv_state(&cfg, dtype)?;
                CandleModel::Rwkv { model, cfg, state, dtype }
            }
            Family::Llama => {
                let c = ckpt.config()?;
                let hidden = cfg_usize(c, "hidden_size")?;
                let heads = cfg_usize(c, "num_attention_heads")?;
                if let Some(hd) = c.get("head_dim").and_then(Value::as_u64) {
                    if hd as usize != hidden / heads {
                        bail!("candle's llama needs head_dim = hidden/heads; this shape has {hd}");
                    }
                }
                let cfg = llama::Config {
                    hidden_size: hidden,
                    intermediate_size: cfg_usize(c, "intermediate_size")?,
                    vocab_size: cfg_usize(c, "vocab_size")?,
                    num_hidden_layers: cfg_usize(c, "num_hidden_layers")?,
                    num_attention_heads: heads,
                    num_key_value_heads: cfg_usize(c, "num_key_value_heads")?,
                    use_flash_attn: false,
                    rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5),
                    rope_theta: c["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
                    bos_token_id: None,
                    eos_token_id: None,
                    rope_scaling: None,
                    // the rope tables are precomputed to this length; the bench stays far below
                    max_position_embeddings: 4096,
                    tie_word_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
                };
                let model = llama::Llama::load(vb, &cfg)?;
                let cache = llama::Cache::new(true, dtype, &cfg, &Device::Cpu)?;
                CandleModel::Llama { model, cfg, cache, dtype, pos: 0 }
            }
        })
    }
}

// ---------------------------------------------------------------- the common protocol

#[derive(Clone, Copy, PartialEq)]
enum Family {
    RGemma,
    Rwkv,
    Llama,
}

trait Engine {
    /// Forget the sequence: a fresh state.
    fn reset(&mut self) -> Result<()>;
    /// Feed tokens; last position's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
}

impl Engine for CandleModel {
    fn reset(&mut self) -> Result<()> {
        match self {
            // a clone taken before any forward has empty caches
            CandleModel::RGemma { pristine, live, pos } => {
                *live = pristine.clone();
                *pos = 0;
            }
            CandleModel::Rwkv { cfg, state, dtype, .. } => *state = rwkv_state(cfg, *dtype)?,
            CandleModel::Llama { cfg, cache, dtype, pos, .. } => {
                *cache = llama::Cache::new(true, *dtype, cfg, &Device::Cpu)?;
                *pos = 0;
            }
        }
        Ok(())
    }
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let dev = Device::Cpu;
        let out = match self {
            CandleModel::RGemma { live, pos, .. } => {
                let x = CTensor::new(tokens, &dev)?.unsqueeze(0)?;
                let l = live.forward(&x, *pos)?;
                *pos += tokens.len();
                l
            }
            // candle's rwkv_v5 handles one token per call (its token shift keeps one previous
            // token for the whole chunk), so the prompt goes in token by token, as
            // candle-examples/rwkv does.
            CandleModel::Rwkv { model, state, .. } => {
                let mut out = None;
                for &t in tokens {
                    out = Some(model.forward(&CTensor::new(&[[t]], &dev)?, state)?);
                }
                out.context("no tokens")?
            }
            CandleModel::Llama { model, cache, pos, .. } => {
                let x = CTensor::new(tokens, &dev)?.unsqueeze(0)?;
                let l = model.forward(&x, *pos, cache)?;
                *pos += tokens.len();
                l
            }
        };
        let v = logits_vec(&out)?;
        // RWKV returns [1, 1, vocab]; the others [1, vocab] or [1, 1, vocab]: all one row.
        Ok(v)
    }
}

struct GyreEngine {
    model: Box<dyn Model>,
    state: gyre::state::State,
}

impl Engine for GyreEngine {
    fn reset(&mut self) -> Result<()> {
        self.state = self.model.new_state();
        Ok(())
    }
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut out = self.model.forward(
            &mut [SeqInput {
                tokens,
                state: &mut self.state,
            }],
            Logits::Last,
        )?;
        Ok(out.pop().unwrap_or_default())
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

struct Timing {
    first_logits: Vec<f32>,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_ms_median: f64,
    decode_ms_min: f64,
    warmup_s: f64,
}

fn time_engine(e: &mut dyn Engine, prompt: &[u32], gen: usize) -> Result<Timing> {
    e.reset()?;
    let t = Instant::now();
    let first_logits = e.feed(prompt)?;
    let warmup_s = t.elapsed().as_secs_f64();
    e.reset()?;
    let t = Instant::now();
    let l = e.feed(prompt)?;
    let mut next = argmax(&l);
    let prefill_s = t.elapsed().as_secs_f64();
    let mut steps = Vec::with_capacity(gen);
    for _ in 0..gen {
        let t = Instant::now();
        let l = e.feed(&[next])?;
        next = argmax(&l);
        steps.push(t.elapsed().as_secs_f64());
    }
    steps.sort_by(f64::total_cmp);
    let med = steps.get(steps.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(Timing {
        first_logits,
        prefill_tok_s: prompt.len() as f64 / prefill_s,
        decode_tok_s: 1.0 / med,
        decode_ms_median: med * 1e3,
        decode_ms_min: steps.first().copied().unwrap_or(f64::NAN) * 1e3,
        warmup_s,
    })
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Bytes candle reads per decoded token: the same tensors as gyre's count, at candle's dtype.
fn candle_bytes_per_token(ckpt: &Checkpoint, gyre_bytes: usize, gyre_dtype: DType, candle_dtype: DType) -> usize {
    if gyre_dtype == candle_dtype {
        return gyre_bytes;
    }
    // Matrices are stored at the checkpoint dtype, vectors in f32 in both engines' terms:
    // rescale the matrix part only.
    let vec_bytes: usize = ckpt
        .names()
        .filter_map(|n| ckpt.get(n).ok())
        .filter(|t| t.dtype() == DType::F32 && gyre_dtype != DType::F32)
        .map(|t| t.nbytes())
        .sum();
    let mat = gyre_bytes.saturating_sub(vec_bytes);
    mat / gyre_dtype.size() * candle_dtype.size() + vec_bytes
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let family = if args.shape.starts_with("recurrentgemma") {
        Family::RGemma
    } else if args.shape.starts_with("rwkv5") {
        Family::Rwkv
    } else {
        Family::Llama
    };
    let threads = rayon::current_num_threads();
    eprintln!("measuring read bandwidth ({threads} threads)...");
    let bw = gyre::bench::read_bandwidth_gbs(5);
    eprintln!("building synthetic {} ({})...", args.shape, args.dtype.name());
    let t = Instant::now();
    let ckpt = build_checkpoint(&args.shape, args.dtype)?;
    let vocab = ckpt
        .get(if family == Family::Rwkv { "emb.weight" } else { "model.embed_tokens.weight" })?
        .shape()[0];
    let gyre_bytes = gyre::bench::weight_bytes_per_token(&ckpt, None);
    let candle_bytes = candle_bytes_per_token(&ckpt, gyre_bytes, args.dtype, args.candle_dtype);
    eprintln!("  built in {:.1}s", t.elapsed().as_secs_f64());
    let prompt = gyre::bench::prompt_tokens(args.prompt, vocab);

    // candle first, then dropped: only one engine's weights live beside the checkpoint.
    eprintln!("candle: loading ({})...", args.candle_dtype.name());
    let t = Instant::now();
    let mut cm = CandleModel::build(&ckpt, family, cdtype(args.candle_dtype))?;
    let candle_load_s = t.elapsed().as_secs_f64();
    eprintln!("candle: running (load {candle_load_s:.1}s)...");
    let ct = time_engine(&mut cm, &prompt, args.gen)?;
    drop(cm);
    let rss_after_candle = peak_rss_mb();

    eprintln!("gyre: loading...");
    let t = Instant::now();
    let gm = gyre::models::load(&ckpt)?;
    let gyre_load_s = t.elapsed().as_secs_f64();
    let state = gm.new_state();
    let mut ge = GyreEngine { model: gm, state };
    eprintln!("gyre: running (load {gyre_load_s:.1}s)...");
    let gt = time_engine(&mut ge, &prompt, args.gen)?;

    // apples to apples: the same weights must give (nearly) the same first logits
    let n = gt.first_logits.len().min(ct.first_logits.len());
    let max_delta = gt.first_logits[..n]
        .iter()
        .zip(&ct.first_logits[..n])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let max_abs = gt.first_logits.iter().map(|x| x.abs()).fold(0f32, f32::max);
    let same_top1 = argmax(&gt.first_logits) == argmax(&ct.first_logits);
    let len_ok = gt.first_logits.len() == ct.first_logits.len();

    let gyre_of_bw = gyre_bytes as f64 * gt.decode_tok_s / 1e9 / bw;
    let candle_of_bw = candle_bytes as f64 * ct.decode_tok_s / 1e9 / bw;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    println!(
        "{} | gyre {} vs candle 0.11.1 {} | prompt {} gen {} | {} threads | read bandwidth {:.1} GB/s | loadavg {}",
        args.shape,
        args.dtype.name(),
        args.candle_dtype.name(),
        args.prompt,
        args.gen,
        threads,
        bw,
        load
    );
    println!(
        "first-prefill logits: max|Δ| = {max_delta:.3e} (max|logit| {max_abs:.3}), same top-1: {same_top1}{}",
        if len_ok { "" } else { "  (LOGIT LENGTHS DIFFER)" }
    );
    println!("{:<22} {:>12} {:>12} {:>10}", "", "gyre", "candle", "gyre/candle");
    let row = |name: &str, g: f64, c: f64| println!("{name:<22} {g:>12.3} {c:>12.3} {:>10.2}x", g / c);
    row("prefill tok/s", gt.prefill_tok_s, ct.prefill_tok_s);
    row("decode tok/s (median)", gt.decode_tok_s, ct.decode_tok_s);
    println!(
        "{:<22} {:>11.1}% {:>11.1}%",
        "of read bandwidth",
        gyre_of_bw * 100.0,
        candle_of_bw * 100.0
    );
    println!(
        "{:<22} {:>12.3} {:>12.3}",
        "weight GB per token",
        gyre_bytes as f64 / 1e9,
        candle_bytes as f64 / 1e9
    );
    println!(
        "{:<22} {:>12.1} {:>12.1}   (warm-up prefill s: gyre {:.2}, candle {:.2}; peak RSS {:.0} MB, after candle {:.0} MB)",
        "load s",
        gyre_load_s,
        candle_load_s,
        gt.warmup_s,
        ct.warmup_s,
        peak_rss_mb(),
        rss_after_candle
    );
    if args.json {
        let eng = |t: &Timing, bytes: usize, of_bw: f64, dtype: DType, load_s: f64| {
            json!({
                "dtype": dtype.name(), "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s,
                "decode_ms_median": t.decode_ms_median, "decode_ms_min": t.decode_ms_min,
                "weight_bytes_per_token": bytes, "bandwidth_ratio": of_bw, "load_s": load_s,
            })
        };
        let j = json!({
            "shape": args.shape, "prompt": args.prompt, "gen": args.gen, "threads": threads,
            "machine_read_gbs": bw, "loadavg": load,
            "gyre": eng(&gt, gyre_bytes, gyre_of_bw, args.dtype, gyre_load_s),
            "candle": eng(&ct, candle_bytes, candle_of_bw, args.candle_dtype, candle_load_s),
            "candle_version": "0.11.1",
            "ratio": {"prefill": gt.prefill_tok_s / ct.prefill_tok_s, "decode": gt.decode_tok_s / ct.decode_tok_s},
            "logits_max_abs_delta": max_delta, "logits_max_abs": max_abs, "same_top1": same_top1,
            "peak_rss_mb": peak_rss_mb(),
        });
        println!("{j}");
    }
    Ok(())
}
