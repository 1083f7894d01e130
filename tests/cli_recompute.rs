//! `--recompute` through the real binary on the CPU: `train`, `eval` and `bench train` accept
//! it, say that it has no effect on the CPU engine, and give the same results as without it.
//! (On the GPU engine it turns on per-layer activation recomputation; that path is exercised
//! by the GPU tests.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prefix_tune::prefix::load_prefix;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");
const NOTE: &str = "--recompute has no effect on the CPU engine";

fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny")
}

fn run(args: &[&str]) -> Output {
    let o = Command::new(BIN)
        .args(args)
        .output()
        .expect("runs the binary");
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("data.jsonl");
    let text: String = (0..5)
        .map(|i| format!("{{\"input\": \"q{i} xyz\", \"target\": \"a{i} b\"}}\n"))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn train_and_eval_accept_recompute_on_the_cpu_with_unchanged_results() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let model = llama();
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "2",
            "--prefix-len",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (plain, rec) = (dir.path().join("plain"), dir.path().join("rec"));
    let o = train(&plain, &[]);
    assert!(!err(&o).contains(NOTE), "{}", err(&o));
    let o = train(&rec, &["--recompute"]);
    assert!(
        err(&o).contains(NOTE),
        "train does not report the flag: {}",
        err(&o)
    );
    // The files differ in their recorded arguments (--out); the tensors must not.
    let (a, _) = load_prefix(&plain.join("prefix.safetensors")).unwrap();
    let (b, _) = load_prefix(&rec.join("prefix.safetensors")).unwrap();
    assert!(a.k.iter().flatten().any(|&x| x != 0.0));
    assert!(
        a.k == b.k && a.v == b.v,
        "--recompute changed the CPU-trained prefix"
    );

    let eval = |extra: &[&str]| {
        let prefix = rec.join("prefix.safetensors");
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--prefix",
            s(&prefix),
            "--data",
            s(&data),
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (e0, e1) = (eval(&[]), eval(&["--recompute"]));
    assert!(
        err(&e1).contains(NOTE),
        "eval does not report the flag: {}",
        err(&e1)
    );
    assert!(!e0.stdout.is_empty());
    assert_eq!(
        e0.stdout, e1.stdout,
        "--recompute changed eval's output on the CPU"
    );
}

#[test]
fn bench_train_reports_recompute() {
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "train",
            "--device",
            "cpu",
            "--shape",
            "tiny-gpt2",
            "--batch-size",
            "2",
            "--seq",
            "8",
            "--prefix-len",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        let row: serde_json::Value =
            serde_json::from_slice(o.stdout.trim_ascii()).expect("one JSON row");
        (row, err(&o))
    };
    let (row, e) = bench(&["--recompute"]);
    assert_eq!(row["recompute"], true, "{row}");
    assert!(e.contains(NOTE), "{e}");
    assert!(
        row.get("profile").is_none(),
        "no per-op profile on the CPU: {row}"
    );
    let (row, e) = bench(&[]);
    assert_eq!(row["recompute"], false, "{row}");
    assert!(!e.contains(NOTE), "{e}");
}

#[test]
fn help_lists_recompute() {
    for cmd in [
        &["train", "--help"][..],
        &["eval", "--help"],
        &["bench", "train", "--help"],
    ] {
        let o = run(cmd);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("--recompute"), "{cmd:?}: {out}");
    }
    let o = run(&["bench", "train", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--profile-steps"));
}
