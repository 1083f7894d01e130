//! Bad input to `train` and `eval`, through the real binary: every case exits non-zero with a
//! message on stderr, never panics, and leaves nothing in `--out`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prefix_tune::model::load::load_model;
use prefix_tune::prefix::{save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::Positions;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("runs the binary")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    llama: PathBuf,
    gpt2: PathBuf,
    data: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("good.jsonl");
        let mut text = String::new();
        for i in 0..6 {
            text.push_str(&format!(
                "{{\"input\": \"in{i} abc\", \"target\": \"out{i}\"}}\n"
            ));
        }
        std::fs::write(&data, text).unwrap();
        Env {
            dir,
            llama: fixture("llama_tiny"),
            gpt2: fixture("gpt2_tiny"),
            data,
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        p
    }
    /// A prefix file for `model_dir`.
    fn prefix_for(&self, model_dir: &Path, name: &str) -> PathBuf {
        let m = load_model(model_dir).unwrap();
        let c = &m.weights.config;
        let bank = PrefixBank::random(1, c.n_layers, c.n_kv_heads, 2, c.head_dim, 0.5, 1);
        let meta = PrefixMeta::for_model(
            c,
            2,
            &m.fingerprint,
            Positions::AfterPrefix,
            &serde_json::json!({}),
        );
        let p = self.path(name);
        save_prefix(&p, &bank, &meta).unwrap();
        p
    }
}

