//! Batched text generation over an [`Engine`]: greedy decoding, sampling (temperature, top-k,
//! top-p, seeded) and beam search (HF's scoring), stopping at end-of-sequence tokens or after a
//! number of new tokens. Requests in one batch may use different prefixes of one bank (or none).
//!
//! Conventions:
//! - a request's prompt is given as token ids (BOS already added when the tokenizer asks for it);
//! - the returned tokens are the new ones, the end-of-sequence token included when one ended the
//!   generation;
//! - sampling draws from one generator per request, seeded from the seed and the request's index,
//!   so a request's output does not depend on the batch it ran in;
//! - beam search follows HF transformers (`num_beams`, `length_penalty`, `early_stopping=False`;
//!   checked against `generate` itself in `tests/generate.rs`): each step ranks the `2·N` best
//!   continuations of all beams by summed log-probability; one ending in EOS among the first `N`
//!   becomes a finished hypothesis scored `sum_logprobs / generated_len^length_penalty` (the EOS
//!   counted in the length); the best `N` others run on; a request is done when `N` hypotheses are
//!   finished and the best running beam, scored at the current length, does not beat the worst
//!   of them; at the token limit the first `N` continuations become hypotheses; the best wins.

use anyhow::{bail, ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::{DecodeCache, Engine};
use crate::prefix::PrefixBank;
use crate::reference::model::RunOptions;

/// Sampling parameters (HF's order: temperature, then top-k, then top-p).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits; > 0.
    pub temperature: f64,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (`None`: all).
    pub top_p: Option<f64>,
    pub seed: u64,
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// The most likely token (lowest id among ties).
    Greedy,
    Sample(Sampling),
    /// Beam search with `beams` beams.
    Beam {
        beams: usize,
        length_penalty: f64,
    },
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub strategy: Strategy,
    /// Tokens that end a sequence.
    pub eos: Vec<u32>,
    pub run: RunOptions,
    /// Requests decoded together (beam search: requests, each with its beams).
    pub batch_size: usize,
}

impl GenerateOptions {
    /// Checks every parameter: finite and in range.
    pub fn check(&self) -> Result<()> {
        ensure!(self.batch_size >= 1, "the batch size must be at least 1");
        match self.strategy {
            Strategy::Greedy => {}
            Strategy::Sample(s) => {
                ensure!(
                    s.temperature.is_finite() && s.temperature > 0.0,
                    "the temperature must be a finite number > 0, got {}",
                    s.temperature
                );
                if let Some(k) = s.top_k {
                    ensure!(k >= 1, "top-k must be at least 1, got {k}");
                }
                if let Some(p) = s.top_p {
                    ensure!(
                        p.is_finite() && p > 0.0 && p <= 1.0,
                        "top-p must be in (0, 1], got {p}"
                    );
                }
            }
            Strategy::Beam {
                beams,
                length_penalty,
            } => {
                ensure!(
                    beams >= 1,
                    "the number of beams must be at least 1, got {beams}"
                );
                ensure!(
                    length_penalty.is_finite(),
                    "the length penalty must be a finite number, got {length_penalty}"
                );
            }
        }
        Ok(())
    }
}

/// One prompt to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Which prefix of the bank to use (`None`: the base model).
    pub prefix: Option<usize>,
}

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
}

/// A generated continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// New tokens (with the final EOS when one ended it).
    pub tokens: Vec<u32>,
    pub finish: Finish,
    /// Beam search: the hypothesis' score (`sum_logprobs / len^length_penalty`).
    pub score: Option<f64>,
}

