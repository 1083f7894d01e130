//! The CPU reference against HF transformers + PEFT.
//!
//! The fixtures (`tests/fixtures/{gpt2_tiny,llama_tiny}/`, `oracle_{gpt2,llama}.json`) were made by
//! `tools/oracle/make_fixtures.py`: tiny random HF models (GPT-2 saved in f32, Llama in bf16 with
//! GQA and an untied head), a PEFT prefix-tuning adapter on each, and a right-padded batch whose
//! losses, logits and prefix gradient HF + PEFT computed in float64 from the saved files. Here we
//! load the same files with our loader and PEFT import, run the reference model in f32 and f64
//! and compare: per-example losses, the batch mean, sampled logits, and the gradient of the mean
//! loss mapped back to PEFT's `prompt_embeddings` layout.
//!
//! Tolerances: f32 losses rel ≤ 1e-5 and gradients rel ≤ 1e-4 (against f64); f64 rel ≤ 1e-12
//! (the weights are exactly representable, so only summation order differs; measured ~1e-15).

use std::path::{Path, PathBuf};

use prefix_tune::model::{load_model, LoadedModel, ModelWeights};
use prefix_tune::prefix::{import_peft_adapter, to_peft, PrefixBank};
use prefix_tune::reference::model::{
    logits, loss, loss_and_grad, Batch, LossOutput, Positions, RunOptions,
};
use prefix_tune::reference::real::{rel_err, Real};
use serde_json::Value;

const F32_LOSS_TOL: f64 = 1e-5;
const F32_GRAD_TOL: f64 = 1e-4;
const F32_LOGIT_TOL: f64 = 1e-5;
const F64_TOL: f64 = 1e-12;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Oracle {
    name: &'static str,
    json: Value,
    model: LoadedModel,
    bank: PrefixBank<f32>,
    batch: Batch,
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("number list")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn matrix(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("matrix")
        .iter()
        .flat_map(f64s)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("integer list")
        .iter()
        .map(|x| x.as_u64().expect("integer") as usize)
        .collect()
}

fn load(name: &'static str, family: &str) -> Oracle {
    let dir = fixtures();
    let json_path = dir.join(format!("oracle_{family}.json"));
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", json_path.display()));
    let json: Value = serde_json::from_str(&text).expect("oracle JSON");
    let model_dir = dir.join(json["model_dir"].as_str().unwrap());
    let model =
        load_model(&model_dir).unwrap_or_else(|e| panic!("loading {}: {e:#}", model_dir.display()));
    let adapter = dir.join(json["adapter_dir"].as_str().unwrap());
    let (bank, _cfg) = import_peft_adapter(&adapter)
        .unwrap_or_else(|e| panic!("importing {}: {e:#}", adapter.display()));

    let (b, t) = (
        json["batch"].as_u64().unwrap() as usize,
        json["seq"].as_u64().unwrap() as usize,
    );
    let tokens: Vec<u32> = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| usizes(r).into_iter().map(|x| x as u32))
        .collect();
    let labels: Vec<Option<u32>> = json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().map(|v| v as u32))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!((tokens.len(), labels.len()), (b * t, b * t));
    let batch = Batch {
        batch: b,
        seq: t,
        tokens,
        labels,
        valid_len: usizes(&json["valid_len"]),
        prefix_index: vec![0; b],
    };
    Oracle {
        name,
        json,
        model,
        bank,
        batch,
    }
}

fn gpt2() -> Oracle {
    load("gpt2_tiny", "gpt2")
}

fn llama() -> Oracle {
    load("llama_tiny", "llama")
}

/// Worst per-example relative error of the summed losses, and the mean loss's.
fn loss_errors<T: Real>(ours: &LossOutput<T>, want: &Value, n_targets: &[usize]) -> (f64, f64) {
    assert_eq!(ours.n_targets, n_targets, "target counts");
    let want_sum = f64s(&want["loss_sum"]);
    let worst = ours
        .loss_sum
        .iter()
        .zip(&want_sum)
        .map(|(a, b)| (a.f64() - b).abs() / b.abs())
        .fold(0.0, f64::max);
    let total: usize = n_targets.iter().sum();
    let want_mean = want_sum.iter().sum::<f64>() / total as f64;
    if let Some(m) = want.get("mean_loss") {
        assert!((m.as_f64().unwrap() - want_mean).abs() < 1e-12 * want_mean);
    }
    let mean = (ours.mean_loss.f64() - want_mean).abs() / want_mean;
    (worst, mean)
}

