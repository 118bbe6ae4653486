//! `gyre bench`: speed against the bandwidth limit (not built yet).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `gyre bench`.
#[derive(Args)]
pub struct BenchArgs {}

/// Runs `gyre bench`.
pub fn run(_args: BenchArgs) -> Result<()> {
    bail!("gyre bench is not built yet")
}