/// Generates a continuation of every request; requests run in batches of `opts.batch_size`.
pub fn generate(
    engine: &mut dyn Engine,
    bank: Option<&PrefixBank<f32>>,
    requests: &[Request],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    opts.check()?;
    for (i, r) in requests.iter().enumerate() {
        ensure!(!r.prompt.is_empty(), "request {i} has an empty prompt");
        if let Some(p) = r.prefix {
            let n = bank.map_or(0, |b| b.n_prefixes);
            ensure!(
                p < n,
                "request {i} asks for prefix {p} but {n} prefixes were given"
            );
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for start in (0..requests.len()).step_by(opts.batch_size) {
        let ids: Vec<usize> = (start..(start + opts.batch_size).min(requests.len())).collect();
        let part = match opts.strategy {
            Strategy::Beam {
                beams,
                length_penalty,
            } => beam_batch(engine, bank, requests, &ids, opts, beams, length_penalty)?,
            _ => sample_batch(engine, bank, requests, &ids, opts)?,
        };
        out.extend(part);
    }
    Ok(out)
}

/// Index of the largest value (the first among ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// `log softmax(row)` in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Draws a token from `row` with temperature, top-k and top-p applied (in that order).
pub fn sample_token(row: &[f32], s: &Sampling, rng: &mut StdRng) -> usize {
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Most likely first; ties by id so the result never depends on the sort's stability.
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let top = row[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((row[i] as f64 - top) / s.temperature).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(p) = s.top_p {
        // The smallest head of the sorted list whose mass reaches p (at least one token).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (j, &q) in probs.iter().enumerate() {
            mass += q;
            if mass >= p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let z: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * z;
    for (j, &q) in probs.iter().enumerate() {
        if u < q {
            return order[j];
        }
        u -= q;
    }
    order[probs.len() - 1]
}

/// The generator of request `index` for a seed (`prefix-tune serve` draws choice `index` of a
/// request with it, so a seeded request samples what `generate` does for the same input).
pub fn request_rng(seed: u64, index: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn begin(
    engine: &mut dyn Engine,
    bank: Option<&PrefixBank<f32>>,
    prefixes: Vec<Option<usize>>,
    opts: &GenerateOptions,
) -> Result<Box<dyn DecodeCache>> {
    engine.begin_decode(bank, &prefixes, &opts.run)
}

/// Greedy decoding or sampling of the requests `ids`.
fn sample_batch(
    engine: &mut dyn Engine,
    bank: Option<&PrefixBank<f32>>,
    requests: &[Request],
    ids: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let vocab = engine.config().vocab_size;
    let mut out: Vec<Generation> = ids
        .iter()
        .map(|_| Generation {
            tokens: Vec::new(),
            finish: Finish::Length,
            score: None,
        })
        .collect();
    if opts.max_new_tokens == 0 || ids.is_empty() {
        return Ok(out);
    }
    let mut rngs: Vec<Option<StdRng>> = ids
        .iter()
        .map(|&i| match opts.strategy {
            Strategy::Sample(s) => Some(request_rng(s.seed, i)),
            _ => None,
        })
        .collect();
    let mut cache = begin(
        engine,
        bank,
        ids.iter().map(|&i| requests[i].prefix).collect(),
        opts,
    )?;
    let prompts: Vec<Vec<u32>> = ids.iter().map(|&i| requests[i].prompt.clone()).collect();
    let mut logits = engine.decode(cache.as_mut(), &prompts)?;
    // Positions (in `ids`) of the sequences still in the cache, in cache order.
    let mut active: Vec<usize> = (0..ids.len()).collect();
    for step in 0..opts.max_new_tokens {
        ensure!(
            logits.len() == active.len() * vocab,
            "engine returned {} logits for {} sequences of vocabulary {vocab}",
            logits.len(),
            active.len()
        );
        let mut keep = Vec::new();
        let mut next = Vec::new();
        for (row, &a) in active.iter().enumerate() {
            let z = &logits[row * vocab..(row + 1) * vocab];
            let t = match (&opts.strategy, rngs[a].as_mut()) {
                (Strategy::Sample(s), Some(rng)) => sample_token(z, s, rng),
                _ => argmax(z),
            } as u32;
            out[a].tokens.push(t);
            if opts.eos.contains(&t) {
                out[a].finish = Finish::Eos;
            } else {
                keep.push(row);
                next.push(vec![t]);
            }
        }
        if step + 1 == opts.max_new_tokens || keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.reorder(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
        }
        logits = engine.decode(cache.as_mut(), &next)?;
    }
    Ok(out)
}

/// A running beam.
#[derive(Clone, Debug)]
struct Beam {
    tokens: Vec<u32>,
    /// Summed log-probability of `tokens`.
    sum_logprobs: f64,
}

/// Finished hypotheses of one request (at most `beams`, the best kept).
#[derive(Debug, Default)]
struct Hypotheses {
    list: Vec<(f64, Vec<u32>, Finish)>,
}

impl Hypotheses {
    fn worst(&self) -> f64 {
        self.list.iter().map(|h| h.0).fold(f64::INFINITY, f64::min)
    }

    fn add(&mut self, score: f64, tokens: Vec<u32>, finish: Finish, beams: usize) {
        if self.list.len() < beams || score > self.worst() {
            self.list.push((score, tokens, finish));
            if self.list.len() > beams {
                // Drop the worst (the last one among equals, so earlier hypotheses win ties).
                let mut w = 0;
                for (i, h) in self.list.iter().enumerate() {
                    if h.0 <= self.list[w].0 {
                        w = i;
                    }
                }
                self.list.remove(w);
            }
        }
    }

    fn best(&self) -> Option<&(f64, Vec<u32>, Finish)> {
        let mut best: Option<&(f64, Vec<u32>, Finish)> = None;
        for h in &self.list {
            if best.map_or(true, |b| h.0 > b.0) {
                best = Some(h);
            }
        }
        best
    }
}

/// `sum_logprobs / len^length_penalty`.
fn beam_score(sum_logprobs: f64, len: usize, length_penalty: f64) -> f64 {
    sum_logprobs / (len.max(1) as f64).powf(length_penalty)
}

/// Beam search over the requests `ids`.
fn beam_batch(
    engine: &mut dyn Engine,
    bank: Option<&PrefixBank<f32>>,
    requests: &[Request],
    ids: &[usize],
    opts: &GenerateOptions,
    n_beams: usize,
    length_penalty: f64,
) -> Result<Vec<Generation>> {
    let vocab = engine.config().vocab_size;
    let mut hyps: Vec<Hypotheses> = ids.iter().map(|_| Hypotheses::default()).collect();
    if opts.max_new_tokens == 0 || ids.is_empty() {
        return Ok(ids
            .iter()
            .map(|_| Generation {
                tokens: Vec::new(),
                finish: Finish::Length,
                score: None,
            })
            .collect());
    }
    let mut cache = begin(
        engine,
        bank,
        ids.iter().map(|&i| requests[i].prefix).collect(),
        opts,
    )?;
    let prompts: Vec<Vec<u32>> = ids.iter().map(|&i| requests[i].prompt.clone()).collect();
    let mut logits = engine.decode(cache.as_mut(), &prompts)?;
    // Running requests (positions in `ids`) with their beams; the cache holds their beams'
    // rows in this order. Before the first step each request has one row (its prompt).
    let mut running: Vec<(usize, Vec<Beam>)> = (0..ids.len())
        .map(|a| {
            (
                a,
                vec![Beam {
                    tokens: Vec::new(),
                    sum_logprobs: 0.0,
                }],
            )
        })
        .collect();
    for step in 0..opts.max_new_tokens {
        let rows: usize = running.iter().map(|(_, b)| b.len()).sum();
        ensure!(
            logits.len() == rows * vocab,
            "engine returned {} logits for {rows} sequences of vocabulary {vocab}",
            logits.len()
        );
        let gen_len = step + 1;
        let last_step = step + 1 == opts.max_new_tokens;
        let mut row0 = 0;
        let mut next_running = Vec::new();
        let mut next_rows = Vec::new();
        let mut next_tokens = Vec::new();
        for (a, beams) in running {
            // Every continuation of every beam, scored by summed log-probability.
            let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(beams.len() * vocab);
            for (j, beam) in beams.iter().enumerate() {
                let r = row0 + j;
                let lp = log_softmax(&logits[r * vocab..(r + 1) * vocab]);
                cands.extend(
                    lp.iter()
                        .enumerate()
                        .map(|(t, &l)| (beam.sum_logprobs + l, j, t as u32)),
                );
            }
            let take = (2 * n_beams).min(cands.len());
            cands.select_nth_unstable_by(take.saturating_sub(1), |x, y| {
                y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2)))
            });
            cands.truncate(take);
            cands.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
            row0 += beams.len();
            if last_step {
                // At the token limit every candidate is finished; as for EOS, only the first N
                // (by summed log-probability) may become hypotheses.
                for &(s, j, t) in cands.iter().take(n_beams) {
                    let mut tokens = beams[j].tokens.clone();
                    tokens.push(t);
                    let finish = if opts.eos.contains(&t) {
                        Finish::Eos
                    } else {
                        Finish::Length
                    };
                    hyps[a].add(
                        beam_score(s, gen_len, length_penalty),
                        tokens,
                        finish,
                        n_beams,
                    );
                }
                continue;
            }
            let mut new_beams = Vec::with_capacity(n_beams);
            let mut sources = Vec::with_capacity(n_beams);
            for (rank, &(s, j, t)) in cands.iter().enumerate() {
                let mut tokens = beams[j].tokens.clone();
                tokens.push(t);
                if opts.eos.contains(&t) {
                    // Only an EOS among the first N candidates finishes a hypothesis.
                    if rank < n_beams {
                        hyps[a].add(
                            beam_score(s, gen_len, length_penalty),
                            tokens,
                            Finish::Eos,
                            n_beams,
                        );
                    }
                } else {
                    new_beams.push(Beam {
                        tokens,
                        sum_logprobs: s,
                    });
                    sources.push(row0 - beams.len() + j);
                    if new_beams.len() == n_beams {
                        break;
                    }
                }
            }
            // Done when N hypotheses are finished and the best running beam, scored at the
            // current length, cannot beat the worst of them (HF's `early_stopping=False`).
            let Some(best_running) = new_beams.first().map(|b| b.sum_logprobs) else {
                continue;
            };
            if hyps[a].list.len() >= n_beams
                && hyps[a].worst() >= beam_score(best_running, gen_len, length_penalty)
            {
                continue;
            }
            next_rows.extend(sources);
            next_tokens.extend(new_beams.iter().map(|b| vec![*b.tokens.last().unwrap()]));
            next_running.push((a, new_beams));
        }
        running = next_running;
        if running.is_empty() {
            break;
        }
        cache.reorder(&next_rows)?;
        logits = engine.decode(cache.as_mut(), &next_tokens)?;
    }
    ids.iter()
        .enumerate()
        .map(|(a, _)| {
            let Some((score, tokens, finish)) = hyps[a].best() else {
                bail!(
                    "beam search ended without a hypothesis for request {}",
                    ids[a]
                );
            };
            Ok(Generation {
                tokens: tokens.clone(),
                finish: *finish,
                score: Some(*score),
            })
        })
        .collect()
}
