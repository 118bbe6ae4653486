//! `gyre upscale`: depth up-scaling (not built yet).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `gyre upscale`.
#[derive(Args)]
pub struct UpscaleArgs {}

/// Runs `gyre upscale`.
pub fn run(_args: UpscaleArgs) -> Result<()> {
    bail!("gyre upscale is not built yet")
}
