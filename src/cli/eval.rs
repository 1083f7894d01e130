//! `prefix-tune eval`: the loss of a prefix (or of the base model) on a dataset, per example and
//! in total, with the same sequence convention as training (see [`crate::data`]).
//!
//! Plain output: one line per example (`index`, summed loss, target tokens, mean), then the
//! mean loss per target token and the perplexity. `--json`: one object per example
//! `{"index", "loss_sum", "tokens"}` (index 0-based, in data order), then one summary object
//! `{"summary": true, "examples", "tokens", "loss_sum", "mean_loss", "perplexity", "truncated"}`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde_json::json;

use super::{load_model_arg, load_prefix_arg, positive_usize};
use crate::data::{
    effective_max_len, encode_examples, load_examples, make_batch, special_tokens, LongPolicy,
};
use crate::devices::open_engine_with;
use crate::engine::{Device, EngineOptions};
use crate::model::LoadedModel;
use crate::prefix::file::parse_positions;
use crate::reference::model::{Positions, RunOptions};

/// Arguments of `prefix-tune eval`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  prefix-tune eval --model SmolLM2-135M-Instruct.Q4_1.gguf --prefix run1 --data dev.jsonl
  prefix-tune eval --model gpt2-dir --data dev.jsonl --json          # the base model, no prefix
  prefix-tune eval --model gpt2-dir --prefix peft-adapter-dir --data task.json --json")]
pub struct EvalArgs {
    /// The model: an HF directory (config.json + safetensors + tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prefix: a prefix file, a training --out directory or a PEFT adapter directory
    /// (default: none, the base model).
    #[arg(long)]
    pub prefix: Option<PathBuf>,
    /// Data: .jsonl, E2E .csv or BIG-bench task.json.
    #[arg(long)]
    pub data: PathBuf,
    /// One JSON object per line per example, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// Examples per batch.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub batch_size: usize,
    /// Longest sequence in tokens; longer ones are cut (and counted).
    #[arg(long, default_value_t = 1024, value_parser = positive_usize)]
    pub max_len: usize,
    /// Refuse sequences longer than --max-len instead of cutting them.
    #[arg(long)]
    pub refuse_long: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Per-layer activation recomputation on the GPU engine (accepted for symmetry with
    /// `train`; a loss-only pass keeps no activations, so it changes nothing here; no effect on
    /// the CPU engine).
    #[arg(long)]
    pub recompute: bool,
    /// Positions of the real tokens (default: the prefix's own convention, else after-prefix).
    #[arg(long, value_parser = ["after-prefix", "from-zero"])]
    pub positions: Option<String>,
}

/// Runs `prefix-tune eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if !a.data.exists() {
        bail!("--data {}: no such file", a.data.display());
    }
    let model = load_model_arg(&a.model)?;
    let prefix = match &a.prefix {
        Some(p) => Some(load_prefix_arg(p, &model)?),
        None => None,
    };
    let examples = load_examples(&a.data)?;
    let positions = match (&a.positions, &prefix) {
        (Some(p), _) => parse_positions(p)?,
        (None, Some(lp)) => lp.positions,
        (None, None) => Positions::AfterPrefix,
    };
    let prefix_len = prefix.as_ref().map_or(0, |p| p.bank.len);
    let max_len = effective_max_len(&model.weights.config, a.max_len, prefix_len, positions)?;
    let policy = if a.refuse_long {
        LongPolicy::Refuse
    } else {
        LongPolicy::Truncate
    };
    let set = encode_examples(
        &model.tokenizer,
        &examples,
        max_len,
        policy,
        &a.data.display().to_string(),
    )?;
    if set.n_truncated > 0 {
        eprintln!(
            "note: {} of {} sequences were longer than {max_len} tokens and were cut (--max-len; --refuse-long to refuse them)",
            set.n_truncated,
            examples.len()
        );
    }
    let pad_id = special_tokens(&model.tokenizer).1.unwrap_or(0);
    let LoadedModel { weights, .. } = model;
    let engine_opts = EngineOptions {
        recompute: a.recompute,
    };
    let mut engine = open_engine_with(Arc::new(weights), a.device, &engine_opts)?;
    if a.recompute {
        eprintln!(
            "note: --recompute: evaluation runs the forward only and keeps no activations, so \
             recomputation changes nothing (engine: {})",
            engine.describe()
        );
    }
    let run = RunOptions { positions };
    let bank = prefix.as_ref().map(|p| &p.bank);

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut total, mut tokens) = (0.0f64, 0u64);
    let mut index = 0usize;
    for chunk in set.items.chunks(a.batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id);
        let res = engine.loss(bank, &batch, &run)?;
        for (ls, &n) in res.loss_sum.iter().zip(&res.n_targets) {
            let ls = *ls as f64;
            if !ls.is_finite() {
                bail!("example {index}: the loss is not finite ({ls})");
            }
            total += ls;
            tokens += n as u64;
            if a.json {
                writeln!(
                    out,
                    "{}",
                    json!({"index": index, "loss_sum": ls, "tokens": n})
                )?;
            } else {
                let mean = if n > 0 { ls / n as f64 } else { f64::NAN };
                writeln!(
                    out,
                    "{index:>6}  loss_sum {ls:>10.4}  tokens {n:>5}  mean {mean:.4}"
                )?;
            }
            index += 1;
        }
        out.flush()?;
    }
    let mean = if tokens > 0 {
        total / tokens as f64
    } else {
        f64::NAN
    };
    if a.json {
        writeln!(
            out,
            "{}",
            json!({
                "summary": true,
                "examples": index,
                "tokens": tokens,
                "loss_sum": total,
                "mean_loss": if mean.is_finite() { json!(mean) } else { json!(null) },
                "perplexity": if mean.is_finite() { json!(mean.exp()) } else { json!(null) },
                "truncated": set.n_truncated,
                "prefix": a.prefix.as_ref().map(|p| p.display().to_string()),
            })
        )?;
    } else {
        writeln!(
            out,
            "{} examples, {tokens} target tokens: mean loss {mean:.4} per token, perplexity {:.3}{}",
            index,
            mean.exp(),
            match &a.prefix {
                Some(p) => format!(" (prefix {})", p.display()),
                None => " (base model, no prefix)".to_string(),
            }
        )?;
    }
    out.flush()?;
    Ok(())
}
