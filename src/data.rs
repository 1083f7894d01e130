//! Datasets of `(input, target)` text pairs and the sequence convention training and evaluation
//! share.
//!
//! # File formats (chosen by extension, then by content)
//! - JSONL (`.jsonl`, or any file whose lines are JSON objects): one object per line with
//!   `"input"` and `"target"` (or `"prompt"` and `"completion"`) strings; blank lines are skipped.
//! - E2E CSV (`.csv`, or a first line `mr,ref`): a header naming the columns `mr` (the meaning
//!   representation, the input) and `ref` (the reference text, the target); fields may be quoted
//!   with `"`, quotes inside doubled (RFC 4180), quoted fields may span lines.
//! - BIG-bench `task.json` (`.json`, or a JSON object with `"examples"`): `examples[i].input` and
//!   `examples[i].target`, where a target may be a string or a list of strings (the first is used).
//!
//! Every error names the file and the line (JSONL, CSV) or the example index (BIG-bench):
//! malformed JSON, missing fields, non-string fields, empty files, binary (non-UTF-8 or NUL) data.
//!
//! # Sequence convention
//! A training sequence is `[bos] ++ tokens(input) ++ tokens(target) ++ [eos]`:
//! - input and target are tokenized separately (so the boundary is exact) with no special tokens
//!   added by the tokenizer;
//! - `bos` is present only when the tokenizer's own configuration adds one
//!   ([`Tokenizer::add_bos`]); `eos` is the tokenizer's first end-of-sequence token (none if it
//!   has none);
//! - the loss covers the target tokens and the eos only (the input positions carry no label); a
//!   batch's loss is the sum over its target tokens divided by their number;
//! - a sequence longer than the limit (`--max-len`, and the model's position table after the
//!   prefix) is cut: the input keeps at most `limit − 1` tokens (its *last* ones, so at least one
//!   target token fits), then the target (and eos) are cut at the end. Cut sequences are counted
//!   and reported; [`LongPolicy::Refuse`] makes the first one an error instead.
//!
//! # Eval split
//! [`split_by_input`] puts all examples that share an input on the same side, so no input is seen
//! in training and evaluation both; which inputs go to evaluation is decided by a seeded shuffle.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;
use crate::reference::model::{Batch, Positions};

/// One `(input, target)` pair and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub input: String,
    pub target: String,
    /// 1-based line of the file where the example starts (BIG-bench: the example's index + 1).
    pub line: usize,
}

/// The file formats [`load_examples`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    E2eCsv,
    BigBench,
}

/// Largest data file read (a sanity bound: datasets here are text).
const MAX_FILE_BYTES: u64 = 4 << 30;

/// Reads a dataset file in any supported format. Fails on an empty dataset.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).with_context(|| format!("{name}: cannot read data file"))?;
    if meta.is_dir() {
        bail!("{name}: is a directory, expected a data file (.jsonl, .csv or BIG-bench task.json)");
    }
    if meta.len() > MAX_FILE_BYTES {
        bail!("{name}: {} bytes is too large for a data file", meta.len());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read data file"))?;
    parse_examples(path, &bytes)
}

/// [`load_examples`] on a file's bytes: the format from `path`'s extension, else from the
/// content; `path` names the file in errors.
pub fn parse_examples(path: &Path, bytes: &[u8]) -> Result<Vec<Example>> {
    let name = path.display().to_string();
    let text = check_text(&name, bytes)?;
    if text.trim().is_empty() {
        bail!("{name}: the file is empty (no examples)");
    }
    let format = detect_format(path, text);
    let examples = match format {
        Format::Jsonl => parse_jsonl(&name, text)?,
        Format::E2eCsv => parse_csv(&name, text)?,
        Format::BigBench => parse_bigbench(&name, text)?,
    };
    if examples.is_empty() {
        bail!("{name}: no examples in the file");
    }
    Ok(examples)
}

