//! `gyre bench`: prefill and decode speed, with the machine's read bandwidth measured in the
//! same run and the fraction of it that decoding reaches.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use gyre::bench;
use gyre::loader::Checkpoint;
use gyre::models;
use gyre::sampling::SamplingParams;
use gyre::tensor::DType;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchDtype {
    Bf16,
    F16,
    F32,
}

/// Arguments of `gyre bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A model shape built in memory with random weights (see --help for the list).
    #[arg(long, conflicts_with = "model", required_unless_present = "model",
          help = format!("random weights at the real shape of: {}", bench::SHAPES.join(", ")))]
    synthetic: Option<String>,
    /// Benchmark a real checkpoint instead.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Storage dtype of the synthetic model's matrices.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: BenchDtype,
    /// Quantize the weight matrices at load: q8 or q4 (gyre's formats), or a GGUF block type
    /// (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k; round-to-nearest, to time
    /// the formats at real shapes). The logit error against the unquantized model on the
    /// benchmark prompt is printed.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<BenchQuant>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Prompt length prefilled into each sequence.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// Decode steps (the median step is reported).
    #[arg(long, default_value_t = 16)]
    gen: usize,
    /// Sequences decoded together in one batched forward per step, or `max`: the largest
    /// batch whose states fit in the device's free memory at prompt + gen tokens.
    #[arg(long, default_value = "1", value_parser = parse_batch)]
    batch: BatchSize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: crate::Device,
    /// Throughput against generated length instead (the RecurrentGemma paper's Figure 1a):
    /// decode --gen steps and report this many evenly spaced points.
    #[arg(long)]
    curve: Option<usize>,
    /// Draw each decoded token at this temperature instead of greedily (0), so the timing
    /// includes sampling as `generate` samples (on the GPU with --device cuda).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// With --temperature: keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// With --temperature: nucleus filter (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// With --temperature: min-p filter (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of the first sequence's draws (sequence i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `gyre bench --quant`: one of gyre's load-time formats or a GGUF block type.
#[derive(Clone, Copy, Debug)]
enum BenchQuant {
    Gyre(gyre::tensor::Quant),
    Ggml(gyre::tensor::GgmlType),
}

impl BenchQuant {
    fn name(self) -> String {
        match self {
            BenchQuant::Gyre(q) => q.name().to_string(),
            BenchQuant::Ggml(t) => t.name().to_lowercase(),
        }
    }
}

fn parse_quant(s: &str) -> Result<BenchQuant, String> {
    match s.to_ascii_lowercase().as_str() {
        "q8" => Ok(BenchQuant::Gyre(gyre::tensor::Quant::Q8)),
        "q4" => Ok(BenchQuant::Gyre(gyre::tensor::Quant::Q4)),
        other => match gyre::tensor::GgmlType::from_name(other) {
            Some(t) if t.dense().is_none() => Ok(BenchQuant::Ggml(t)),
            _ => Err(format!(
                "unknown quantization {s:?}: use q8, q4 or a GGUF block type (q4_0, q4_1, q5_0, q5_1, \
                 q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)"
            )),
        },
    }
}

#[derive(Clone, Copy, Debug)]
enum BatchSize {
    Count(usize),
    Max,
}

fn parse_batch(s: &str) -> Result<BatchSize, String> {
    match s {
        "max" => Ok(BatchSize::Max),
        n => n
            .parse()
            .map(BatchSize::Count)
            .map_err(|_| format!("expected a number of sequences or `max`, got {n:?}")),
    }
}

