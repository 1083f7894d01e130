//! `prefix-tune eval` (placeholder: helper-8 owns this file and replaces it).

use anyhow::{bail, Result};

/// Arguments of `prefix-tune eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {}

/// Runs `prefix-tune eval`.
pub fn run(_args: EvalArgs) -> Result<()> {
    bail!("`prefix-tune eval` is not implemented yet")
}