/// The bytes as UTF-8 text, or an error naming the line of the first binary byte.
fn check_text<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a str> {
    let line_of = |pos: usize| 1 + bytes[..pos].iter().filter(|&&b| b == b'\n').count();
    if let Some(pos) = bytes.iter().position(|&b| b == 0) {
        bail!(
            "{name}:{}: binary data (a NUL byte at offset {pos}); expected a text data file",
            line_of(pos)
        );
    }
    match std::str::from_utf8(bytes) {
        Ok(t) => Ok(t.strip_prefix('\u{feff}').unwrap_or(t)),
        Err(e) => bail!(
            "{name}:{}: binary data (not UTF-8 text at offset {}); expected a text data file",
            line_of(e.valid_up_to()),
            e.valid_up_to()
        ),
    }
}

/// The format from the extension, else from the content.
pub fn detect_format(path: &Path, text: &str) -> Format {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("jsonl") => return Format::Jsonl,
        Some("csv") => return Format::E2eCsv,
        Some("json") => return Format::BigBench,
        _ => {}
    }
    let first_line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let header = first_line.trim().to_ascii_lowercase();
    if header.starts_with("mr,") || header.starts_with("\"mr\",") {
        return Format::E2eCsv;
    }
    // A single JSON object spanning the file with "examples" is BIG-bench; anything else
    // object-per-line is JSONL.
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) {
        if m.contains_key("examples") {
            return Format::BigBench;
        }
    }
    Format::Jsonl
}

/// Reads `{"input","target"}` or `{"prompt","completion"}` from an object.
fn pair_from_object(obj: &serde_json::Map<String, Value>) -> Result<(String, String)> {
    let (ik, tk) = if obj.contains_key("input") || obj.contains_key("target") {
        ("input", "target")
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        ("prompt", "completion")
    } else {
        let keys: Vec<&String> = obj.keys().collect();
        bail!(
            "missing fields: need \"input\" and \"target\" (or \"prompt\" and \"completion\"), found {keys:?}"
        );
    };
    let get = |k: &str| -> Result<String> {
        match obj.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!("field \"{k}\" is {}, expected a string", kind(other)),
            None => bail!("missing field \"{k}\""),
        }
    };
    Ok((get(ik)?, get(tk)?))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_jsonl(name: &str, text: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{name}:{ln}: malformed JSON: {e}"))?;
        let Value::Object(obj) = v else {
            bail!(
                "{name}:{ln}: expected a JSON object {{\"input\": …, \"target\": …}}, found {}",
                kind(&v)
            );
        };
        let (input, target) =
            pair_from_object(&obj).map_err(|e| anyhow::anyhow!("{name}:{ln}: {e}"))?;
        out.push(Example {
            input,
            target,
            line: ln,
        });
    }
    Ok(out)
}

fn parse_bigbench(name: &str, text: &str) -> Result<Vec<Example>> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{name}:{}: malformed JSON: {e}", e.line()))?;
    let Some(examples) = v.get("examples") else {
        bail!("{name}: not a BIG-bench task (no \"examples\" list)");
    };
    let Value::Array(examples) = examples else {
        bail!(
            "{name}: \"examples\" is {}, expected a list",
            kind(examples)
        );
    };
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let at = || format!("{name}: examples[{i}]");
        let Value::Object(obj) = ex else {
            bail!("{}: expected an object, found {}", at(), kind(ex));
        };
        let input = match obj.get("input") {
            Some(Value::String(s)) => s.clone(),
            Some(o) => bail!("{}: \"input\" is {}, expected a string", at(), kind(o)),
            None => bail!("{}: missing field \"input\"", at()),
        };
        let target = match obj.get("target") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => s.clone(),
                Some(o) => bail!("{}: \"target\"[0] is {}, expected a string", at(), kind(o)),
                None => bail!("{}: \"target\" is an empty list", at()),
            },
            Some(o) => bail!(
                "{}: \"target\" is {}, expected a string or a list of strings",
                at(),
                kind(o)
            ),
            None => bail!("{}: missing field \"target\"", at()),
        };
        out.push(Example {
            input,
            target,
            line: i + 1,
        });
    }
    Ok(out)
}

