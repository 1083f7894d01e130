//! `prefix-tune export` against adapters made by real HF PEFT (`tests/fixtures/*/peft_adapter`,
//! written by the oracle script): PEFT adapter → our prefix file (`--format prefix`) → PEFT
//! adapter (`--format peft`) gives back PEFT's `prompt_embeddings` bit for bit and the same
//! `adapter_config.json` fields; the training-directory form of `--prefix` works too; bad
//! exports fail cleanly.

use std::path::{Path, PathBuf};
use std::process::Command;

use prefix_tune::model::load_model;
use prefix_tune::prefix::{load_prefix_for, save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::Positions;
use safetensors::SafeTensors;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("running prefix-tune");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    (out.status.success(), stderr)
}

fn run_ok(args: &[&str]) {
    let (ok, stderr) = run(args);
    assert!(ok, "prefix-tune {args:?} failed:\n{stderr}");
}

/// `prompt_embeddings`: dtype, shape and raw bytes.
fn prompt_embeddings(dir: &Path) -> (String, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names(), vec!["prompt_embeddings"], "{}", dir.display());
    let t = st.tensor("prompt_embeddings").unwrap();
    (
        format!("{:?}", t.dtype()),
        t.shape().to_vec(),
        t.data().to_vec(),
    )
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

#[test]
fn peft_round_trip_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2_tiny", "llama_tiny"] {
        let model_dir = fixture(family);
        let peft = model_dir.join("peft_adapter");
        assert!(
            peft.join("adapter_model.safetensors").is_file(),
            "missing PEFT fixture {} (made by tools/oracle)",
            peft.display()
        );
        let peft_cfg = config(&peft);
        // PEFT adapter → our prefix file, checked against the model.
        let ours = tmp.path().join(format!("{family}.safetensors"));
        run_ok(&[
            "export",
            "--prefix",
            s(&peft),
            "--model",
            s(&model_dir),
            "--format",
            "prefix",
            "--out",
            s(&ours),
        ]);
        let m = load_model(&model_dir).unwrap();
        let (bank, meta) = load_prefix_for(&ours, &m.weights.config, &m.fingerprint).unwrap();
        assert_eq!(
            bank.len,
            peft_cfg["num_virtual_tokens"].as_u64().unwrap() as usize
        );
        assert_eq!(meta.positions, Positions::AfterPrefix);

        // Our file → PEFT adapter, with and without the model; and from a training directory.
        let base = peft_cfg["base_model_name_or_path"].as_str().unwrap();
        let out1 = tmp.path().join(format!("{family}-peft1"));
        run_ok(&[
            "export",
            "--prefix",
            s(&ours),
            "--model",
            s(&model_dir),
            "--base-model",
            base,
            "--format",
            "peft",
            "--out",
            s(&out1),
        ]);
        let run_dir = tmp.path().join(format!("{family}-run"));
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::copy(&ours, run_dir.join("prefix.safetensors")).unwrap();
        let out2 = tmp.path().join(format!("{family}-peft2"));
        run_ok(&[
            "export",
            "--prefix",
            s(&run_dir),
            "--base-model",
            base,
            "--format",
            "peft",
            "--out",
            s(&out2),
        ]);

        let want = prompt_embeddings(&peft);
        for out in [&out1, &out2] {
            assert_eq!(
                prompt_embeddings(out),
                want,
                "{family}: exported prompt_embeddings differ from PEFT's"
            );
            let cfg = config(out);
            for (key, value) in peft_cfg.as_object().unwrap() {
                if key == "peft_version" {
                    continue; // the writer's version, not a property of the adapter
                }
                assert_eq!(
                    cfg.get(key),
                    Some(value),
                    "{family}: adapter_config.json field {key}"
                );
            }
        }
        // Without --base-model, --model's path is recorded.
        let out3 = tmp.path().join(format!("{family}-peft3"));
        run_ok(&[
            "export",
            "--prefix",
            s(&ours),
            "--model",
            s(&model_dir),
            "--format",
            "peft",
            "--out",
            s(&out3),
        ]);
        assert_eq!(config(&out3)["base_model_name_or_path"], s(&model_dir));
    }
}

#[test]
fn bad_exports_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let gpt2 = fixture("gpt2_tiny");
    let llama = fixture("llama_tiny");
    let m = load_model(&gpt2).unwrap();
    let c = &m.weights.config;
    // A two-prefix file.
    let bank = PrefixBank::<f32>::random(2, c.n_layers, c.n_kv_heads, 3, c.head_dim, 1.0, 1);
    let meta = PrefixMeta::for_model(
        c,
        3,
        &m.fingerprint,
        Positions::AfterPrefix,
        &serde_json::json!({}),
    );
    let two = t.join("two.safetensors");
    save_prefix(&two, &bank, &meta).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--prefix",
                s(&two),
                "--format",
                "peft",
                "--out",
                s(&t.join("o1")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--index",
        ),
        (
            vec![
                "--prefix",
                s(&two),
                "--index",
                "2",
                "--format",
                "peft",
                "--out",
                s(&t.join("o2")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--index 2",
        ),
        (
            vec![
                "--prefix",
                s(&gpt2.join("peft_adapter")),
                "--format",
                "prefix",
                "--out",
                s(&t.join("o3.safetensors")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "--model",
        ),
        (
            vec![
                "--prefix",
                s(&two),
                "--model",
                s(&llama),
                "--index",
                "0",
                "--format",
                "peft",
                "--out",
                s(&t.join("o4")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "another model",
        ),
        (
            vec![
                "--prefix",
                s(&t.join("nothing")),
                "--format",
                "peft",
                "--out",
                s(&t.join("o5")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "no such",
        ),
        (
            vec![
                "--prefix",
                s(&two),
                "--format",
                "onnx",
                "--out",
                s(&t.join("o6")),
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            "onnx",
        ),
    ];
    for (args, needle) in cases {
        let mut a = vec!["export"];
        a.extend(args.iter().map(String::as_str));
        let (ok, stderr) = run(&a);
        assert!(!ok, "{a:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{a:?}: stderr lacks {needle:?}:\n{stderr}"
        );
    }
    // Nothing half-written by the failures.
    for o in ["o1", "o2", "o3.safetensors", "o4", "o5", "o6"] {
        assert!(!t.join(o).exists(), "{o} was written by a failed export");
    }
    // --index picks one prefix of a multi-prefix file.
    let out = t.join("one");
    run_ok(&[
        "export",
        "--prefix",
        s(&two),
        "--index",
        "1",
        "--format",
        "peft",
        "--out",
        s(&out),
    ]);
    let (peft_bank, _) = prefix_tune::prefix::import_peft_adapter(&out).unwrap();
    assert_eq!(peft_bank, bank.select(1));
}
