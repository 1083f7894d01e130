//! `prefix-tune train`: check every argument and input, build the data and the initial prefix,
//! run [`crate::train::train`], and report. With `--show-examples N` it also prints, for N
//! held-out inputs, the greedy generations and the eval loss before and after training (the demo).
//!
//! Nothing is written to `--out` until the model, the data and the initial prefix have all been
//! checked, so a bad input leaves no half-made run directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{load_model_arg, load_prefix_arg, non_negative_f64, positive_f64, positive_usize};
use crate::checkpoint::{load_checkpoint, CHECKPOINT_DIR};
use crate::data::{
    effective_max_len, encode_examples, load_examples, special_tokens, split_by_input, Encoded,
    Example, LongPolicy,
};
use crate::devices::open_engine_with;
use crate::engine::{Device, Engine, EngineOptions};
use crate::generate::{generate, GenerateOptions, Request, Strategy};
use crate::model::tokenizer::Tokenizer;
use crate::model::LoadedModel;
use crate::prefix::file::{parse_positions, positions_name};
use crate::prefix::{PrefixBank, PrefixMeta, Reparam};
use crate::reference::init::init_from_text;
use crate::reference::model::{Positions, RunOptions};
use crate::train::{
    evaluate, train, OptimizerKind, RunSetup, ScheduleKind, TrainConfig, Trainable, TrainerState,
};

/// Longest prefix accepted (virtual tokens).
pub const MAX_PREFIX_LEN: usize = 4096;
/// Largest prefix (or reparameterization) accepted, in parameters.
const MAX_PREFIX_PARAMS: usize = 256 << 20;

/// Arguments of `prefix-tune train`.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(after_help = "Examples:
  prefix-tune train --model SmolLM2-135M-Instruct.Q4_1.gguf --data e2e/task.json --eval-split 0.1 \\
      --out run1 --prefix-len 10 --init-text \"Describe the restaurant:\" --steps 300
  prefix-tune train --resume run1            # continue an interrupted run exactly
  prefix-tune train --model gpt2-dir --data train.jsonl --eval-data dev.jsonl --out run2 \\
      --reparam 512 --lr 5e-5 --epochs 5 --batch-size 8 --grad-accum 2