/// Runs `gyre bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    if matches!(a.batch, BatchSize::Count(0)) || a.prompt == 0 || a.gen == 0 {
        bail!("--batch, --prompt and --gen must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: Some(a.seed),
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let dtype = match a.dtype {
        BenchDtype::Bf16 => DType::BF16,
        BenchDtype::F16 => DType::F16,
        BenchDtype::F32 => DType::F32,
    };
    let (ckpt, what) = match (&a.synthetic, &a.model) {
        (Some(shape), _) => {
            eprintln!("building a random {shape} ({dtype}) in memory…");
            (
                bench::synthetic_checkpoint(shape, dtype)?,
                format!("{shape} {dtype} (synthetic)"),
            )
        }
        (None, Some(path)) => (Checkpoint::open(path, |_, _| {})?, path.display().to_string()),
        (None, None) => bail!("give --synthetic SHAPE or --model PATH"),
    };
    let quant = a.quant;
    let mut quality = None;
    let device = a.device.target();
    let on_device = models::LoadOptions { quant: None, device };
    // GGUF types become block tensors of the checkpoint; gyre's own formats a load option.
    let quantized = match quant {
        Some(BenchQuant::Ggml(t)) => {
            eprintln!("quantizing the matrices to {t} (round-to-nearest)…");
            Some(ckpt.with_matrices_as(t)?)
        }
        _ => None,
    };
    let runtime = match quant {
        Some(BenchQuant::Gyre(q)) => Some(q),
        _ => None,
    };
    let model = match quant {
        None => models::load_with(&ckpt, on_device)?,
        Some(q) => {
            eprintln!(
                "measuring the {} logit error against the unquantized model…",
                q.name()
            );
            let tokens = bench::prompt_tokens(a.prompt, models::load(&ckpt)?.info().vocab_size);
            let want = bench::all_logits(models::load(&ckpt)?.as_ref(), &tokens)?;
            let model = models::load_with(
                quantized.as_ref().unwrap_or(&ckpt),
                models::LoadOptions {
                    quant: runtime,
                    device,
                },
            )?;
            let got = bench::all_logits(model.as_ref(), &tokens)?;
            quality = Some(bench::quant_error(&got, &want, model.info().vocab_size));
            model
        }
    };
    let bytes = bench::weight_bytes_per_token(quantized.as_ref().unwrap_or(&ckpt), runtime);
    let batch = match a.batch {
        BatchSize::Count(n) => n,
        BatchSize::Max => {
            let free = match device {
                models::Device::Cpu => gyre::kernels::cpu::host_memory().0,
                models::Device::Cuda(n) => gyre::kernels::cuda::Gpu::open(n)?.memory()?.0,
            };
            let tokens = a.prompt + a.gen;
            let (n, per_seq) = bench::max_batch(model.as_ref(), tokens, free)?;
            println!(
                "batch:            max = {n} ({:.1} MB per sequence at {tokens} tokens, {:.2} GB free)",
                per_seq as f64 / 1e6,
                free as f64 / 1e9
            );
            n
        }
    };
    let work = bench::Workload {
        prompt: a.prompt,
        gen: a.gen,
        batch,
        sampling,
    };
    if let Some(points) = a.curve {
        eprintln!(
            "running: prompt {} × batch {}, then {} decode steps, {points} points…",
            a.prompt, batch, a.gen
        );
        println!(
            "model:            {what}, batch {batch}, prompt {}, {} decoding",
            a.prompt,
            work.draw_name()
        );
        println!("weights:          {:.2} GB", bytes as f64 / 1e9);
        println!(
            "{:>10} {:>14} {:>14} {:>12}",
            "generated", "window tok/s", "total tok/s", "state GB"
        );
        let print = |p: &bench::CurvePoint| {
            println!(
                "{:>10} {:>14.1} {:>14.1} {:>12.3}",
                p.generated,
                p.window_tok_s,
                p.total_tok_s,
                p.state_bytes as f64 / 1e9
            );
        };
        let (prefill_s, curve) = bench::curve(model.as_ref(), &work, points, print)?;
        println!("prefill:          {prefill_s:.2} s (one sequence; the batch shares its state)");
        if a.json {
            let v = serde_json::json!({
                "model": what, "batch": batch, "prompt": a.prompt, "weight_bytes": bytes,
                "draw": work.draw_name(),
                "prefill_s": prefill_s, "curve": curve,
            });
            println!("{v}");
        }
        return Ok(());
    }
    let probe: Box<dyn bench::Probe> = match device {
        models::Device::Cpu => Box::new(bench::ReadProbe::new()),
        models::Device::Cuda(n) => Box::new(gyre::kernels::cuda::DeviceReadProbe::new(
            &gyre::kernels::cuda::Gpu::open(n)?,
        )?),
    };
    eprintln!(
        "running: prompt {} × batch {}, then {} decode steps…",
        a.prompt, batch, a.gen
    );
    let r = bench::run(model.as_ref(), &work, bytes, probe.as_ref())?;
    if let models::Device::Cuda(n) = device {
        let gpu = gyre::kernels::cuda::Gpu::open(n)?;
        if gpu.profiling() {
            let rows = gpu.profile_report()?;
            let total: f64 = rows.iter().map(|r| r.1).sum();
            eprintln!("device time per kernel (GYRE_CUDA_PROFILE=1, whole run):");
            for (name, ms, n) in rows {
                eprintln!(
                    "  {name:<18} {ms:>9.2} ms {:>5.1}%  {n:>7} launches  {:>7.2} µs each",
                    100.0 * ms / total,
                    1e3 * ms / n as f64
                );
            }
        }
    }
    let place = match device {
        models::Device::Cpu => format!("{} threads", rayon::current_num_threads()),
        models::Device::Cuda(n) => gyre::kernels::cuda::Gpu::open(n)?.name().to_string(),
    };
    println!("model:            {what}, {place}");
    println!(
        "prefill:          {:.2} tok/s ({} tokens × {} sequences)",
        r.prefill_tok_s, r.prompt, r.batch
    );
    println!(
        "decode:           {:.2} tok/s (median of {} steps, batch {}, {})",
        r.decode_tok_s, r.gen, r.batch, r.draw
    );
    println!(
        "weights/token:    {:.3} GB",
        r.weight_bytes_per_token as f64 / 1e9
    );
    println!("achieved read:    {:.2} GB/s", r.achieved_read_gbs);
    println!(
        "machine read:     {:.2} GB/s (sum over 1 GiB, median of {} passes {})",
        r.machine_read_gbs,
        r.bandwidth_probes,
        if r.bandwidth_interleaved {
            "interleaved with the decode steps"
        } else {
            "before decoding"
        }
    );
    println!(
        "bandwidth ratio:  {:.1}% (median of per-step ratios)",
        r.bandwidth_ratio * 100.0
    );
    if let (Some(q), Some(e)) = (quant, &quality) {
        println!(
            "{} logit error:  max {:.4}, mean {:.5}, top-1 agreement {:.1}% ({} positions)",
            q.name(),
            e.max_abs,
            e.mean_abs,
            e.top1_agreement * 100.0,
            a.prompt
        );
    }
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = serde_json::json!(what);
        v["threads"] = serde_json::json!(rayon::current_num_threads());
        v["device"] = serde_json::json!(place);
        v["quant"] = serde_json::json!(quant.map(|q| q.name()));
        if let Some(e) = &quality {
            v["quant_error"] = serde_json::to_value(e)?;
        }
        println!("{v}");
    }
    Ok(())
}