fn check_losses<T: Real>(o: &Oracle, label: &str, ours: &LossOutput<T>, want: &Value, tol: f64) {
    let n_targets = usizes(&o.json["n_targets"]);
    let (worst, mean) = loss_errors(ours, want, &n_targets);
    eprintln!(
        "{} {label}: per-example loss worst rel err {worst:.2e}, mean loss rel err {mean:.2e}",
        o.name
    );
    assert!(
        worst <= tol && mean <= tol,
        "{} {label}: loss rel err {worst:.2e} / {mean:.2e} > {tol:.0e}",
        o.name
    );
}

/// Our sampled logits against the oracle's `[b, t, v, value]` samples: relative norm error.
fn logits_error<T: Real>(o: &Oracle, ours: &[T], samples: &Value) -> f64 {
    let (t_n, v_n) = (o.batch.seq, o.model.weights.config.vocab_size);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in samples.as_array().unwrap() {
        let s = s.as_array().unwrap();
        let (bi, ti, vi) = (
            s[0].as_u64().unwrap() as usize,
            s[1].as_u64().unwrap() as usize,
            s[2].as_u64().unwrap() as usize,
        );
        a.push(ours[(bi * t_n + ti) * v_n + vi].f64());
        b.push(s[3].as_f64().unwrap());
    }
    rel_err(&a, &b)
}

fn run_all<T: Real>(o: &Oracle, tol_loss: f64, tol_grad: f64, tol_logit: f64) {
    let m: ModelWeights<T> = o.model.weights.cast();
    let bank: PrefixBank<T> = o.bank.cast();
    let after = RunOptions {
        positions: Positions::AfterPrefix,
    };
    let ty = std::any::type_name::<T>();

    // The imported adapter holds the oracle's prompt_embeddings (f32 values; serde_json's
    // default float parsing may be off by an ulp of f64).
    let pe = matrix(&o.json["prompt_embeddings"]);
    let imported = to_peft(&o.bank, 0);
    let e = rel_err(&imported, &pe);
    assert!(
        e < 1e-15,
        "{}: imported prompt_embeddings differ from the oracle's ({e:.2e})",
        o.name
    );

    // Prefix: losses and the gradient of the mean loss in PEFT's layout.
    let (out, grad) = loss_and_grad(&m, &bank, &o.batch, &after);
    check_losses(
        o,
        &format!("{ty} prefix"),
        &out,
        &o.json["prefix"],
        tol_loss,
    );
    let ours_grad = to_peft(&grad, 0);
    let want_grad = matrix(&o.json["prefix"]["grad_mean_loss"]);
    let g_err = rel_err(&ours_grad, &want_grad);
    eprintln!("{} {ty} prefix gradient rel err {g_err:.2e}", o.name);
    assert!(
        g_err <= tol_grad,
        "{} {ty}: prefix gradient rel err {g_err:.2e} > {tol_grad:.0e}",
        o.name
    );
    // `loss` agrees with `loss_and_grad`.
    let out2 = loss(&m, Some(&bank), &o.batch, &after);
    check_losses(
        o,
        &format!("{ty} prefix (loss)"),
        &out2,
        &o.json["prefix"],
        tol_loss,
    );

    // Base model (no prefix).
    let base = loss(&m, None, &o.batch, &after);
    check_losses(o, &format!("{ty} base"), &base, &o.json["base"], tol_loss);

    // Prefix with positions from zero.
    let zero = loss(
        &m,
        Some(&bank),
        &o.batch,
        &RunOptions {
            positions: Positions::FromZero,
        },
    );
    check_losses(
        o,
        &format!("{ty} prefix, positions from zero"),
        &zero,
        &o.json["prefix_positions_from_zero"],
        tol_loss,
    );

    // Sampled logits, with and without the prefix.
    let lg = logits(&m, Some(&bank), &o.batch, &after);
    let e1 = logits_error(o, &lg, &o.json["prefix"]["logits_samples"]);
    let lg0 = logits(&m, None, &o.batch, &after);
    let e0 = logits_error(o, &lg0, &o.json["base"]["logits_samples"]);
    eprintln!(
        "{} {ty} sampled logits rel err: prefix {e1:.2e}, base {e0:.2e}",
        o.name
    );
    assert!(
        e1 <= tol_logit && e0 <= tol_logit,
        "{} {ty}: logits rel err {e1:.2e} / {e0:.2e} > {tol_logit:.0e}",
        o.name
    );
}

