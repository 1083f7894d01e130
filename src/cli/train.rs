//! `prefix-tune train` (placeholder: helper-8 owns this file and replaces it).

use anyhow::{bail, Result};

/// Arguments of `prefix-tune train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {}

/// Runs `prefix-tune train`.
pub fn run(_args: TrainArgs) -> Result<()> {
    bail!("`prefix-tune train` is not implemented yet")
}
