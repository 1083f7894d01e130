//! Training through the real binary on the tiny fixtures: one plain SGD step equals the reference
//! gradient step, gradient accumulation equals one big batch, resume continues bit for bit, the
//! reparameterization trains and folds, a non-finite loss stops the run cleanly, `eval`'s
//! per-example losses match the reference model, and an fp16 gradient overflow (an engine
//! returning `GradOverflow`) skips its step, is reported in the metrics, and its lowered loss
//! scale survives a resume.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use prefix_tune::checkpoint::load_checkpoint;
use prefix_tune::data::{encode_examples, load_examples, make_batch, LongPolicy};
use prefix_tune::engine::{CpuEngine, DecodeCache, Engine, GradOverflow};
use prefix_tune::model::config::ModelConfig;
use prefix_tune::model::load::load_model;
use prefix_tune::optim::Optimizer;
use prefix_tune::prefix::{load_prefix, load_reparam, save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::{
    loss, loss_and_grad, Batch, LossOutput, Positions, RunOptions,
};
use prefix_tune::reference::real::rel_err;
use prefix_tune::train::{
    train, LoopState, OptimizerKind, RunSetup, ScheduleKind, TrainConfig, Trainable, TrainerState,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("runs the binary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "panic: {err}");
    out
}

fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `n` random short examples over the tiny models' character vocabulary.
fn write_data(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(seed);
    let word = |rng: &mut StdRng, len: usize| -> String {
        (0..len)
            .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
            .collect()
    };
    let mut text = String::new();
    for _ in 0..n {
        let (li, lt) = (rng.random_range(3..10), rng.random_range(2..9));
        let line = serde_json::json!({"input": word(&mut rng, li), "target": word(&mut rng, lt)});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let p = dir.join(format!("data{seed}.jsonl"));
    std::fs::write(&p, text).unwrap();
    p
}

/// A random one-prefix bank saved as a prefix file for `model_dir`.
fn write_init_prefix(
    dir: &Path,
    model_dir: &Path,
    len: usize,
    seed: u64,
) -> (PathBuf, PrefixBank<f32>) {
    let m = load_model(model_dir).unwrap();
    let c = &m.weights.config;
    let bank = PrefixBank::random(1, c.n_layers, c.n_kv_heads, len, c.head_dim, 0.5, seed);
    let meta = PrefixMeta::for_model(
        c,
        len,
        &m.fingerprint,
        Positions::AfterPrefix,
        &serde_json::json!({}),
    );
    let p = dir.join(format!("init{seed}.safetensors"));
    save_prefix(&p, &bank, &meta).unwrap();
    (p, bank)
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn step_losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|r| r.get("loss").and_then(Value::as_f64))
        .collect()
}

fn prefix_values(p: &Path) -> Vec<f32> {
    load_prefix(p).unwrap().0.to_flat()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn one_sgd_step_is_the_reference_gradient_step() {
    for model in ["llama_tiny", "gpt2_tiny"] {
        let d = tempfile::tempdir().unwrap();
        let mdir = fixture(model);
        let n = 5;
        let data = write_data(d.path(), n, 11);
        let (init, bank) = write_init_prefix(d.path(), &mdir, 3, 5);
        let out = d.path().join("run");
        let lr = 0.25f64;
        run_ok(&[
            "train",
            "--model",
            s(&mdir),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--init-prefix",
            s(&init),
            "--steps",
            "1",
            "--optimizer",
            "sgd",
            "--warmup-steps",
            "0",
            "--weight-decay",
            "0",
            "--max-grad-norm",
            "0",
            "--batch-size",
            &n.to_string(),
            "--lr",
            &lr.to_string(),
            "--device",
            "cpu",
        ]);
        // The reference: the batch-mean loss gradient over all N examples, in f64.
        let m = load_model(&mdir).unwrap();
        let ex = load_examples(&data).unwrap();
        let set = encode_examples(&m.tokenizer, &ex, 1000, LongPolicy::Truncate, "d").unwrap();
        let refs: Vec<_> = set.items.iter().collect();
        let eos = m.tokenizer.eos_token_ids()[0];
        let batch = make_batch(&refs, eos);
        let w64 = m.weights.cast::<f64>();
        let (lo, grad) = loss_and_grad(&w64, &bank.cast::<f64>(), &batch, &RunOptions::default());
        let after = prefix_values(&out.join("prefix.safetensors"));
        let delta: Vec<f64> = bank
            .to_flat()
            .iter()
            .zip(&after)
            .map(|(a, b)| *a as f64 - *b as f64)
            .collect();
        let want: Vec<f64> = grad.to_flat().iter().map(|g| lr * g).collect();
        let e = rel_err(&delta, &want);
        eprintln!("{model}: one SGD step rel err {e:.2e}");
        assert!(
            e < 1e-4,
            "{model}: update differs from -lr·grad: rel err {e}"
        );
        let got_loss = step_losses(&out)[0];
        assert!(
            (got_loss - lo.mean_loss).abs() < 1e-5 * lo.mean_loss.abs(),
            "{model}: loss {got_loss} vs reference {}",
            lo.mean_loss
        );
    }
}

#[test]
fn grad_accumulation_equals_one_big_batch() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 12, 3);
    let (init, _) = write_init_prefix(d.path(), &mdir, 4, 9);
    let common = |out: &Path, bs: &str, acc: &str| -> Vec<String> {
        [
            "train",
            "--model",
            s(&mdir),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--init-prefix",
            s(&init),
            "--steps",
            "3",
            "--optimizer",
            "sgd",
            "--lr",
            "0.5",
            "--max-grad-norm",
            "0",
            "--batch-size",
            bs,
            "--grad-accum",
            acc,
            "--device",
            "cpu",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let args_a = common(&a, "4", "1");
    let args_b = common(&b, "1", "4");
    run_ok(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    run_ok(&args_b.iter().map(String::as_str).collect::<Vec<_>>());
    let (la, lb) = (step_losses(&a), step_losses(&b));
    assert_eq!(la.len(), 3);
    let e_loss = rel_err(&la, &lb);
    let e_prefix = rel_err(
        &prefix_values(&a.join("prefix.safetensors")),
        &prefix_values(&b.join("prefix.safetensors")),
    );
    eprintln!("grad accumulation: loss rel err {e_loss:.2e}, prefix rel err {e_prefix:.2e}");
    assert!(
        e_loss < 1e-5 && e_prefix < 1e-5,
        "{la:?} vs {lb:?}, prefix {e_prefix}"
    );
    // The micro-batches hold different numbers of target tokens, so an unweighted mean of the
    // micro-batch means would not agree: the check above can fail.
    let tokens: Vec<u64> = metrics(&a)
        .iter()
        .filter_map(|r| r.get("tokens").and_then(Value::as_u64))
        .collect();
    assert_eq!(tokens.len(), 3);
}

#[test]
fn resume_continues_exactly() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 7, 21);
    let straight = d.path().join("straight");
    let split = d.path().join("split");
    let base = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            s(&mdir),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--prefix-len",
            "3",
            "--steps",
            "6",
            "--batch-size",
            "3",
            "--lr",
            "0.02",
            "--warmup-steps",
            "2",
            "--eval-split",
            "0.3",
            "--eval-every",
            "2",
            "--seed",
            "5",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let a = base(&straight);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut b = base(&split);
    b.extend(["--stop-after".to_string(), "3".to_string()]);
    run_ok(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !split.join("prefix.safetensors").exists(),
        "no final prefix after an interrupted run"
    );
    assert_eq!(step_losses(&split).len(), 3);
    run_ok(&["train", "--resume", s(&split), "--device", "cpu"]);
    let (la, lb) = (step_losses(&straight), step_losses(&split));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "loss curves differ");
    let evals = |dir: &Path| -> Vec<(u64, f64)> {
        metrics(dir)
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?)))
            .collect()
    };
    assert_eq!(evals(&straight), evals(&split));
    let (pa, pb) = (
        prefix_values(&straight.join("prefix.safetensors")),
        prefix_values(&split.join("prefix.safetensors")),
    );
    assert!(
        pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "final prefixes differ"
    );
    assert!(split.join("loss.svg").is_file() && split.join("best_prefix.safetensors").is_file());
    // A finished run cannot be resumed further.
    let o = run(&["train", "--resume", s(&split)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("complete"));
}

