//! `prefix-tune generate`: continue texts with the base model or with prefixes — greedy,
//! sampling or beam search, batched, with several named prefixes mixed in one batch.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{
    finite_f64, load_model_arg, load_prefix_arg, parse_positions, positive_f64, positive_usize,
    probability, LoadedPrefix,
};
use crate::devices::open_engine;
use crate::engine::Device;
use crate::generate::{generate, Finish, GenerateOptions, Generation, Request, Sampling, Strategy};
use crate::model::{Arch, LoadedModel};
use crate::prefix::PrefixBank;
use crate::reference::model::{Positions, RunOptions};

/// Arguments of `prefix-tune generate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["input", "inputs"])))]
#[command(after_help = "Examples:
  prefix-tune generate --model smollm2.gguf --input \"The capital of France is\"
  prefix-tune generate --model smollm2.gguf --prefix run1 --input \"name[Aromi], food[Chinese]\" --beams 5
  prefix-tune generate --model smollm2.gguf --prefix e2e=run1 --prefix qa=qa-adapter \\
      --inputs requests.jsonl --json --temperature 0.8 --top-p 0.9 --seed 1
  (requests.jsonl lines: {\"input\": \"...\", \"prefix\": \"e2e\"}; without \"prefix\" a line uses the
  unnamed --prefix, or the only one given, else the base model)")]
pub struct GenerateArgs {
    /// The model: an HF directory (config.json + safetensors + tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A prefix: a prefix file, a training --out directory or a PEFT adapter directory,
    /// optionally named (NAME=PATH) so that JSONL lines can choose it. Repeat to mix prefixes.
    #[arg(long = "prefix", value_name = "[NAME=]PATH")]
    pub prefixes: Vec<String>,
    /// An input text to continue (repeat for several).
    #[arg(long)]
    pub input: Vec<String>,
    /// A JSONL file of inputs: {"input": "...", "prefix": "NAME"} per line ("prefix" optional).
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Most new tokens per input (generation also stops at an end-of-sequence token).
    #[arg(long, default_value_t = 64, value_parser = positive_usize)]
    pub max_new_tokens: usize,
    /// Always take the most likely token (the default unless sampling options are given).
    #[arg(long)]
    pub greedy: bool,
    /// Sample with this temperature (> 0).
    #[arg(long, allow_negative_numbers = true, value_parser = positive_f64)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens.
    #[arg(long, value_parser = positive_usize)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p (0 < p ≤ 1).
    #[arg(long, allow_negative_numbers = true, value_parser = probability)]
    pub top_p: Option<f64>,
    /// Seed of the sampler (results are reproducible for a seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Beam search with N beams (1: greedy).
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub beams: usize,
    /// Beam search length penalty: a hypothesis scores sum_logprobs / length^penalty.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = finite_f64)]
    pub length_penalty: f64,
    /// Inputs decoded together.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub batch_size: usize,
    /// Print one JSON object per input: {"index", "text", "tokens", ...}.
    #[arg(long)]
    pub json: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Positions of the real tokens: after-prefix (HF/PEFT) or from-zero. Default: the
    /// convention each prefix was trained with.
    #[arg(long, value_parser = parse_positions)]
    pub positions: Option<Positions>,
}

/// A `--prefix` argument, split into its optional name and path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PrefixSpec {
    name: Option<String>,
    path: PathBuf,
}

fn parse_spec(s: &str) -> Result<PrefixSpec> {
    ensure!(!s.is_empty(), "--prefix: empty argument");
    if let Some((name, path)) = s.split_once('=') {
        let looks_like_name = !name.is_empty() && !name.contains(['/', '\\']);
        if looks_like_name && !Path::new(s).exists() {
            ensure!(!path.is_empty(), "--prefix {s}: no path after `{name}=`");
            return Ok(PrefixSpec {
                name: Some(name.to_string()),
                path: PathBuf::from(path),
            });
        }
    }
    Ok(PrefixSpec {
        name: None,
        path: PathBuf::from(s),
    })
}

/// One input with where it came from (for messages).
struct Input {
    text: String,
    /// Index into the loaded prefixes, or the base model.
    prefix: Option<usize>,
    origin: String,
}

/// Reads a JSONL inputs file; every error names the file and line.
fn read_inputs(
    path: &Path,
    names: &HashMap<String, usize>,
    default: Option<usize>,
) -> Result<Vec<Input>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading inputs {}", path.display()))?;
    let known = || {
        let mut k: Vec<&str> = names.keys().map(String::as_str).collect();
        k.sort();
        if k.is_empty() {
            "none: give --prefix NAME=PATH".to_string()
        } else {
            k.join(", ")
        }
    };
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = std::str::from_utf8(line)
            .map_err(|_| anyhow::anyhow!("{at}: not UTF-8 text (is this a JSONL file?)"))?
            .trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{at}: not valid JSON ({e})"))?;
        let Some(obj) = v.as_object() else {
            bail!("{at}: expected a JSON object like {{\"input\": \"...\"}}");
        };
        let text = match obj.get("input").or_else(|| obj.get("prompt")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("{at}: \"input\" must be a string, got {other}"),
            None => bail!("{at}: missing field \"input\""),
        };
        let prefix = match obj.get("prefix") {
            None | Some(Value::Null) => default,
            Some(Value::String(name)) => match names.get(name) {
                Some(&k) => Some(k),
                None => bail!("{at}: unknown prefix {name:?} (known: {})", known()),
            },
            Some(other) => bail!("{at}: \"prefix\" must be a prefix name (a string), got {other}"),
        };
        out.push(Input {
            text,
            prefix,
            origin: at,
        });
    }
    ensure!(!out.is_empty(), "{}: no inputs in the file", path.display());
    Ok(out)
}