Data: JSONL {\"input\",\"target\"} (or {\"prompt\",\"completion\"}), E2E CSV (mr,ref) or a BIG-bench
task.json. Each sequence is [bos] + input + target + eos (bos only if the tokenizer adds one); the
loss covers the target and eos tokens.")]
pub struct TrainArgs {
    /// The model: an HF directory (config.json + safetensors + tokenizer) or a .gguf file.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Training data: .jsonl, E2E .csv or BIG-bench task.json.
    #[arg(long, required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// The run directory (metrics, checkpoints, prefixes, plot). Default with --resume: that dir.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Evaluation data (same formats).
    #[arg(long, conflicts_with = "eval_split")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the distinct inputs of --data for evaluation (0 < F < 1).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    pub eval_split: Option<f64>,
    /// Prefix length P (virtual tokens). Default 10, or the length of --init-text / --init-prefix.
    #[arg(long, value_parser = positive_usize, allow_negative_numbers = true)]
    pub prefix_len: Option<usize>,
    /// Start from an existing prefix: a prefix file, a training --out dir or a PEFT adapter dir
    /// (its length wins over --prefix-len).
    #[arg(long, conflicts_with = "init_text")]
    pub init_prefix: Option<PathBuf>,
    /// Start from the model's own keys/values of this text (Li & Liang's "real words" init);
    /// with --prefix-len the text's tokens are repeated or cut to that length.
    #[arg(long)]
    pub init_text: Option<String>,
    /// Train through Li & Liang's MLP reparameterization with this hidden width (0 = off); it is
    /// folded into a plain prefix at the end.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub reparam: usize,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-3, value_parser = positive_f64, allow_negative_numbers = true)]
    pub lr: f64,
    /// Weight decay (AdamW: decoupled; SGD: L2).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Linear learning-rate warmup steps.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub warmup_steps: u64,
    /// Learning-rate schedule after the warmup.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    pub schedule: ScheduleKind,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs", value_parser = clap::value_parser!(u64).range(1..), allow_negative_numbers = true)]
    pub steps: Option<u64>,
    /// Passes over the training data (may be fractional).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    pub epochs: Option<f64>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4, value_parser = positive_usize, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the step's loss is the mean over all their target tokens).
    #[arg(long, default_value_t = 1, value_parser = positive_usize, allow_negative_numbers = true)]
    pub grad_accum: usize,
    /// Longest sequence (input + target + eos) in tokens; longer ones are cut and counted.
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    pub max_len: usize,
    /// Refuse sequences longer than --max-len instead of cutting them.
    #[arg(long)]
    pub refuse_long: bool,
    /// Seed of the data order, the eval split and the random prefix init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    #[serde(skip)]
    pub device: Device,
    /// Recompute each layer's activations in the backward instead of keeping them (GPU engine:
    /// less device memory, about one more forward per step; no effect on the CPU engine).
    #[arg(long)]
    #[serde(skip)]
    pub recompute: bool,
    /// Evaluate every N steps (default: 5 times per run; also at the start and the end).
    #[arg(long, allow_negative_numbers = true)]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps (default: only at the end).
    #[arg(long, allow_negative_numbers = true)]
    pub save_every: Option<u64>,
    /// Continue the run in DIR from its checkpoint (settings come from the checkpoint).
    #[arg(long, conflicts_with_all = [
        "eval_split", "prefix_len", "init_prefix", "init_text", "reparam", "optimizer", "lr",
        "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "steps", "epochs",
        "batch_size", "grad_accum", "max_len", "refuse_long", "seed", "eval_every", "save_every",
        "positions", "overwrite"])]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Positions of the real tokens: after-prefix (HF/PEFT, the default) or from-zero.
    #[arg(long, value_parser = ["after-prefix", "from-zero"])]
    pub positions: Option<String>,
    /// Stop after N steps of this invocation (checkpointed; continue with --resume).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(skip)]
    pub stop_after: Option<u64>,
    /// Allow --out to hold a previous run (it is replaced).
    #[arg(long)]
    pub overwrite: bool,
    /// Print greedy generations and eval loss for N held-out inputs before and after training.
    #[arg(long, default_value_t = 0)]
    #[serde(skip)]
    pub show_examples: usize,
    /// New tokens per --show-examples generation.
    #[arg(long, default_value_t = 48, value_parser = positive_usize)]
    #[serde(skip, default = "default_show_tokens")]
    pub show_tokens: usize,
}

fn default_show_tokens() -> usize {
    48
}

/// Checks the hyperparameters that do not need the model or the data.
fn check_args(a: &TrainArgs) -> Result<()> {
    for (name, v) in [
        ("--lr", a.lr),
        ("--weight-decay", a.weight_decay),
        ("--max-grad-norm", a.max_grad_norm),
    ] {
        if !v.is_finite() {
            bail!("{name} must be a finite number, got {v}");
        }
    }
    if let Some(p) = a.prefix_len {
        if p == 0 || p > MAX_PREFIX_LEN {
            bail!("--prefix-len must be between 1 and {MAX_PREFIX_LEN}, got {p}");
        }
    }
    if let Some(f) = a.eval_split {
        if !(f > 0.0 && f < 1.0) {
            bail!("--eval-split must be a fraction strictly between 0 and 1, got {f}");
        }
    }
    if let Some(e) = a.epochs {
        if !(e.is_finite() && e > 0.0 && e <= 1e6) {
            bail!("--epochs must be a number > 0, got {e}");
        }
    }
    if a.reparam > 65536 {
        bail!(
            "--reparam {}: the hidden width is absurdly large (at most 65536)",
            a.reparam
        );
    }
    if a.reparam > 0 && (a.init_prefix.is_some() || a.init_text.is_some()) {
        bail!("--reparam trains the prefix through an MLP from a random start; it cannot be combined with --init-prefix or --init-text");
    }
    if a.max_len < 2 {
        bail!("--max-len must be at least 2");
    }
    Ok(())
}