#[test]
fn reparam_trains_and_folds() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("gpt2_tiny");
    let data = write_data(d.path(), 6, 4);
    let out = d.path().join("r");
    run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--prefix-len",
        "5",
        "--reparam",
        "16",
        "--steps",
        "8",
        "--batch-size",
        "3",
        "--lr",
        "0.01",
        "--device",
        "cpu",
    ]);
    let (bank, meta) = load_prefix(&out.join("prefix.safetensors")).unwrap();
    assert_eq!((bank.len, meta.prefix_len), (5, 5));
    // The saved prefix is the fold of the final reparameterization.
    let r = load_reparam(&out.join("checkpoint/reparam.safetensors")).unwrap();
    assert_eq!(r.hidden, 16);
    let folded = r.fold().to_flat();
    assert!(folded
        .iter()
        .zip(bank.to_flat())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Training moved the MLP's output.
    let losses = step_losses(&out);
    assert_eq!(losses.len(), 8);
    assert!(losses.iter().all(|l| l.is_finite()));
    let args: Value = serde_json::from_str(&meta.training_args).unwrap();
    assert_eq!(args["reparam"], 16);
}

#[test]
fn training_lowers_the_loss() {
    // A small set seen many times: the prefix must fit it better than at the start.
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 4, 8);
    let out = d.path().join("fit");
    run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--eval-data",
        s(&data),
        "--out",
        s(&out),
        "--prefix-len",
        "6",
        "--steps",
        "60",
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "--device",
        "cpu",
    ]);
    let ev: Vec<f64> = metrics(&out)
        .iter()
        .filter_map(|r| r.get("eval_loss").and_then(Value::as_f64))
        .collect();
    let (first, last) = (ev[0], *ev.last().unwrap());
    eprintln!("eval loss {first:.4} -> {last:.4}");
    assert!(last < first - 0.05, "{ev:?}");
}

