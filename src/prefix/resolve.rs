//! What a `--prefix` argument names, resolved and checked against a model: a prefix file, a
//! training output directory or a PEFT adapter (the CLI and the server share this).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{import_peft_adapter, load_prefix_for, PrefixBank};
use crate::types::Positions;

/// The final prefix's file in a training `--out` directory.
pub const FINAL_PREFIX_FILE: &str = "prefix.safetensors";

/// What a `--prefix` path turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixKind {
    /// A prefix-tune prefix file.
    File,
    /// A training `--out` directory (its final prefix).
    TrainingDir,
    /// A HF PEFT prefix-tuning adapter directory.
    Peft,
}

/// A prefix loaded from a `--prefix` argument and checked against a model.
#[derive(Clone, Debug)]
pub struct LoadedPrefix {
    pub bank: PrefixBank<f32>,
    /// The position convention it was trained with (PEFT adapters: after the prefix).
    pub positions: Positions,
    pub kind: PrefixKind,
    /// The file the prefix was read from.
    pub path: PathBuf,
}

/// Resolves a `--prefix` path for a model given by its configuration and fingerprint: a prefix
/// file, a training `--out` directory (its [`FINAL_PREFIX_FILE`]) or a PEFT adapter directory
/// (`adapter_config.json`). A prefix made for another model (fingerprint, architecture or shapes)
/// is refused.
pub fn load_prefix_for_model(
    path: &Path,
    cfg: &crate::model::config::ModelConfig,
    fingerprint: &str,
) -> Result<LoadedPrefix> {
    if !path.exists() {
        bail!("prefix {}: no such file or directory", path.display());
    }
    let peft_dir = if path.is_dir() && path.join("adapter_config.json").is_file() {
        Some(path.to_path_buf())
    } else if path.is_file()
        && path
            .file_name()
            .is_some_and(|n| n == "adapter_model.safetensors")
        && path.with_file_name("adapter_config.json").is_file()
    {
        path.parent().map(Path::to_path_buf)
    } else {
        None
    };
    if let Some(dir) = peft_dir {
        let (bank, info) = import_peft_adapter(&dir)?;
        info.check_model(cfg).with_context(|| {
            format!(
                "PEFT adapter {} does not fit this model: it was made for another model",
                dir.display()
            )
        })?;
        if info.prefix_projection {
            eprintln!(
                "note: {} was trained with prefix_projection; its saved prompt_embeddings are used",
                dir.display()
            );
        }
        return Ok(LoadedPrefix {
            bank,
            positions: Positions::AfterPrefix,
            kind: PrefixKind::Peft,
            path: dir,
        });
    }
    let (file, kind) = if path.is_dir() {
        let f = path.join(FINAL_PREFIX_FILE);
        if !f.is_file() {
            bail!(
                "prefix {}: a directory that is neither a training output (no {FINAL_PREFIX_FILE}) \
                 nor a PEFT adapter (no adapter_config.json)",
                path.display()
            );
        }
        (f, PrefixKind::TrainingDir)
    } else {
        (path.to_path_buf(), PrefixKind::File)
    };
    let (bank, meta) = load_prefix_for(&file, cfg, fingerprint)?;
    Ok(LoadedPrefix {
        bank,
        positions: meta.positions,
        kind,
        path: file,
    })
}