/// Refuses an `--out` that is a file or holds a previous run (unless `--overwrite`), and checks
/// that it could be created, without creating it.
fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {}: exists and is not a directory", out.display());
        }
        let previous = ["prefix.safetensors", CHECKPOINT_DIR, "metrics.jsonl"]
            .iter()
            .any(|f| out.join(f).exists());
        if previous && !overwrite {
            bail!(
                "--out {}: holds a previous run; continue it with --resume {0}, or pass --overwrite, or choose another directory",
                out.display()
            );
        }
        let probe = out.join(format!(".prefix-tune-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("--out {}: the directory is not writable", out.display()))?;
        let _ = std::fs::remove_file(&probe);
        return Ok(());
    }
    // The nearest existing ancestor must be a writable directory.
    let mut anc = out.parent();
    while let Some(a) = anc {
        if a.as_os_str().is_empty() {
            break;
        }
        if a.exists() {
            if !a.is_dir() {
                bail!(
                    "--out {}: cannot be created: {} is not a directory",
                    out.display(),
                    a.display()
                );
            }
            let md = std::fs::metadata(a)?;
            if md.permissions().readonly() {
                bail!(
                    "--out {}: cannot be created: {} is read-only",
                    out.display(),
                    a.display()
                );
            }
            break;
        }
        anc = a.parent();
    }
    Ok(())
}

/// The data, tokenized and split.
struct Prepared {
    train: Vec<Encoded>,
    eval: Vec<Encoded>,
    /// The held-out raw examples (for --show-examples).
    eval_examples: Vec<Example>,
    max_len: usize,
}

fn prepare_data(
    a: &TrainArgs,
    model: &LoadedModel,
    prefix_len: usize,
    positions: Positions,
) -> Result<Prepared> {
    let data = a.data.as_deref().context("--data is required")?;
    let examples = load_examples(data)?;
    let (train_ex, eval_ex) = match (&a.eval_data, a.eval_split) {
        (Some(p), _) => (examples, load_examples(p)?),
        (None, Some(f)) => split_by_input(&examples, f, a.seed)
            .with_context(|| format!("splitting {}", data.display()))?,
        (None, None) => (examples, Vec::new()),
    };
    let cfg = &model.weights.config;
    let max_len = effective_max_len(cfg, a.max_len, prefix_len, positions)?;
    if max_len < a.max_len {
        eprintln!(
            "note: sequences are limited to {max_len} tokens (the model's {} positions after a prefix of {prefix_len})",
            cfg.max_positions
        );
    }
    let policy = if a.refuse_long {
        LongPolicy::Refuse
    } else {
        LongPolicy::Truncate
    };
    let tr = encode_examples(
        &model.tokenizer,
        &train_ex,
        max_len,
        policy,
        &data.display().to_string(),
    )?;
    let eval_name = a.eval_data.as_ref().map_or_else(
        || format!("{} (eval split)", data.display()),
        |p| p.display().to_string(),
    );
    let ev = encode_examples(&model.tokenizer, &eval_ex, max_len, policy, &eval_name)?;
    for (what, set, n) in [
        ("training", &tr, train_ex.len()),
        ("eval", &ev, eval_ex.len()),
    ] {
        if set.n_truncated > 0 {
            eprintln!(
                "note: {} of {n} {what} sequences were longer than {max_len} tokens and were cut (--max-len; --refuse-long to refuse them)",
                set.n_truncated
            );
        }
    }
    Ok(Prepared {
        train: tr.items,
        eval: ev.items,
        eval_examples: eval_ex,
        max_len,
    })
}