#[test]
fn non_finite_loss_stops_cleanly() {
    // AdamW with an absurd learning rate: the prefix grows until the loss overflows (step 5 on
    // this fixture); the run must stop there, say why, and keep the last good checkpoint.
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 6, 2);
    let out = d.path().join("nan");
    let o = run(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--prefix-len",
        "3",
        "--steps",
        "12",
        "--batch-size",
        "3",
        "--optimizer",
        "adamw",
        "--lr",
        "3e37",
        "--warmup-steps",
        "4",
        "--schedule",
        "constant",
        "--max-grad-norm",
        "0",
        "--save-every",
        "2",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a diverging run must fail");
    assert!(
        err.contains("not finite") || err.contains("non-finite"),
        "{err}"
    );
    assert!(err.contains("checkpoint"), "{err}");
    assert!(
        !out.join("prefix.safetensors").exists(),
        "no final prefix from a diverged run"
    );
    let failed_at = step_losses(&out).len() as u64 + 1;
    assert!(
        failed_at > 2,
        "diverged too early to test the checkpoint: step {failed_at}"
    );
    let ck =
        prefix_tune::checkpoint::load_checkpoint::<prefix_tune::train::TrainerState>(&out).unwrap();
    assert!(ck.state.looping.step < failed_at && ck.state.looping.step >= 2);
    assert!(ck.params.iter().all(|x| x.is_finite()));
    let (b, _) = load_prefix(&out.join("checkpoint/prefix.safetensors")).unwrap();
    assert!(b.all_finite());

    // A learning rate that overflows the very first update.
    let out2 = d.path().join("inf");
    let o = run(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out2),
        "--prefix-len",
        "3",
        "--steps",
        "3",
        "--optimizer",
        "adamw",
        "--lr",
        "1e38",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("non-finite"), "{err}");
    assert!(!out2.join("prefix.safetensors").exists());
}