fn strategy(args: &GenerateArgs) -> Result<Strategy> {
    let sampling = args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some();
    if sampling && args.greedy {
        bail!("--greedy conflicts with the sampling options --temperature/--top-k/--top-p");
    }
    if sampling && args.beams > 1 {
        bail!(
            "--beams {} (beam search) does not sample: drop --temperature/--top-k/--top-p",
            args.beams
        );
    }
    if args.greedy && args.beams > 1 {
        bail!("--greedy conflicts with --beams {}", args.beams);
    }
    if args.seed.is_some() && !sampling {
        bail!("--seed only applies to sampling: add --temperature, --top-k or --top-p");
    }
    Ok(if sampling {
        Strategy::Sample(Sampling {
            temperature: args.temperature.unwrap_or(1.0),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed.unwrap_or(0),
        })
    } else if args.beams > 1 {
        Strategy::Beam {
            beams: args.beams,
            length_penalty: args.length_penalty,
        }
    } else {
        Strategy::Greedy
    })
}

/// Prompt tokens: BOS when the tokenizer's configuration asks for it, then the text's tokens.
fn prompt_tokens(model: &LoadedModel, text: &str, origin: &str) -> Result<Vec<u32>> {
    let t = &model.tokenizer;
    let mut tokens = Vec::new();
    if t.add_bos() {
        tokens.extend(t.bos_token_id());
    }
    tokens.extend(
        t.encode(text)
            .with_context(|| format!("{origin}: tokenizing"))?,
    );
    ensure!(
        !tokens.is_empty(),
        "{origin}: the input is empty (no tokens to continue)"
    );
    Ok(tokens)
}

