//! The reference model on the real SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers
//! loading the same file (dequantised to f32, run in float64): next-token logits at the last
//! position of a few prompts (digits, unicode, code), the argmax, and greedy decoding of
//! "The capital of France is". Fixture: `tests/fixtures/smollm2_logits.json`, written by
//! `tools/oracle/make_fixtures.py`.
//!
//! Skipped with a message when the GGUF is absent, unless `PREFIX_TUNE_REQUIRE_ASSETS=1`.
//!
//! Tolerance: our f32 logits against HF's f64 ones, relative norm error over the recorded entries
//! (top 20 + ~50 sampled vocabulary ids) ≤ 1e-4. Measured: ≤ 1.1e-6 (max abs 3e-5); f32 through
//! 30 layers accumulates ~1e-6, so 1e-4 leaves room for summation-order changes while still
//! failing on any real mistake in a layer, which moves logits by far more than 1e-4.

mod common;

use prefix_tune::model::LoadedModel;
use prefix_tune::reference::model::{logits, Batch, RunOptions};
use prefix_tune::reference::real::rel_err;
use serde_json::Value;

const LOGIT_TOL: f64 = 1e-4;

fn smollm2() -> Option<&'static LoadedModel> {
    common::smollm2("smollm2_oracle")
}

fn fixture() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_logits.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Next-token logits `[V]` at the last position of `tokens` (no prefix).
fn last_logits(m: &LoadedModel, tokens: &[u32]) -> Vec<f32> {
    let n = tokens.len();
    let batch = Batch {
        batch: 1,
        seq: n,
        tokens: tokens.to_vec(),
        labels: vec![None; n],
        valid_len: vec![n],
        prefix_index: vec![0],
    };
    let all = logits(&m.weights, None, &batch, &RunOptions::default());
    let v = m.weights.config.vocab_size;
    all[(n - 1) * v..n * v].to_vec()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn next_token_logits_match_hf() {
    let Some(m) = smollm2() else { return };
    let fx = fixture();
    assert_eq!(
        fx["vocab_size"].as_u64().unwrap() as usize,
        m.weights.config.vocab_size
    );
    let mut worst = 0.0f64;
    for p in fx["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let toks = ids(&p["ids"]);
        let ours = last_logits(m, &toks);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut max_abs = 0.0f64;
        for e in p["top20"]
            .as_array()
            .unwrap()
            .iter()
            .chain(p["sampled"].as_array().unwrap())
        {
            let id = e[0].as_u64().unwrap() as usize;
            let want = e[1].as_f64().unwrap();
            a.push(ours[id] as f64);
            b.push(want);
            max_abs = max_abs.max((ours[id] as f64 - want).abs());
        }
        let err = rel_err(&a, &b);
        let want_arg = p["argmax"].as_u64().unwrap() as u32;
        let got_arg = argmax(&ours);
        eprintln!(
            "{text:?}: {} ids, logits rel err {err:.2e} (max abs {max_abs:.2e}), argmax ours {got_arg} HF {want_arg}",
            toks.len()
        );
        worst = worst.max(err);
        assert!(
            err <= LOGIT_TOL,
            "{text:?}: logits rel err {err:.2e} > {LOGIT_TOL:.0e}"
        );
        assert_eq!(got_arg, want_arg, "{text:?}: argmax differs from HF's");
    }
    eprintln!("worst logits rel err {worst:.2e}");
}

/// Our tokenizer gives HF's ids for the fixture prompts (the logits test feeds HF's ids).
#[test]
fn tokenizer_matches_hf_ids() {
    let Some(m) = smollm2() else { return };
    let fx = fixture();
    for p in fx["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let ours = m.tokenizer.encode(text).expect("encode");
        assert_eq!(ours, ids(&p["ids"]), "token ids of {text:?}");
    }
}

/// Greedy decoding, recomputing the whole forward at every step (no KV cache).
#[test]
fn greedy_capital_of_france() {
    let Some(m) = smollm2() else { return };
    let fx = fixture();
    let g = &fx["greedy"];
    let mut toks = ids(&g["prompt_ids"]);
    let want = ids(&g["new_ids"]);
    let n0 = toks.len();
    for _ in 0..want.len() {
        let next = argmax(&last_logits(m, &toks));
        toks.push(next);
    }
    let new = &toks[n0..];
    let text = m.tokenizer.decode(new).expect("decode");
    eprintln!(
        "greedy: {:?} -> {text:?} (HF: {:?})",
        g["prompt"].as_str().unwrap(),
        g["new_text"].as_str().unwrap()
    );
    assert_eq!(new, &want[..], "greedy continuation differs from HF's");
    assert!(
        text.starts_with(" Paris."),
        "greedy continuation {text:?} does not start with \" Paris.\""
    );
}
