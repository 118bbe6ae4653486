//! `gyre serve`: the OpenAI-compatible server (not built yet).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `gyre serve`.
#[derive(Args)]
pub struct ServeArgs {}

/// Runs `gyre serve`.
pub fn run(_args: ServeArgs) -> Result<()> {
    bail!("gyre serve is not built yet")
}