/// RFC 4180 records with the 1-based line each starts on.
fn csv_records(name: &str, text: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted_field = false;
        loop {
            match chars.next() {
                None => {
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some('"') if field.is_empty() && !quoted_field => {
                    quoted_field = true;
                    // Quoted: read to the closing quote.
                    loop {
                        match chars.next() {
                            None => bail!("{name}:{start}: a quoted field is not closed"),
                            Some('"') => {
                                if chars.peek() == Some(&'"') {
                                    chars.next();
                                    field.push('"');
                                } else {
                                    break;
                                }
                            }
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                        }
                    }
                    match chars.peek() {
                        None | Some(',') | Some('\n') | Some('\r') => {}
                        Some(c) => bail!(
                            "{name}:{line}: unexpected {c:?} after a closing quote (quotes inside a field are written \"\")"
                        ),
                    }
                }
                Some(',') => {
                    fields.push(std::mem::take(&mut field));
                    quoted_field = false;
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some('\n') => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some(c) => field.push(c),
            }
        }
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue; // blank line
        }
        records.push((start, fields));
    }
    Ok(records)
}

fn parse_csv(name: &str, text: &str) -> Result<Vec<Example>> {
    let records = csv_records(name, text)?;
    let Some(((hline, header), rows)) = records.split_first() else {
        bail!("{name}: the file is empty (no examples)");
    };
    let col = |want: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(want))
    };
    let (Some(mr), Some(rf)) = (col("mr"), col("ref")) else {
        bail!(
            "{name}:{hline}: the CSV header must name the columns \"mr\" and \"ref\", found {header:?}"
        );
    };
    let mut out = Vec::with_capacity(rows.len());
    for (ln, fields) in rows {
        if fields.len() != header.len() {
            bail!(
                "{name}:{ln}: {} fields, but the header has {}",
                fields.len(),
                header.len()
            );
        }
        out.push(Example {
            input: fields[mr].clone(),
            target: fields[rf].clone(),
            line: *ln,
        });
    }
    Ok(out)
}

/// Splits `examples` into (train, eval) by distinct input: a seeded shuffle of the distinct
/// inputs, the first `round(fraction · n_inputs)` (at least 1, at most all but one) go to
/// evaluation. Both sides keep the data order.
pub fn split_by_input(
    examples: &[Example],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(fraction.is_finite() && fraction > 0.0 && fraction < 1.0) {
        bail!("--eval-split must be a fraction strictly between 0 and 1, got {fraction}");
    }
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut inputs: Vec<&str> = Vec::new();
    for e in examples {
        first_seen.entry(&e.input).or_insert_with(|| {
            inputs.push(&e.input);
            inputs.len() - 1
        });
    }
    let n = inputs.len();
    if n < 2 {
        bail!("--eval-split needs at least 2 distinct inputs to split by input, the data has {n}");
    }
    let n_eval = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5EED_5B17_0000_0001));
    let mut is_eval = vec![false; n];
    for &g in &order[..n_eval] {
        is_eval[g] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for e in examples {
        if is_eval[first_seen[e.input.as_str()]] {
            eval.push(e.clone());
        } else {
            train.push(e.clone());
        }
    }
    Ok((train, eval))
}

/// What to do with a sequence longer than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LongPolicy {
    /// Cut it (see the module doc) and count it.
    #[default]
    Truncate,
    /// Fail naming the example.
    Refuse,
}

/// A tokenized example: the sequence is `input ++ target`, labels on the target part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// `[bos] ++ tokens(input)`.
    pub input: Vec<u32>,
    /// `tokens(target) ++ [eos]` (after any cut).
    pub target: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input.len() + self.target.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tokenized dataset.
#[derive(Clone, Debug)]
pub struct EncodedSet {
    pub items: Vec<Encoded>,
    /// How many sequences were cut to the limit.
    pub n_truncated: usize,
    /// The limit used.
    pub max_len: usize,
}

