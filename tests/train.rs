//! Training through the real binary on the tiny fixtures: one plain SGD step equals the reference
//! gradient step, gradient accumulation equals one big batch, resume continues bit for bit, the
//! reparameterization trains and folds, a non-finite loss stops the run cleanly, and `eval`'s
//! per-example losses match the reference model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prefix_tune::data::{encode_examples, load_examples, make_batch, LongPolicy};
use prefix_tune::model::load::load_model;
use prefix_tune::prefix::{load_prefix, load_reparam, save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::{loss, loss_and_grad, Positions, RunOptions};
use prefix_tune::reference::real::rel_err;
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
    let want = prefix_tune::prefix::init_from_text(&m.weights.cast::<f64>(), &cycled).unwrap();
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