/// Three sequences, each with its own copy of the prefix: the gradient of prefix i is PEFT's
/// gradient of sequence i's summed loss over the batch's target count.
fn per_sequence_prefixes(o: &Oracle) {
    let m = &o.model.weights;
    let b = o.batch.batch;
    let bank = PrefixBank::stack(&vec![o.bank.clone(); b]).expect("stack");
    let batch = o.batch.clone().with_prefix_index((0..b).collect());
    let (out, grad) = loss_and_grad(m, &bank, &batch, &RunOptions::default());
    check_losses(
        o,
        "f32 one prefix per sequence",
        &out,
        &o.json["prefix"],
        F32_LOSS_TOL,
    );
    let total: usize = usizes(&o.json["n_targets"]).iter().sum();
    let per = o.json["prefix"]["grad_loss_sum_per_example"]
        .as_array()
        .unwrap();
    let mut worst = 0.0f64;
    for (i, g) in per.iter().enumerate() {
        let want: Vec<f64> = matrix(g).iter().map(|x| x / total as f64).collect();
        let e = rel_err(&to_peft(&grad, i), &want);
        worst = worst.max(e);
    }
    eprintln!(
        "{} f32 per-sequence prefix gradients worst rel err {worst:.2e}",
        o.name
    );
    assert!(worst <= F32_GRAD_TOL, "{}: {worst:.2e}", o.name);
}

/// Negative control: a slightly perturbed prefix (std 0.05 noise on std-0.5 values) must miss
/// the loss tolerance, which proves the prefix matters at this weight scale.
fn perturbed_prefix_fails(o: &Oracle) {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let noise = Normal::new(0.0, 0.05).unwrap();
    let mut bank = o.bank.clone();
    for l in 0..bank.n_layers {
        for x in bank.k[l].iter_mut().chain(bank.v[l].iter_mut()) {
            *x += noise.sample(&mut rng) as f32;
        }
    }
    let out = loss(
        &o.model.weights,
        Some(&bank),
        &o.batch,
        &RunOptions::default(),
    );
    let (worst, mean) = loss_errors(&out, &o.json["prefix"], &usizes(&o.json["n_targets"]));
    eprintln!(
        "{} perturbed prefix: per-example loss worst rel err {worst:.2e} (must exceed {F32_LOSS_TOL:.0e})",
        o.name
    );
    assert!(
        worst > 10.0 * F32_LOSS_TOL && mean > F32_LOSS_TOL,
        "{}: a perturbed prefix still matches the oracle ({worst:.2e}, {mean:.2e})",
        o.name
    );
    // Likewise the base model's losses are far from the prefix oracle's.
    let base = loss(&o.model.weights, None, &o.batch, &RunOptions::default());
    let (w2, _) = loss_errors(&base, &o.json["prefix"], &usizes(&o.json["n_targets"]));
    assert!(
        w2 > 100.0 * F32_LOSS_TOL,
        "{}: no-prefix loss rel err {w2:.2e}",
        o.name
    );
}

#[test]
fn gpt2_f32_matches_hf_peft() {
    run_all::<f32>(&gpt2(), F32_LOSS_TOL, F32_GRAD_TOL, F32_LOGIT_TOL);
}

#[test]
fn gpt2_f64_matches_hf_peft() {
    run_all::<f64>(&gpt2(), F64_TOL, F64_TOL, F64_TOL);
}

#[test]
fn llama_f32_matches_hf_peft() {
    run_all::<f32>(&llama(), F32_LOSS_TOL, F32_GRAD_TOL, F32_LOGIT_TOL);
}

#[test]
fn llama_f64_matches_hf_peft() {
    run_all::<f64>(&llama(), F64_TOL, F64_TOL, F64_TOL);
}

#[test]
fn gpt2_per_sequence_prefixes() {
    per_sequence_prefixes(&gpt2());
}

#[test]
fn llama_per_sequence_prefixes() {
    per_sequence_prefixes(&llama());
}

#[test]
fn gpt2_perturbed_prefix_fails() {
    perturbed_prefix_fails(&gpt2());
}

#[test]
fn llama_perturbed_prefix_fails() {
    perturbed_prefix_fails(&llama());
}

/// The fixtures' configs are what the oracle says (guards against a loader silently reading a
/// default, e.g. transformers 5's `rope_parameters.rope_theta`).
#[test]
fn fixture_configs() {
    let g = gpt2();
    let c = &g.model.weights.config;
    assert_eq!(
        (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads),
        (97, 48, 2, 4, 4)
    );
    assert!(c.tied_embeddings && c.max_positions == 64);
    let l = llama();
    let c = &l.model.weights.config;
    assert_eq!(
        (
            c.vocab_size,
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.d_ff
        ),
        (97, 48, 2, 6, 2, 80)
    );
    assert!(!c.tied_embeddings && l.model.weights.lm_head.is_some());
    assert_eq!(c.rope_theta, 25000.0);
    for o in [&g, &l] {
        let c = &o.model.weights.config;
        let p = o.json["num_virtual_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            (
                o.bank.n_prefixes,
                o.bank.n_layers,
                o.bank.kv_heads,
                o.bank.len,
                o.bank.head_dim
            ),
            (1, c.n_layers, c.n_kv_heads, p, c.head_dim)
        );
    }
}