/// The longest sequence allowed: `requested` capped by the model's position table after a prefix
/// of `prefix_len` (GPT-2's learned positions; RoPE models have no table).
pub fn effective_max_len(
    cfg: &ModelConfig,
    requested: usize,
    prefix_len: usize,
    positions: Positions,
) -> Result<usize> {
    if requested < 2 {
        bail!("--max-len must be at least 2 (one input and one target token), got {requested}");
    }
    let mut limit = requested;
    if cfg.arch == crate::model::config::Arch::Gpt2 {
        let offset = match positions {
            Positions::AfterPrefix => prefix_len,
            Positions::FromZero => 0,
        };
        let room = cfg.max_positions.saturating_sub(offset);
        if room < 2 {
            bail!(
                "the model has {} positions; a prefix of {prefix_len} placed before the tokens \
                 leaves room for {room} (use a shorter prefix or --positions from-zero)",
                cfg.max_positions
            );
        }
        limit = limit.min(room);
    }
    // The reference checks (and the GPU engine) agree on this.
    crate::reference::model::check_positions(cfg, limit, prefix_len, positions)?;
    Ok(limit)
}

/// The sequence convention's special tokens for a tokenizer: (bos if it adds one, eos).
pub fn special_tokens(tok: &Tokenizer) -> (Option<u32>, Option<u32>) {
    let bos = if tok.add_bos() {
        tok.bos_token_id()
    } else {
        None
    };
    (bos, tok.eos_token_ids().first().copied())
}

/// Tokenizes `examples` with the sequence convention, cutting (or refusing) sequences longer than
/// `max_len`. `what` names the data in errors (e.g. the file).
pub fn encode_examples(
    tok: &Tokenizer,
    examples: &[Example],
    max_len: usize,
    policy: LongPolicy,
    what: &str,
) -> Result<EncodedSet> {
    let (bos, eos) = special_tokens(tok);
    let mut items = Vec::with_capacity(examples.len());
    let mut n_truncated = 0;
    for e in examples {
        let mut input: Vec<u32> = bos.into_iter().collect();
        input.extend(
            tok.encode(&e.input)
                .with_context(|| format!("{what}:{}: tokenizing the input", e.line))?,
        );
        let mut target = tok
            .encode(&e.target)
            .with_context(|| format!("{what}:{}: tokenizing the target", e.line))?;
        if target.is_empty() && eos.is_none() {
            bail!("{what}:{}: the target is empty and the tokenizer has no end-of-sequence token, so there is nothing to learn", e.line);
        }
        target.extend(eos);
        let len = input.len() + target.len();
        if len > max_len {
            if policy == LongPolicy::Refuse {
                bail!(
                    "{what}:{}: the sequence has {len} tokens (input {} + target and eos {}), more than the limit of {max_len} (--max-len and the model's positions); drop --refuse-long to cut such sequences",
                    e.line,
                    input.len(),
                    target.len()
                );
            }
            n_truncated += 1;
            if input.len() > max_len - 1 {
                input.drain(..input.len() - (max_len - 1));
            }
            target.truncate(max_len - input.len());
        }
        items.push(Encoded { input, target });
    }
    Ok(EncodedSet {
        items,
        n_truncated,
        max_len,
    })
}

/// A right-padded batch of encoded examples (labels on target tokens and eos), all on prefix 0.
pub fn make_batch(items: &[&Encoded], pad_id: u32) -> Batch {
    let pairs: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|e| (e.input.as_slice(), e.target.as_slice()))
        .collect();
    Batch::from_pairs(&pairs, None, pad_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_newlines() {
        let text = "mr,ref\n\"name[A], food[B]\",\"He said \"\"hi\"\"\nthen left\"\nx,y\n";
        let ex = parse_csv("t.csv", text).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].input, "name[A], food[B]");
        assert_eq!(ex[0].target, "He said \"hi\"\nthen left");
        assert_eq!(ex[0].line, 2);
        assert_eq!(ex[1].line, 4);
        assert_eq!(ex[1].input, "x");
    }
}