/// The initial trainable parameters and the prefix length.
fn initial_trainable(a: &TrainArgs, model: &LoadedModel) -> Result<(Trainable, Option<Positions>)> {
    let cfg = &model.weights.config;
    let check_size = |p: usize| -> Result<()> {
        let n = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * p;
        if p == 0 || p > MAX_PREFIX_LEN || n > MAX_PREFIX_PARAMS {
            bail!(
                "a prefix of length {p} for this model ({n} parameters) is out of range (length 1..={MAX_PREFIX_LEN}, at most {MAX_PREFIX_PARAMS} parameters)"
            );
        }
        Ok(())
    };
    if let Some(path) = &a.init_prefix {
        let lp = load_prefix_arg(path, model)
            .with_context(|| format!("--init-prefix {}", path.display()))?;
        if lp.bank.n_prefixes != 1 {
            bail!(
                "--init-prefix {}: holds {} prefixes; training starts from exactly one",
                path.display(),
                lp.bank.n_prefixes
            );
        }
        if let Some(p) = a.prefix_len {
            if p != lp.bank.len {
                eprintln!(
                    "note: --init-prefix has length {}; it wins over --prefix-len {p}",
                    lp.bank.len
                );
            }
        }
        check_size(lp.bank.len)?;
        return Ok((Trainable::Bank(lp.bank), Some(lp.positions)));
    }
    if let Some(text) = &a.init_text {
        let mut tokens = model
            .tokenizer
            .encode(text)
            .context("--init-text: tokenizing")?;
        if tokens.is_empty() {
            bail!("--init-text {text:?} has no tokens");
        }
        if let Some(p) = a.prefix_len {
            check_size(p)?;
            tokens = tokens.iter().copied().cycle().take(p).collect();
        }
        check_size(tokens.len())?;
        let bank = init_from_text(&model.weights, &tokens).context("--init-text")?;
        return Ok((Trainable::Bank(bank), None));
    }
    let p = a.prefix_len.unwrap_or(10);
    check_size(p)?;
    if a.reparam > 0 {
        let r = Reparam::random(
            cfg.n_layers,
            cfg.n_kv_heads,
            cfg.head_dim,
            p,
            cfg.d_model,
            a.reparam,
            a.seed,
        );
        if r.n_params() > MAX_PREFIX_PARAMS {
            bail!("--reparam {}: the reparameterization would have {} parameters (at most {MAX_PREFIX_PARAMS})", a.reparam, r.n_params());
        }
        return Ok((Trainable::Reparam(r), None));
    }
    let bank = PrefixBank::random(
        1,
        cfg.n_layers,
        cfg.n_kv_heads,
        p,
        cfg.head_dim,
        1.0,
        a.seed,
    );
    Ok((Trainable::Bank(bank), None))
}

/// Greedy generations for `examples` (with `prefix`, or the base model).
fn show_generations(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prefix: Option<&PrefixBank<f32>>,
    examples: &[Example],
    run: RunOptions,
    max_new: usize,
) -> Result<Vec<String>> {
    let (bos, _) = special_tokens(tokenizer);
    let requests: Vec<Request> = examples
        .iter()
        .map(|e| -> Result<Request> {
            let mut prompt: Vec<u32> = bos.into_iter().collect();
            prompt.extend(tokenizer.encode(&e.input)?);
            Ok(Request {
                prompt,
                prefix: prefix.map(|_| 0),
            })
        })
        .collect::<Result<_>>()?;
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        strategy: Strategy::Greedy,
        eos: tokenizer.eos_token_ids().to_vec(),
        run,
        batch_size: 8,
    };
    let gens = generate(engine, prefix, &requests, &opts)?;
    gens.iter()
        .map(|g| {
            let toks: Vec<u32> = g
                .tokens
                .iter()
                .copied()
                .filter(|t| !opts.eos.contains(t))
                .collect();
            Ok(tokenizer.decode(&toks)?.trim().replace('\n', " "))
        })
        .collect()
}

/// Distinct held-out inputs (first example of each), up to `n`.
fn pick_shown(examples: &[Example], n: usize) -> Vec<Example> {
    let mut seen = std::collections::HashSet::new();
    examples
        .iter()
        .filter(|e| seen.insert(e.input.clone()))
        .take(n)
        .cloned()
        .collect()
}