/// Runs `prefix-tune generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let strategy = strategy(&args)?;
    let specs: Vec<PrefixSpec> = args
        .prefixes
        .iter()
        .map(|s| parse_spec(s))
        .collect::<Result<_>>()?;
    let mut names = HashMap::new();
    let mut unnamed = None;
    for (k, s) in specs.iter().enumerate() {
        match &s.name {
            Some(n) => {
                if names.insert(n.clone(), k).is_some() {
                    bail!("--prefix: the name {n:?} is given twice");
                }
            }
            None => {
                if unnamed.is_some() {
                    bail!(
                        "--prefix: several unnamed prefixes; name them (NAME=PATH) and choose per \
                         input with \"prefix\": NAME in --inputs"
                    );
                }
                unnamed = Some(k);
            }
        }
    }
    let default = unnamed.or((specs.len() == 1).then_some(0));
    // Check the inputs file before the (slow) model load.
    if let Some(p) = &args.inputs {
        ensure!(p.is_file(), "inputs {}: no such file", p.display());
    }
    for s in &specs {
        ensure!(
            s.path.exists(),
            "prefix {}: no such file or directory",
            s.path.display()
        );
    }
    let inputs = match &args.inputs {
        Some(path) => read_inputs(path, &names, default)?,
        None if !args.input.is_empty() => args
            .input
            .iter()
            .enumerate()
            .map(|(i, text)| Input {
                text: text.clone(),
                prefix: default,
                origin: if args.input.len() == 1 {
                    "--input".to_string()
                } else {
                    format!("--input #{}", i + 1)
                },
            })
            .collect(),
        None => bail!("give --input TEXT or --inputs FILE.jsonl"),
    };

    let model = load_model_arg(&args.model)?;
    let prefixes: Vec<LoadedPrefix> = specs
        .iter()
        .map(|s| {
            let p = load_prefix_arg(&s.path, &model)?;
            ensure!(
                p.bank.n_prefixes == 1,
                "prefix {}: holds {} prefixes; give one prefix per --prefix (export one with \
                 `prefix-tune export --index`)",
                p.path.display(),
                p.bank.n_prefixes
            );
            Ok(p)
        })
        .collect::<Result<_>>()?;
    let positions_of = |p: &LoadedPrefix| {
        let pos = args.positions.unwrap_or(p.positions);
        if pos != p.positions {
            eprintln!(
                "warning: {} was trained with --positions {}; generating with {}",
                p.path.display(),
                crate::prefix::file::positions_name(p.positions),
                crate::prefix::file::positions_name(pos)
            );
        }
        pos
    };
    // Prefixes of equal length and convention share one bank (and one batch); others run apart.
    let mut groups: Vec<(usize, Positions, Vec<usize>)> = Vec::new();
    let mut slot = vec![(0usize, 0usize); prefixes.len()];
    for (k, p) in prefixes.iter().enumerate() {
        let pos = positions_of(p);
        let g = match groups
            .iter()
            .position(|(len, gp, _)| *len == p.bank.len && *gp == pos)
        {
            Some(g) => g,
            None => {
                groups.push((p.bank.len, pos, Vec::new()));
                groups.len() - 1
            }
        };
        slot[k] = (g, groups[g].2.len());
        groups[g].2.push(k);
    }

    let cfg = model.weights.config.clone();
    let mut requests = Vec::with_capacity(inputs.len());
    for inp in &inputs {
        let prompt = prompt_tokens(&model, &inp.text, &inp.origin)?;
        if cfg.arch == Arch::Gpt2 {
            let p = inp.prefix.map_or(0, |k| {
                let (g, _) = slot[k];
                match groups[g].1 {
                    Positions::AfterPrefix => groups[g].0,
                    Positions::FromZero => 0,
                }
            });
            let need = p + prompt.len() + args.max_new_tokens;
            ensure!(
                need <= cfg.max_positions,
                "{}: {} prompt tokens + {p} prefix positions + --max-new-tokens {} = {need} exceed \
                 the model's {} positions",
                inp.origin,
                prompt.len(),
                args.max_new_tokens,
                cfg.max_positions
            );
        }
        requests.push(prompt);
    }

    let mut eos: Vec<u32> = model.tokenizer.eos_token_ids().to_vec();
    for &e in &cfg.eos_token_ids {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let LoadedModel {
        weights, tokenizer, ..
    } = model;
    let mut engine = open_engine(Arc::new(weights), args.device)?;
    eprintln!("engine: {}", engine.describe());

    let t0 = Instant::now();
    let mut results: Vec<Option<Generation>> = vec![None; inputs.len()];
    // One run per group of prefixes, plus one for the inputs without a prefix.
    for g in 0..=groups.len() {
        let (bank, run) = if g < groups.len() {
            let banks: Vec<PrefixBank<f32>> = groups[g]
                .2
                .iter()
                .map(|&k| prefixes[k].bank.clone())
                .collect();
            (
                Some(PrefixBank::stack(&banks)?),
                RunOptions {
                    positions: groups[g].1,
                },
            )
        } else {
            (None, RunOptions::default())
        };
        let members: Vec<usize> = (0..inputs.len())
            .filter(|&i| match inputs[i].prefix {
                Some(k) => slot[k].0 == g,
                None => g == groups.len(),
            })
            .collect();
        if members.is_empty() {
            continue;
        }
        let reqs: Vec<Request> = members
            .iter()
            .map(|&i| Request {
                prompt: requests[i].clone(),
                prefix: inputs[i].prefix.map(|k| slot[k].1),
            })
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: args.max_new_tokens,
            strategy,
            eos: eos.clone(),
            run,
            batch_size: args.batch_size,
        };
        let out = generate(engine.as_mut(), bank.as_ref(), &reqs, &opts)?;
        for (&i, g) in members.iter().zip(out) {
            results[i] = Some(g);
        }
    }
    let results: Vec<Generation> = results
        .into_iter()
        .map(|g| g.expect("every input belongs to one group"))
        .collect();
    let n_new: usize = results.iter().map(|g| g.tokens.len()).sum();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "generated {n_new} tokens for {} input(s) in {secs:.1}s ({:.1} tokens/s)",
        inputs.len(),
        n_new as f64 / secs.max(1e-9)
    );

    let name_of = |k: usize| specs[k].name.clone();
    let mut out = std::io::stdout().lock();
    for (i, (inp, g)) in inputs.iter().zip(&results).enumerate() {
        let body = match (g.finish, g.tokens.split_last()) {
            (Finish::Eos, Some((_, rest))) => rest,
            _ => &g.tokens[..],
        };
        let text = tokenizer
            .decode(body)
            .with_context(|| format!("{}: decoding the generated tokens", inp.origin))?;
        if args.json {
            let mut v = json!({
                "index": i,
                "text": text,
                "tokens": g.tokens,
                "finish": match g.finish { Finish::Eos => "eos", Finish::Length => "length" },
                "prefix": inp.prefix.and_then(name_of).map(Value::String).unwrap_or(Value::Null),
            });
            if let Some(s) = g.score {
                v["score"] = json!(s);
            }
            writeln!(out, "{v}")?;
        } else if inputs.len() == 1 {
            writeln!(out, "{text}")?;
        } else {
            writeln!(out, "[{i}] {text}")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_specs() {
        assert_eq!(
            parse_spec("e2e=runs/a").unwrap(),
            PrefixSpec {
                name: Some("e2e".into()),
                path: "runs/a".into()
            }
        );
        assert_eq!(parse_spec("runs/a").unwrap().name, None);
        // A '=' inside a path component is not a name.
        assert_eq!(parse_spec("runs/a=b").unwrap().name, None);
        assert!(parse_spec("e2e=").is_err());
    }
}