#[test]
fn eval_per_example_losses_match_the_reference() {
    let d = tempfile::tempdir().unwrap();
    for model in ["llama_tiny", "gpt2_tiny"] {
        let mdir = fixture(model);
        let data = write_data(d.path(), 5, 31);
        let (init, bank) = write_init_prefix(d.path(), &mdir, 2, 3);
        for with_prefix in [true, false] {
            let mut args = vec![
                "eval",
                "--model",
                s(&mdir),
                "--data",
                s(&data),
                "--json",
                "--batch-size",
                "2",
            ];
            if with_prefix {
                args.extend(["--prefix", s(&init)]);
            }
            let o = run_ok(&args);
            let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 6);
            let m = load_model(&mdir).unwrap();
            let ex = load_examples(&data).unwrap();
            let set = encode_examples(&m.tokenizer, &ex, 1000, LongPolicy::Truncate, "d").unwrap();
            let w64 = m.weights.cast::<f64>();
            let b64 = bank.cast::<f64>();
            let mut got = Vec::new();
            let mut want = Vec::new();
            for (i, item) in set.items.iter().enumerate() {
                assert_eq!(lines[i]["index"], i);
                let batch = make_batch(&[item], m.tokenizer.eos_token_ids()[0]);
                let r = loss(
                    &w64,
                    with_prefix.then_some(&b64),
                    &batch,
                    &RunOptions::default(),
                );
                assert_eq!(
                    lines[i]["tokens"].as_u64().unwrap() as usize,
                    r.n_targets[0]
                );
                got.push(lines[i]["loss_sum"].as_f64().unwrap());
                want.push(r.loss_sum[0]);
            }
            let e = rel_err(&got, &want);
            eprintln!("{model} prefix={with_prefix}: eval rel err {e:.2e}");
            assert!(e < 1e-5, "{model}: {got:?} vs {want:?}");
            let sum = &lines[5];
            assert_eq!(sum["summary"], true);
            let mean = sum["mean_loss"].as_f64().unwrap();
            let tokens: f64 = lines[..5]
                .iter()
                .map(|l| l["tokens"].as_f64().unwrap())
                .sum();
            assert!((mean - got.iter().sum::<f64>() / tokens).abs() < 1e-9);
            assert!((sum["perplexity"].as_f64().unwrap() - mean.exp()).abs() < 1e-9 * mean.exp());
        }
    }
}

#[test]
fn init_from_a_peft_adapter_and_from_text() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 4, 17);
    // A PEFT adapter: its length (5) wins over --prefix-len; a negligible step leaves it in place.
    let adapter = mdir.join("peft_adapter");
    let (peft_bank, _) = prefix_tune::prefix::import_peft_adapter(&adapter).unwrap();
    let out = d.path().join("peft");
    let o = run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--init-prefix",
        s(&adapter),
        "--prefix-len",
        "3",
        "--steps",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "1e-12",
        "--device",
        "cpu",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("wins"));
    let got = prefix_values(&out.join("prefix.safetensors"));
    assert_eq!(
        load_prefix(&out.join("prefix.safetensors")).unwrap().0.len,
        5
    );
    let e = rel_err(&got, &peft_bank.to_flat());
    assert!(e < 1e-6, "PEFT init moved: {e}");

    // --init-text with --prefix-len: the text's tokens repeated to the length, then the model's
    // own keys/values of them.
    let m = load_model(&mdir).unwrap();
    let tokens = m.tokenizer.encode("table:").unwrap();
    let cycled: Vec<u32> = tokens.iter().copied().cycle().take(9).collect();
    let want =
        prefix_tune::reference::init::init_from_text(&m.weights.cast::<f64>(), &cycled).unwrap();
    let out = d.path().join("text");
    run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--init-text",
        "table:",
        "--prefix-len",
        "9",
        "--steps",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "1e-12",
        "--device",
        "cpu",
    ]);
    let (bank, meta) = load_prefix(&out.join("prefix.safetensors")).unwrap();
    assert_eq!((bank.len, meta.prefix_len), (9, 9));
    let e = rel_err(&bank.to_flat(), &want.to_flat());
    eprintln!("init-text rel err {e:.2e}");
    assert!(e < 1e-5, "init-text prefix differs: {e}");
}