/// Runs `prefix-tune train`.
pub fn run(cli: TrainArgs) -> Result<()> {
    // With --resume, the settings come from the checkpoint; paths and the device may be given again.
    let (a, resume_state) = match &cli.resume {
        Some(dir) => {
            let ck = load_checkpoint::<TrainerState>(dir)?;
            let mut saved: TrainArgs =
                serde_json::from_value(ck.state.args.clone()).with_context(|| {
                    format!(
                        "--resume {}: the checkpoint's arguments are unreadable",
                        dir.display()
                    )
                })?;
            if cli.model.is_some() {
                saved.model = cli.model.clone();
            }
            if cli.data.is_some() {
                saved.data = cli.data.clone();
            }
            if cli.eval_data.is_some() {
                saved.eval_data = cli.eval_data.clone();
            }
            saved.out = Some(cli.out.clone().unwrap_or_else(|| dir.clone()));
            saved.device = cli.device;
            saved.recompute = cli.recompute;
            saved.stop_after = cli.stop_after;
            saved.show_examples = cli.show_examples;
            saved.show_tokens = cli.show_tokens;
            saved.resume = cli.resume.clone();
            (saved, Some(ck))
        }
        None => (cli, None),
    };
    check_args(&a)?;
    let out = a.out.clone().context("--out is required")?;
    if resume_state.is_none() {
        check_out(&out, a.overwrite)?;
    } else if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory", out.display());
    }
    let model_path = a.model.clone().context("--model is required")?;
    let data_path = a.data.clone().context("--data is required")?;
    if !data_path.exists() {
        bail!("--data {}: no such file", data_path.display());
    }
    if let Some(e) = &a.eval_data {
        if !e.exists() {
            bail!("--eval-data {}: no such file", e.display());
        }
    }
    let model = load_model_arg(&model_path)?;
    let cfg = model.weights.config.clone();

    // Initial parameters (or the checkpoint's).
    let (mut trainable, init_positions) = initial_trainable(&a, &model)?;
    let positions = match (&a.positions, init_positions) {
        (Some(p), _) => parse_positions(p)?,
        (None, Some(p)) => p,
        (None, None) => Positions::AfterPrefix,
    };
    let mut resume = None;
    if let Some(ck) = &resume_state {
        trainable = ck
            .state
            .trainable
            .build(&ck.params)
            .with_context(|| format!("--resume {}", ck.dir.display()))?;
        // A run killed after its last checkpoint but before writing its final outputs is
        // finished from that checkpoint (no step is redone); a finished run is refused.
        if ck.state.config.steps <= ck.state.looping.step
            && out.join("prefix.safetensors").is_file()
        {
            bail!(
                "--resume {}: the run is already complete ({} of {} steps)",
                ck.dir.display(),
                ck.state.looping.step,
                ck.state.config.steps
            );
        }
        eprintln!(
            "resuming from {} at step {} of {}",
            ck.dir.display(),
            ck.state.looping.step,
            ck.state.config.steps
        );
        resume = Some((ck.state.looping.clone(), ck.optimizer.clone()));
    }
    let prefix_len = trainable.prefix().len;
    let data = prepare_data(&a, &model, prefix_len, positions)?;
    if data.train.is_empty() {
        bail!(
            "{}: no training examples left after the eval split",
            data_path.display()
        );
    }
    let per_step = a.batch_size * a.grad_accum;
    let config = match &resume_state {
        Some(ck) => ck.state.config.clone(),
        None => TrainConfig {
            optimizer: a.optimizer,
            lr: a.lr,
            weight_decay: a.weight_decay,
            warmup_steps: a.warmup_steps,
            schedule: a.schedule,
            max_grad_norm: a.max_grad_norm,
            steps: match (a.steps, a.epochs) {
                (Some(s), _) => s,
                (None, e) => ((e.unwrap_or(1.0) * data.train.len() as f64) / per_step as f64)
                    .ceil()
                    .max(1.0) as u64,
            },
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            seed: a.seed,
            eval_every: a.eval_every.unwrap_or(0),
            save_every: a.save_every.unwrap_or(0),
        },
    };
    let mut config = config;
    if resume_state.is_none() && a.eval_every.is_none() {
        config.eval_every = (config.steps / 5).max(1);
    }
    config.validate()?;

    // The run's arguments, without this invocation's own (so an interrupted and resumed run
    // records what an uninterrupted one does).
    let mut args_json = serde_json::to_value(&a)?;
    if let Some(m) = args_json.as_object_mut() {
        m.insert("resume".into(), serde_json::Value::Null);
        m.insert("stop_after".into(), serde_json::Value::Null);
        m.insert("overwrite".into(), serde_json::Value::Bool(false));
    }
    let meta = PrefixMeta::for_model(&cfg, prefix_len, &model.fingerprint, positions, &args_json);
    let run = RunOptions { positions };
    let pad_id = special_tokens(&model.tokenizer).1.unwrap_or(0);
    let LoadedModel {
        weights, tokenizer, ..
    } = model;
    let engine_opts = EngineOptions {
        recompute: a.recompute,
    };
    let mut engine = open_engine_with(Arc::new(weights), a.device, &engine_opts)?;

    // Everything checked: create the run directory.
    std::fs::create_dir_all(&out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    if resume_state.is_none() && a.overwrite {
        for f in [
            "prefix.safetensors",
            "best_prefix.safetensors",
            "metrics.jsonl",
            "loss.svg",
        ] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(out.join(CHECKPOINT_DIR));
    }

    eprintln!(
        "training a prefix of length {prefix_len} ({} trained parameters{}) on {} examples ({} held out) with {}; {} steps of {} examples, max {} tokens, positions {}",
        trainable.n_params(),
        if a.reparam > 0 { format!(", reparameterized with hidden {}", a.reparam) } else { String::new() },
        data.train.len(),
        data.eval.len(),
        engine.describe(),
        config.steps,
        per_step,
        data.max_len,
        positions_name(positions),
    );

    if engine.loss_scale().is_some()
        && resume_state.is_none()
        && a.init_text.is_none()
        && a.init_prefix.is_none()
        && a.reparam == 0
    {
        // Measured on SmolLM2-135M (tests/gpu_smollm2.rs, random_prefix_gradient_error, on the
        // simulated device): from a random N(0, 1) prefix the GPU engine's prefix gradient is
        // within 1.5 % of the f32 reference's; real-word prefixes are within 0.5 % and are Li &
        // Liang's recommended start.
        eprintln!(
            "note: the prefix starts random; --init-text TEXT (real words, Li & Liang's \
             initialization) usually trains better and keeps the fp16 GPU engine closer to the \
             f32 reference (0.5 % vs 1.5 % on SmolLM2-135M)"
        );
    }
    let shown = pick_shown(&data.eval_examples, a.show_examples);
    let mut before = None;
    if !shown.is_empty() && resume_state.is_none() {
        let (base_loss, _) = evaluate(
            engine.as_mut(),
            None,
            &data.eval,
            a.batch_size,
            pad_id,
            &run,
        )?;
        let gens = show_generations(
            engine.as_mut(),
            &tokenizer,
            None,
            &shown,
            run,
            a.show_tokens,
        )?;
        before = Some((base_loss, gens));
    }

    let setup = RunSetup {
        out: &out,
        run,
        pad_id,
        meta,
        args: args_json,
        stop_after: a.stop_after,
        progress: true,
    };
    let outcome = train(
        engine.as_mut(),
        &config,
        trainable,
        resume,
        &data.train,
        &data.eval,
        &setup,
    )?;
    if outcome.stopped_early {
        eprintln!(
            "stopped after step {} of {} (--stop-after); continue with: prefix-tune train --resume {}",
            outcome.state.step,
            config.steps,
            out.display()
        );
        return Ok(());
    }
    let last_loss = outcome.state.history.iter().rev().find_map(|r| r.loss);
    let last_eval = outcome.state.history.iter().rev().find_map(|r| r.eval_loss);
    let first_eval = outcome.state.history.iter().find_map(|r| r.eval_loss);
    println!(
        "done: {} steps in {:.0}s; final train loss {}; eval loss {} -> {}{}{}",
        outcome.state.step,
        outcome.state.elapsed,
        last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        first_eval.map_or("-".into(), |l| format!("{l:.4}")),
        last_eval.map_or("-".into(), |l| format!("{l:.4}")),
        outcome.state.best_eval.map_or(String::new(), |b| format!(
            " (best {b:.4} at step {})",
            outcome.state.best_eval_step.unwrap_or(0)
        )),
        match outcome.state.overflow_skipped {
            0 => String::new(),
            n => format!(
                "; {n} step{} skipped for fp16 gradient overflow (loss scale now {})",
                if n == 1 { "" } else { "s" },
                outcome.state.loss_scale.unwrap_or(f32::NAN)
            ),
        },
    );
    println!(
        "wrote {}/prefix.safetensors{}, metrics.jsonl, loss.svg, checkpoint/",
        out.display(),
        if outcome.state.best_eval.is_some() {
            ", best_prefix.safetensors"
        } else {
            ""
        }
    );
    if let Some((base_loss, gens_before)) = before {
        let gens_after = show_generations(
            engine.as_mut(),
            &tokenizer,
            Some(&outcome.prefix),
            &shown,
            run,
            a.show_tokens,
        )?;
        println!();
        println!(
            "eval loss per target token on {} held-out examples: base model {base_loss:.4}, initial prefix {}, trained prefix {}",
            data.eval.len(),
            first_eval.map_or("-".into(), |l| format!("{l:.4}")),
            last_eval.map_or("-".into(), |l| format!("{l:.4}")),
        );
        for (i, ex) in shown.iter().enumerate() {
            println!();
            println!("input:     {}", ex.input);
            println!("reference: {}", ex.target);
            println!("before:    {}", gens_before[i]);
            println!("after:     {}", gens_after[i]);
        }
    }
    Ok(())
}
