//! `gyre upscale`: depth up-scaling. Parses the recipe and options, draws the progress bar,
//! and leaves the plan and the streamed copy to `gyre::upscale`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgGroup, Args, ValueEnum};
use gyre::loader::Checkpoint;
use gyre::tensor::DType;
use gyre::upscale::{self, OutOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Output dtype choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutDType {
    Bf16,
    F16,
    F32,
}

impl From<OutDType> for DType {
    fn from(d: OutDType) -> DType {
        match d {
            OutDType::Bf16 => DType::BF16,
            OutDType::F16 => DType::F16,
            OutDType::F32 => DType::F32,
        }
    }
}

/// Arguments of `gyre upscale`.
#[derive(Args)]
#[command(group(ArgGroup::new("recipe").required(true).args(["layers", "solar"])))]
pub struct UpscaleArgs {
    /// Source model directory (config.json, weights, tokenizer) or a single weight file.
    #[arg(long)]
    model: PathBuf,
    /// Output directory: new or empty (see --force).
    #[arg(long)]
    out: PathBuf,
    /// Source layer ranges to stack, in order: half-open START..END, comma-separated
    /// (e.g. 0..24,8..32).
    #[arg(long)]
    layers: Option<String>,
    /// The SOLAR recipe: with n layers and m = n/4, stack 0..n-m then m..n.
    #[arg(long)]
    solar: bool,
    /// Largest shard: bytes, or with a KB/MB/GB (decimal) or KiB/MiB/GiB suffix.
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Convert the weights while copying (round-to-nearest-even); default: keep each tensor's dtype.
    #[arg(long, value_enum)]
    dtype: Option<OutDType>,
    /// Write into a non-empty output directory (its old weight files are removed).
    #[arg(long)]
    force: bool,
}

/// Runs `gyre upscale`.
pub fn run(args: UpscaleArgs) -> Result<()> {
    let shard_size = upscale::parse_size(&args.shard_size)?;
    let ckpt = Checkpoint::open(&args.model, |_, _| {})?;
    if ckpt.gguf.is_some() {
        anyhow::bail!(
            "{}: gyre upscale reads and writes safetensors checkpoints; a GGUF file's quantized \
             layers would have to be requantized, so upscale the original checkpoint instead",
            args.model.display()
        );
    }
    let n = upscale::source_layers(&ckpt)?;
    let slices = match &args.layers {
        Some(spec) => upscale::parse_layers(spec, n)?,
        None => upscale::solar_plan(n)?,
    };
    let plan = upscale::plan(&ckpt, &slices)?;
    let ranges: Vec<String> = plan
        .slices
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect();
    eprintln!(
        "{}: {} layers -> {} layers (source layers {})",
        plan.arch.name(),
        n,
        plan.layers(),
        ranges.join(", ")
    );
    let opts = OutOptions {
        dir: args.out.clone(),
        shard_size,
        dtype: args.dtype.map(DType::from),
        force: args.force,
    };

    let bar = ProgressBar::hidden();
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("writing {bar:30.cyan/blue} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }
    let report = upscale::run(&ckpt, &plan, &opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} tensors ({} bytes) in {} shard{} to {}{}",
        report.tensors,
        report.bytes,
        report.shards.len(),
        if report.shards.len() == 1 { "" } else { "s" },
        args.out.display(),
        if report.copied.is_empty() {
            String::new()
        } else {
            format!("; copied {}", report.copied.join(", "))
        }
    );
    Ok(())
}
