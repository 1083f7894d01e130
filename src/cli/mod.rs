//! The `prefix-tune` command line: the top-level parser, dispatch to one file per command, and
//! what several commands share (loading a model, resolving a `--prefix` argument, checked
//! number parsers).
//!
//! Every command returns `anyhow::Result`; [`main`] prints an error with its causes on stderr and
//! exits with status 1 (clap's own usage errors exit with 2).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::model::{load_model, LoadedModel};
use crate::reference::model::Positions;

pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod serve;
pub mod train;

/// Prefix tuning of frozen language models (Li & Liang 2021), on the CPU or a CUDA GPU.
#[derive(Debug, Parser)]
#[command(name = "prefix-tune", version, propagate_version = true)]
#[command(after_help = "Examples:
  prefix-tune info --model SmolLM2-135M-Instruct.Q4_1.gguf
  prefix-tune train --model SmolLM2-135M-Instruct.Q4_1.gguf --data train.jsonl --out run1
  prefix-tune generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prefix run1 --input \"name[Aromi]\"
  prefix-tune serve --model SmolLM2-135M-Instruct.Q4_1.gguf --prefix e2e=run1")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; each one's arguments live in its own file.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a prefix on a dataset.
    Train(train::TrainArgs),
    /// Loss and perplexity of a prefix (or the base model) on a dataset.
    Eval(eval::EvalArgs),
    /// Generate text with the base model or with one or more prefixes.
    Generate(generate::GenerateArgs),
    /// Convert a prefix: to a PEFT adapter directory, or into a prefix-tune prefix file.
    Export(export::ExportArgs),
    /// Describe a model: architecture, sizes, tokenizer, prefix costs, GPU availability.
    Info(info::InfoArgs),
    /// Benchmarks: `bench attention` (the fused prefix attention) and `bench train` (training steps).
    Bench(bench::BenchArgs),
    /// An OpenAI-compatible HTTP server: completions and chat with the base model and prefixes,
    /// continuous batching of mixed prefixes.
    Serve(serve::ServeArgs),
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Export(a) => export::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

/// Parses the process arguments, runs the command, and turns an error into a message on stderr
/// and a non-zero exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stdout (`| head`) is not an error worth a message.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a model (HF directory or `.gguf`), saying on stderr what was loaded and how long it took.
pub fn load_model_arg(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        bail!(
            "model {}: no such file or directory (give an HF model directory or a .gguf file)",
            path.display()
        );
    }
    let t0 = Instant::now();
    let m = load_model(path).with_context(|| format!("loading model {}", path.display()))?;
    let c = &m.weights.config;
    eprintln!(
        "loaded {} ({:?}, {} layers, d {}, {} parameters) in {:.1}s",
        path.display(),
        c.arch,
        c.n_layers,
        c.d_model,
        m.weights.n_params(),
        t0.elapsed().as_secs_f64()
    );
    Ok(m)
}

pub use crate::prefix::resolve::{
    load_prefix_for_model, LoadedPrefix, PrefixKind, FINAL_PREFIX_FILE,
};

/// Resolves a `--prefix` path: a prefix file, a training `--out` directory (its
/// [`FINAL_PREFIX_FILE`]) or a PEFT adapter directory (`adapter_config.json`). A prefix made for
/// another model (fingerprint, architecture or shapes) is refused.
pub fn load_prefix_arg(path: &Path, model: &LoadedModel) -> Result<LoadedPrefix> {
    load_prefix_for_model(path, &model.weights.config, &model.fingerprint)
}

/// clap parser for `--positions`.
pub fn parse_positions(s: &str) -> Result<Positions, String> {
    crate::prefix::file::parse_positions(s).map_err(|e| e.to_string())
}

fn parse_f64(s: &str) -> Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !x.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(x)
}

/// clap parser: a finite number.
pub fn finite_f64(s: &str) -> Result<f64, String> {
    parse_f64(s)
}

/// clap parser: a finite number > 0.
pub fn positive_f64(s: &str) -> Result<f64, String> {
    let x = parse_f64(s)?;
    if x <= 0.0 {
        return Err(format!("{s} must be greater than 0"));
    }
    Ok(x)
}

/// clap parser: a finite number ≥ 0.
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    let x = parse_f64(s)?;
    if x < 0.0 {
        return Err(format!("{s} must not be negative"));
    }
    Ok(x)
}

/// clap parser: a probability in (0, 1].
pub fn probability(s: &str) -> Result<f64, String> {
    let x = parse_f64(s)?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("{s} must be in (0, 1]"));
    }
    Ok(x)
}

/// clap parser: a whole number ≥ 1.
pub fn positive_usize(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number ≥ 1"))?;
    if n == 0 {
        return Err("must be at least 1".to_string());
    }
    Ok(n)
}