/// Runs a failing command and checks the failure is clean; returns stderr.
fn fails(args: &[&str], out: Option<&Path>, wants: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{args:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(!err.trim().is_empty(), "{args:?}: no message");
    let lower = err.to_lowercase();
    for w in wants {
        assert!(
            lower.contains(&w.to_lowercase()),
            "{args:?}: stderr lacks {w:?}: {err}"
        );
    }
    if let Some(out) = out {
        let left: Vec<_> = std::fs::read_dir(out)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{args:?} left {left:?} in {}",
            out.display()
        );
    }
    err
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "2",
        "--prefix-len",
        "2",
        "--device",
        "cpu",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn train_refuses_bad_paths_and_data() {
    let e = Env::new();
    let out = e.path("out");
    let (l, d, o) = (s(&e.llama), s(&e.data), s(&out));
    fails(
        &train_args("/no/such/model", d, o, &[]),
        Some(&out),
        &["no such file"],
    );
    fails(
        &train_args(l, "/no/such/data.jsonl", o, &[]),
        Some(&out),
        &["data.jsonl", "no such file"],
    );
    let bad = e.file(
        "bad.jsonl",
        b"{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\" \"target\": \"b\"}\n",
    );
    fails(
        &train_args(l, s(&bad), o, &[]),
        Some(&out),
        &["bad.jsonl:2", "malformed JSON"],
    );
    let miss = e.file(
        "miss.jsonl",
        b"{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\"}\n",
    );
    fails(
        &train_args(l, s(&miss), o, &[]),
        Some(&out),
        &["miss.jsonl:2", "target"],
    );
    let empty = e.file("empty.jsonl", b"");
    fails(
        &train_args(l, s(&empty), o, &[]),
        Some(&out),
        &["empty.jsonl", "empty"],
    );
    let bin = e.file(
        "bin.jsonl",
        &[0x7f, b'E', b'L', b'F', 0, 0, 1, 2, 0xff, 0xfe],
    );
    fails(
        &train_args(l, s(&bin), o, &[]),
        Some(&out),
        &["bin.jsonl", "binary"],
    );
    fails(
        &train_args(l, d, o, &["--eval-data", "/no/such/eval.jsonl"]),
        Some(&out),
        &["eval.jsonl"],
    );
    assert!(!out.exists());
}

#[test]
fn train_refuses_long_sequences_under_the_flag_and_counts_cuts_otherwise() {
    let e = Env::new();
    let long = e.file(
        "long.jsonl",
        format!(
            "{{\"input\": \"short\", \"target\": \"ok\"}}\n{{\"input\": \"{}\", \"target\": \"{}\"}}\n",
            "a".repeat(50),
            "b".repeat(50)
        )
        .as_bytes(),
    );
    let out = e.path("long_out");
    fails(
        &train_args(
            s(&e.gpt2),
            s(&long),
            s(&out),
            &["--max-len", "40", "--refuse-long"],
        ),
        Some(&out),
        &["long.jsonl:2", "40"],
    );
    // Without the flag: cut, counted, trained. GPT-2's 64 positions also bound the length.
    let o = run(&train_args(
        s(&e.gpt2),
        s(&long),
        s(&out),
        &["--max-len", "1000"],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 of 2") && err.contains("cut"), "{err}");
    assert!(
        err.contains("62 tokens"),
        "GPT-2 limit after a prefix of 2: {err}"
    );
}

#[test]
fn train_refuses_bad_prefix_sizes_and_hyperparameters() {
    let e = Env::new();
    let out = e.path("out");
    let (l, d, o) = (s(&e.llama), s(&e.data), s(&out));
    let mk = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train", "--model", l, "--data", d, "--out", o, "--device", "cpu", "--steps", "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let cases: Vec<(Vec<&'static str>, &[&str])> = vec![
        (vec!["--prefix-len", "0"], &["prefix-len"]),
        (vec!["--prefix-len", "100000000"], &["prefix-len"]),
        (vec!["--prefix-len", "-3"], &["prefix-len"]),
        (vec!["--lr", "-0.1"], &["--lr"]),
        (vec!["--lr", "NaN"], &["--lr"]),
        (vec!["--lr", "inf"], &["--lr"]),
        (vec!["--weight-decay", "-1"], &["--weight-decay"]),
        (vec!["--max-grad-norm", "nan"], &["--max-grad-norm"]),
        (vec!["--eval-split", "1.5"], &["eval-split"]),
        (vec!["--eval-split", "nan"], &["eval-split"]),
        (vec!["--batch-size", "0"], &["batch-size"]),
        (vec!["--grad-accum", "0"], &["grad-accum"]),
        (vec!["--epochs", "-1"], &["epochs"]),
        (vec!["--max-len", "1"], &["max-len"]),
        (vec!["--reparam", "1000000"], &["reparam"]),
        (vec!["--warmup-steps", "-4"], &["warmup-steps"]),
        (vec!["--reparam", "8", "--init-text", "abc"], &["reparam"]),
    ];
    for (extra, wants) in cases {
        let args = mk(&extra);
        fails(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            Some(&out),
            wants,
        );
    }
    // The GPT-2 fixture has 64 positions: a prefix that leaves no room is refused.
    fails(
        &[
            "train",
            "--model",
            s(&e.gpt2),
            "--data",
            d,
            "--out",
            o,
            "--prefix-len",
            "64",
            "--device",
            "cpu",
        ],
        Some(&out),
        &["positions"],
    );
    assert!(!out.exists());
}

#[test]
fn train_refuses_an_out_that_cannot_be_created_or_holds_a_run() {
    let e = Env::new();
    let file = e.file("a_file", b"x");
    let under_file = file.join("out");
    fails(
        &train_args(s(&e.llama), s(&e.data), s(&under_file), &[]),
        None,
        &["--out", "not a directory"],
    );
    fails(
        &train_args(s(&e.llama), s(&e.data), s(&file), &[]),
        None,
        &["--out", "not a directory"],
    );
    // A previous run is not overwritten silently.
    let out = e.path("run");
    let ok = run(&train_args(s(&e.llama), s(&e.data), s(&out), &[]));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let before = std::fs::read(out.join("prefix.safetensors")).unwrap();
    fails(
        &train_args(s(&e.llama), s(&e.data), s(&out), &["--seed", "9"]),
        None,
        &["previous run", "--resume"],
    );
    assert_eq!(
        std::fs::read(out.join("prefix.safetensors")).unwrap(),
        before
    );
    // --resume of a directory without a checkpoint.
    let empty = e.path("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &["train", "--resume", s(&empty)],
        Some(&empty),
        &["no checkpoint"],
    );
}

#[test]
fn prefixes_for_another_model_or_of_the_wrong_shape_are_refused() {
    let e = Env::new();
    let out = e.path("out");
    let gpt2_prefix = e.prefix_for(&e.gpt2, "gpt2.safetensors");
    // train --init-prefix and eval --prefix on the other model.
    fails(
        &train_args(
            s(&e.llama),
            s(&e.data),
            s(&out),
            &["--init-prefix", s(&gpt2_prefix)],
        ),
        Some(&out),
        &["another model"],
    );
    fails(
        &[
            "eval",
            "--model",
            s(&e.llama),
            "--prefix",
            s(&gpt2_prefix),
            "--data",
            s(&e.data),
        ],
        None,
        &["another model"],
    );
    // A prefix file whose tensor shape disagrees with its metadata.
    let good = e.prefix_for(&e.llama, "llama.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let view = st.tensor("prefix").unwrap();
    let shape = view.shape().to_vec();
    let data = view.data()[..view.data().len() / 2].to_vec();
    let bad_view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![shape[0] / 2, shape[1]],
        &data,
    )
    .unwrap();
    let bad =
        safetensors::serialize(vec![("prefix", bad_view)], header.metadata().clone()).unwrap();
    let bad_path = e.file("wrong_shape.safetensors", &bad);
    fails(
        &[
            "eval",
            "--model",
            s(&e.llama),
            "--prefix",
            s(&bad_path),
            "--data",
            s(&e.data),
        ],
        None,
        &["wrong_shape.safetensors", "shape"],
    );
    fails(
        &train_args(
            s(&e.llama),
            s(&e.data),
            s(&out),
            &["--init-prefix", s(&bad_path)],
        ),
        Some(&out),
        &["shape"],
    );
    // A PEFT adapter for the other model.
    fails(
        &[
            "eval",
            "--model",
            s(&e.llama),
            "--prefix",
            s(&e.gpt2.join("peft_adapter")),
            "--data",
            s(&e.data),
        ],
        None,
        &["peft_adapter"],
    );
    // A missing prefix path; a directory that is neither kind.
    fails(
        &[
            "eval",
            "--model",
            s(&e.llama),
            "--prefix",
            "/no/such/prefix",
            "--data",
            s(&e.data),
        ],
        None,
        &["no such file"],
    );
    let neither = e.path("neither");
    std::fs::create_dir(&neither).unwrap();
    fails(
        &[
            "eval",
            "--model",
            s(&e.llama),
            "--prefix",
            s(&neither),
            "--data",
            s(&e.data),
        ],
        None,
        &["neither"],
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_refused() {
    let e = Env::new();
    let m = e.path("model");
    std::fs::create_dir(&m).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(e.llama.join(f), m.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(e.llama.join("config.json")).unwrap())
            .unwrap();
    cfg["hidden_size"] = serde_json::json!(64);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let out = e.path("out");
    fails(
        &train_args(s(&m), s(&e.data), s(&out), &[]),
        Some(&out),
        &["model"],
    );
    fails(
        &["eval", "--model", s(&m), "--data", s(&e.data)],
        None,
        &["model"],
    );
    // A truncated weights file.
    let bytes = std::fs::read(e.llama.join("model.safetensors")).unwrap();
    std::fs::write(
        m.join("config.json"),
        std::fs::read(e.llama.join("config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    fails(
        &train_args(s(&m), s(&e.data), s(&out), &[]),
        Some(&out),
        &["model.safetensors"],
    );
}

#[test]
fn eval_refuses_bad_data() {
    let e = Env::new();
    let l = s(&e.llama);
    let bad = e.file(
        "bad.jsonl",
        b"{\"input\": \"a\", \"target\": \"b\"}\nnot json\n",
    );
    fails(
        &["eval", "--model", l, "--data", s(&bad)],
        None,
        &["bad.jsonl:2"],
    );
    let empty = e.file("empty.jsonl", b"\n");
    fails(
        &["eval", "--model", l, "--data", s(&empty)],
        None,
        &["empty"],
    );
    fails(
        &["eval", "--model", l, "--data", "/no/such.jsonl"],
        None,
        &["no such file"],
    );
    fails(
        &["eval", "--model", "/no/model", "--data", s(&e.data)],
        None,
        &["no such file"],
    );
    let long = e.file(
        "long.jsonl",
        format!("{{\"input\": \"{}\", \"target\": \"b\"}}\n", "a".repeat(80)).as_bytes(),
    );
    fails(
        &[
            "eval",
            "--model",
            l,
            "--data",
            s(&long),
            "--max-len",
            "30",
            "--refuse-long",
        ],
        None,
        &["long.jsonl:1"],
    );
}

#[test]
fn help_shows_examples() {
    for cmd in ["train", "eval"] {
        let o = run(&[cmd, "--help"]);
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("Examples:") && text.contains(&format!("prefix-tune {cmd}")),
            "{text}"
        );
    }
}