#[test]
fn positions_convention_is_recorded_and_used() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("gpt2_tiny");
    let data = write_data(d.path(), 4, 41);
    let out = d.path().join("fz");
    run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--prefix-len",
        "4",
        "--positions",
        "from-zero",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    let (bank, meta) = load_prefix(&out.join("prefix.safetensors")).unwrap();
    assert_eq!(meta.positions, Positions::FromZero);
    // eval on the run directory takes the prefix's convention: its total matches the reference
    // run with real tokens from position 0, not after the prefix.
    let o = run_ok(&[
        "eval",
        "--model",
        s(&mdir),
        "--prefix",
        s(&out),
        "--data",
        s(&data),
        "--json",
    ]);
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = lines.last().unwrap()["loss_sum"].as_f64().unwrap();
    let m = load_model(&mdir).unwrap();
    let ex = load_examples(&data).unwrap();
    let set = encode_examples(&m.tokenizer, &ex, 1000, LongPolicy::Truncate, "d").unwrap();
    let refs: Vec<_> = set.items.iter().collect();
    let batch = make_batch(&refs, m.tokenizer.eos_token_ids()[0]);
    let w64 = m.weights.cast::<f64>();
    let b64 = bank.cast::<f64>();
    let sum = |p: Positions| -> f64 {
        loss(&w64, Some(&b64), &batch, &RunOptions { positions: p })
            .loss_sum
            .iter()
            .sum()
    };
    let (fz, ap) = (sum(Positions::FromZero), sum(Positions::AfterPrefix));
    assert!((got - fz).abs() < 1e-4 * fz, "{got} vs from-zero {fz}");
    assert!(
        (got - ap).abs() > 1e-3 * ap,
        "the conventions should differ here: {fz} vs {ap}"
    );
}

