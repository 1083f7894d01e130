//! `prefix-tune export`: writes a prefix as a HF PEFT prefix-tuning adapter directory
//! (`adapter_config.json` + `adapter_model.safetensors` with `prompt_embeddings`
//! `[P, 2·L·kv_dim]`), or any `--prefix` source (e.g. a PEFT adapter) as a prefix-tune prefix file.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};

use super::{load_model_arg, load_prefix_arg, FINAL_PREFIX_FILE};
use crate::prefix::{
    export_peft_adapter, import_peft_adapter, load_prefix, save_prefix, PrefixMeta,
};

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A HF PEFT adapter directory that `PeftModel.from_pretrained` loads.
    Peft,
    /// A prefix-tune prefix file (safetensors + metadata); needs --model.
    Prefix,
}

/// Arguments of `prefix-tune export`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  prefix-tune export --prefix run1 --format peft --out run1-peft
  prefix-tune export --prefix run1/prefix.safetensors --model smollm2.gguf --format peft --out run1-peft
  prefix-tune export --prefix peft_adapter_dir --model tests/fixtures/gpt2_tiny --format prefix --out p.safetensors")]
pub struct ExportArgs {
    /// The prefix: a prefix file, a training --out directory, or a PEFT adapter directory.
    #[arg(long)]
    pub prefix: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output: a directory (peft) or a file (prefix).
    #[arg(long)]
    pub out: PathBuf,
    /// The base model: checks that the prefix was made for it, and (peft) is recorded as
    /// `base_model_name_or_path`. Required for --format prefix.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `base_model_name_or_path` to record in the PEFT config (default: the --model path).
    #[arg(long)]
    pub base_model: Option<String>,
    /// Which prefix of a multi-prefix file to export (0-based).
    #[arg(long)]
    pub index: Option<usize>,
}

/// Runs `prefix-tune export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let model = args.model.as_deref().map(load_model_arg).transpose()?;
    // With a model the prefix is checked against it; without, it is read as it is.
    let (bank, positions) = match &model {
        Some(m) => {
            let p = load_prefix_arg(&args.prefix, m)?;
            (p.bank, Some(p.positions))
        }
        None => {
            if !args.prefix.exists() {
                bail!(
                    "prefix {}: no such file or directory",
                    args.prefix.display()
                );
            }
            if args.prefix.join("adapter_config.json").is_file() {
                (import_peft_adapter(&args.prefix)?.0, None)
            } else {
                let file = if args.prefix.is_dir() {
                    let f = args.prefix.join(FINAL_PREFIX_FILE);
                    ensure!(
                        f.is_file(),
                        "prefix {}: a directory that is neither a training output (no \
                         {FINAL_PREFIX_FILE}) nor a PEFT adapter (no adapter_config.json)",
                        args.prefix.display()
                    );
                    f
                } else {
                    args.prefix.clone()
                };
                let (bank, meta) = load_prefix(&file)?;
                (bank, Some(meta.positions))
            }
        }
    };
    let index = match (args.index, bank.n_prefixes) {
        (Some(i), n) if i >= n => bail!(
            "--index {i}: {} holds {n} prefix(es)",
            args.prefix.display()
        ),
        (Some(i), _) => i,
        (None, 1) => 0,
        (None, n) => bail!(
            "{} holds {n} prefixes; choose one with --index 0..{}",
            args.prefix.display(),
            n - 1
        ),
    };
    match args.format {
        ExportFormat::Peft => {
            if positions == Some(crate::reference::model::Positions::FromZero) {
                eprintln!(
                    "warning: this prefix was trained with --positions from-zero; PEFT places real \
                     tokens after the prefix, so it will not behave the same there"
                );
            }
            if args.out.is_file() {
                bail!(
                    "--out {}: is a file; a PEFT adapter is a directory",
                    args.out.display()
                );
            }
            let base = args
                .base_model
                .clone()
                .or_else(|| args.model.as_ref().map(|p| p.display().to_string()));
            export_peft_adapter(&args.out, &bank, index, base.as_deref())
                .with_context(|| format!("writing PEFT adapter {}", args.out.display()))?;
            eprintln!(
                "wrote PEFT adapter {} (prefix length {}, {} layers)",
                args.out.display(),
                bank.len,
                bank.n_layers
            );
        }
        ExportFormat::Prefix => {
            let Some(m) = &model else {
                bail!("--format prefix needs --model (the file records the model's fingerprint)");
            };
            if args.out.is_dir() {
                bail!(
                    "--out {}: is a directory; give a file name",
                    args.out.display()
                );
            }
            let one = bank.select(index);
            let meta = PrefixMeta::for_model(
                &m.weights.config,
                one.len,
                &m.fingerprint,
                positions.unwrap_or_default(),
                &serde_json::json!({ "exported_from": args.prefix.display().to_string() }),
            );
            save_prefix(&args.out, &one, &meta)
                .with_context(|| format!("writing prefix file {}", args.out.display()))?;
            eprintln!(
                "wrote prefix file {} (prefix length {}, for {})",
                args.out.display(),
                one.len,
                m.source.display()
            );
        }
    }
    Ok(())
}