#[test]
fn epochs_visit_every_example_once_per_epoch() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let data = write_data(d.path(), 6, 51);
    let out = d.path().join("ep");
    run_ok(&[
        "train",
        "--model",
        s(&mdir),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--prefix-len",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]);
    let recs: Vec<Value> = metrics(&out)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .collect();
    assert_eq!(recs.len(), 4, "2 epochs of 6 examples in steps of 3");
    // Each epoch is a permutation: the target tokens of two steps add up to the whole data set's.
    let m = load_model(&mdir).unwrap();
    let ex = load_examples(&data).unwrap();
    let set = encode_examples(&m.tokenizer, &ex, 1000, LongPolicy::Truncate, "d").unwrap();
    let all: u64 = set.items.iter().map(|e| e.target.len() as u64).sum();
    let t: Vec<u64> = recs.iter().map(|r| r["tokens"].as_u64().unwrap()).collect();
    assert_eq!(t[0] + t[1], all);
    assert_eq!(t[2] + t[3], all);
}

/// The CPU engine posing as a mixed-precision one: a dynamic loss scale, and calls to
/// `loss_and_grad` (counted from 1) listed in `overflow_on` fail with [`GradOverflow`] as the
/// GPU engine's do (the real loss, the scale halved). Records each call's prefix, batch tokens
/// and loss.
struct OverflowingEngine {
    inner: CpuEngine,
    scale: f32,
    overflow_on: Vec<usize>,
    calls: Vec<(Vec<f32>, Vec<u32>, f64)>,
}

impl Engine for OverflowingEngine {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn describe(&self) -> String {
        "CPU engine with provoked fp16 overflows".into()
    }
    fn loss(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> anyhow::Result<LossOutput<f32>> {
        self.inner.loss(prefix, batch, opts)
    }
    fn loss_and_grad(
        &mut self,
        prefix: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> anyhow::Result<(LossOutput<f32>, PrefixBank<f32>)> {
        let (out, grad) = self.inner.loss_and_grad(prefix, batch, opts)?;
        let mean = out.loss_sum.iter().map(|&x| x as f64).sum::<f64>()
            / out.n_targets.iter().sum::<usize>() as f64;
        self.calls
            .push((prefix.to_flat(), batch.tokens.clone(), mean));
        if self.overflow_on.contains(&self.calls.len()) {
            let scale = self.scale;
            self.scale /= 2.0;
            return Err(GradOverflow {
                loss: out,
                scale,
                new_scale: self.scale,
            }
            .into());
        }
        Ok((out, grad))
    }
    fn begin_decode(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        prefix_index: &[Option<usize>],
        opts: &RunOptions,
    ) -> anyhow::Result<Box<dyn DecodeCache>> {
        self.inner.begin_decode(prefix, prefix_index, opts)
    }
    fn decode(
        &mut self,
        cache: &mut dyn DecodeCache,
        tokens: &[Vec<u32>],
    ) -> anyhow::Result<Vec<f32>> {
        self.inner.decode(cache, tokens)
    }
    fn loss_scale(&self) -> Option<f32> {
        Some(self.scale)
    }
    fn set_loss_scale(&mut self, scale: f32) {
        self.scale = scale;
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_the_scale_survives_resume() {
    let d = tempfile::tempdir().unwrap();
    let mdir = fixture("llama_tiny");
    let m = load_model(&mdir).unwrap();
    let ex = load_examples(&write_data(d.path(), 9, 61)).unwrap();
    let items = encode_examples(&m.tokenizer, &ex, 1000, LongPolicy::Truncate, "d")
        .unwrap()
        .items;
    let cfg = m.weights.config.clone();
    let weights = Arc::new(m.weights);
    let init = PrefixBank::random(1, cfg.n_layers, cfg.n_kv_heads, 3, cfg.head_dim, 0.5, 62);
    let config = TrainConfig {
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        weight_decay: 0.0,
        warmup_steps: 0,
        schedule: ScheduleKind::Constant,
        max_grad_norm: 1.0,
        steps: 6,
        batch_size: 2,
        grad_accum: 2,
        seed: 63,
        eval_every: 0,
        save_every: 0,
    };
    let meta = PrefixMeta::for_model(
        &cfg,
        3,
        &m.fingerprint,
        Positions::AfterPrefix,
        &serde_json::json!({}),
    );
    let engine = |overflow_on: Vec<usize>| OverflowingEngine {
        inner: CpuEngine::new(weights.clone()),
        scale: 65536.0,
        overflow_on,
        calls: Vec::new(),
    };
    let run = |dir: &Path,
               engine: &mut OverflowingEngine,
               trainable: Trainable,
               resume: Option<(LoopState, Optimizer)>,
               stop_after: Option<u64>| {
        let setup = RunSetup {
            out: dir,
            run: RunOptions::default(),
            pad_id: m.tokenizer.eos_token_ids()[0],
            meta: meta.clone(),
            args: serde_json::json!({}),
            stop_after,
            progress: false,
        };
        std::fs::create_dir_all(dir).unwrap();
        train(engine, &config, trainable, resume, &items, &[], &setup).unwrap()
    };

    // Two calls (micro-batches) per step; call 5 is step 3's first one.
    let clean_dir = d.path().join("clean");
    let mut clean = engine(vec![]);
    run(
        &clean_dir,
        &mut clean,
        Trainable::Bank(init.clone()),
        None,
        None,
    );
    let skip_dir = d.path().join("skip");
    let mut skip = engine(vec![5]);
    let out = run(
        &skip_dir,
        &mut skip,
        Trainable::Bank(init.clone()),
        None,
        None,
    );
    assert!(!out.stopped_early && skip_dir.join("prefix.safetensors").is_file());
    assert_eq!(out.state.step, 6, "the skipped step counts as a step");
    assert_eq!(out.state.overflow_skipped, 1);
    assert_eq!(out.state.loss_scale, Some(32768.0));
    assert_eq!(clean.calls.len(), 12);
    // The skipped step's second micro-batch is not run.
    assert_eq!(skip.calls.len(), 11);

    // Steps 1-2 are the clean run's, bit for bit, up to the overflowing call.
    for i in 0..5 {
        assert!(
            skip.calls[i].0 == clean.calls[i].0,
            "call {}: prefix",
            i + 1
        );
        assert!(skip.calls[i].1 == clean.calls[i].1, "call {}: batch", i + 1);
    }
    // The skipped step left the prefix as it was: step 4 (calls 6, 7) starts from step 3's
    // prefix, and updates it for step 5 (call 8).
    assert!(
        skip.calls[5].0 == skip.calls[4].0,
        "the skipped step changed the prefix"
    );
    assert!(
        skip.calls[7].0 != skip.calls[6].0,
        "step 4 must update the prefix"
    );
    // The data position stays aligned: step 4 reads the clean run's step-4 examples.
    assert!(skip.calls[5].1 == clean.calls[6].1, "step 4's examples");
    assert!(skip.calls[6].1 == clean.calls[7].1, "step 4's examples");

    // The step records, without the wall time.
    let recs = |dir: &Path| -> Vec<Value> {
        metrics(dir)
            .into_iter()
            .filter(|r| r.get("loss").is_some())
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("elapsed");
                r
            })
            .collect()
    };
    let (rc, rs) = (recs(&clean_dir), recs(&skip_dir));
    assert_eq!(
        rs.len(),
        6,
        "a metrics record for every step, the skipped one too"
    );
    for (i, r) in rs.iter().enumerate() {
        let step = i as u64 + 1;
        assert_eq!(r["step"].as_u64(), Some(step));
        let skipped_so_far = u64::from(step >= 3);
        assert_eq!(r["overflow_skipped"].as_u64(), Some(skipped_so_far), "{r}");
        let scale = if step >= 3 { 32768.0 } else { 65536.0 };
        assert_eq!(r["loss_scale"].as_f64(), Some(scale), "{r}");
        assert_eq!(r.get("grad_norm").is_some(), step != 3, "{r}");
        assert_eq!(rc[i]["overflow_skipped"].as_u64(), Some(0));
    }
    for i in 0..2 {
        assert_eq!(rs[i]["loss"], rc[i]["loss"], "step {}", i + 1);
        assert_eq!(rs[i]["grad_norm"], rc[i]["grad_norm"], "step {}", i + 1);
    }
    // The skipped step's loss is its first micro-batch's (the one that ran).
    let l3 = rs[2]["loss"].as_f64().unwrap();
    assert!(
        (l3 - skip.calls[4].2).abs() <= 1e-12 * l3.abs(),
        "step 3 loss {l3} vs its micro-batch's {}",
        skip.calls[4].2
    );

    // Interrupted right after the skipped step and resumed with a fresh engine: the checkpoint
    // restores the lowered scale, and the run ends where the uninterrupted one did.
    let split_dir = d.path().join("split");
    let mut first = engine(vec![5]);
    let o = run(
        &split_dir,
        &mut first,
        Trainable::Bank(init.clone()),
        None,
        Some(3),
    );
    assert!(o.stopped_early);
    let ck = load_checkpoint::<TrainerState>(&split_dir).unwrap();
    assert_eq!(ck.state.looping.step, 3);
    assert_eq!(ck.state.looping.overflow_skipped, 1);
    assert_eq!(ck.state.looping.loss_scale, Some(32768.0));
    let mut second = engine(vec![]);
    let trainable = ck.state.trainable.build(&ck.params).unwrap();
    let o = run(
        &split_dir,
        &mut second,
        trainable,
        Some((ck.state.looping.clone(), ck.optimizer.clone())),
        None,
    );
    assert_eq!(
        second.scale, 32768.0,
        "the resumed engine got the saved scale"
    );
    assert_eq!(o.state.overflow_skipped, 1);
    assert_eq!(recs(&split_dir), rs, "the resumed run's metrics");
    let (pa, pb) = (
        prefix_values(&skip_dir.join("prefix.safetensors")),
        prefix_values(&split_dir.join("prefix.safetensors")),
    );
    assert!(
        pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "the resumed run's final prefix differs"
    );
    println!(
        "RESULT train/fp16_overflow_skips_the_step: step 3 skipped (loss {l3:.4}), scale 65536 \
         -> 32768 kept across resume, final prefixes bitwise equal"
    );
}
