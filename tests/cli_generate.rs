//! `prefix-tune generate` (and `info`) run as the real binary on the tiny HF fixtures of both
//! families: its output equals the library's generation with the same prompt and prefixes; a
//! JSONL batch mixing named prefixes (of different lengths) equals each input run alone; every
//! kind of bad input exits non-zero with a message on stderr and no panic. A smoke test on the
//! real SmolLM2 model checks that greedy decoding completes "The capital of France is" with
//! "Paris" (skipped, visibly, when the model is not in the cache; required under
//! `PREFIX_TUNE_REQUIRE_ASSETS=1`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use prefix_tune::engine::CpuEngine;
use prefix_tune::generate::{generate, GenerateOptions, Request, Strategy};
use prefix_tune::model::{load_model, LoadedModel};
use prefix_tune::prefix::{import_peft_adapter, save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::{Positions, RunOptions};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("running prefix-tune");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run_ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.ok, "prefix-tune {args:?} failed:\n{}", o.stderr);
    o.stdout
}

/// Runs a command that must fail: non-zero exit, a message on stderr containing every one of
/// `needles` (case-insensitive), no panic.
fn run_err(args: &[&str], needles: &[&str]) {
    let o = run(args);
    assert!(!o.ok, "prefix-tune {args:?} succeeded:\n{}", o.stdout);
    assert!(
        !o.stderr.contains("panicked"),
        "prefix-tune {args:?} panicked:\n{}",
        o.stderr
    );
    let low = o.stderr.to_lowercase();
    for n in needles {
        assert!(
            low.contains(&n.to_lowercase()),
            "prefix-tune {args:?}: stderr lacks {n:?}:\n{}",
            o.stderr
        );
    }
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn tokens_of(v: &Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// The library's greedy (or other) generation for one prompt text, as the CLI should do it.
fn library_generate(
    m: &LoadedModel,
    bank: Option<&PrefixBank<f32>>,
    text: &str,
    strategy: Strategy,
    max_new_tokens: usize,
    positions: Positions,
) -> Vec<u32> {
    let t = &m.tokenizer;
    let mut prompt: Vec<u32> = if t.add_bos() {
        t.bos_token_id().into_iter().collect()
    } else {
        vec![]
    };
    prompt.extend(t.encode(text).unwrap());
    let mut eos = t.eos_token_ids().to_vec();
    eos.extend(&m.weights.config.eos_token_ids);
    let mut engine = CpuEngine::new(Arc::new(m.weights.clone()));
    let req = Request {
        prompt,
        prefix: bank.map(|_| 0),
    };
    let opts = GenerateOptions {
        max_new_tokens,
        strategy,
        eos,
        run: RunOptions { positions },
        batch_size: 1,
    };
    generate(&mut engine, bank, &[req], &opts).unwrap()[0]
        .tokens
        .clone()
}

/// A random prefix file of length `len` for `m` (its fingerprint unless `fingerprint` is given).
fn prefix_file(
    m: &LoadedModel,
    dir: &Path,
    name: &str,
    len: usize,
    seed: u64,
    fingerprint: Option<&str>,
    positions: Positions,
) -> (PathBuf, PrefixBank<f32>) {
    let c = &m.weights.config;
    let bank = PrefixBank::<f32>::random(1, c.n_layers, c.n_kv_heads, len, c.head_dim, 1.0, seed);
    let meta = PrefixMeta::for_model(
        c,
        len,
        fingerprint.unwrap_or(&m.fingerprint),
        positions,
        &serde_json::json!({}),
    );
    let path = dir.join(name);
    save_prefix(&path, &bank, &meta).unwrap();
    (path, bank)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_matches_library_for_both_families() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2_tiny", "llama_tiny"] {
        let dir = fixture(family);
        let m = load_model(&dir).unwrap();
        let text = "the cat sat on";
        // Base model, greedy.
        let out = json_lines(&run_ok(&[
            "generate",
            "--model",
            s(&dir),
            "--input",
            text,
            "--max-new-tokens",
            "12",
            "--json",
        ]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["index"], 0);
        let base = tokens_of(&out[0]);
        assert_eq!(
            base,
            library_generate(&m, None, text, Strategy::Greedy, 12, Positions::AfterPrefix),
            "{family}"
        );
        let text_out = out[0]["text"].as_str().unwrap();
        let body = match out[0]["finish"].as_str().unwrap() {
            "eos" => &base[..base.len() - 1],
            _ => &base[..],
        };
        assert_eq!(text_out, m.tokenizer.decode(body).unwrap());

        // With the PEFT adapter (a directory), and with a prefix file inside a training
        // output directory.
        let adapter = dir.join("peft_adapter");
        let (peft_bank, _) = import_peft_adapter(&adapter).unwrap();
        let with_peft = tokens_of(
            &json_lines(&run_ok(&[
                "generate",
                "--model",
                s(&dir),
                "--prefix",
                s(&adapter),
                "--input",
                text,
                "--max-new-tokens",
                "12",
                "--json",
            ]))[0],
        );
        assert_eq!(
            with_peft,
            library_generate(
                &m,
                Some(&peft_bank),
                text,
                Strategy::Greedy,
                12,
                Positions::AfterPrefix
            ),
            "{family} with PEFT adapter"
        );
        let run_dir = tmp.path().join(format!("{family}-run"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let (_, bank) = prefix_file(
            &m,
            &run_dir,
            "prefix.safetensors",
            4,
            5,
            None,
            Positions::AfterPrefix,
        );
        let beam = Strategy::Beam {
            beams: 3,
            length_penalty: 0.8,
        };
        let with_file = tokens_of(
            &json_lines(&run_ok(&[
                "generate",
                "--model",
                s(&dir),
                "--prefix",
                s(&run_dir),
                "--input",
                text,
                "--max-new-tokens",
                "10",
                "--beams",
                "3",
                "--length-penalty",
                "0.8",
                "--json",
            ]))[0],
        );
        assert_eq!(
            with_file,
            library_generate(&m, Some(&bank), text, beam, 10, Positions::AfterPrefix),
            "{family} beam search with a training directory's prefix"
        );
        assert_ne!(with_file, base, "{family}: the prefix changed nothing");

        // A prefix trained with --positions from-zero is used that way unless told otherwise.
        let (zero_path, zero) = prefix_file(
            &m,
            tmp.path(),
            &format!("{family}-zero.safetensors"),
            4,
            6,
            None,
            Positions::FromZero,
        );
        let gen_zero = |extra: &[&str]| {
            let mut a = vec![
                "generate",
                "--model",
                s(&dir),
                "--prefix",
                s(&zero_path),
                "--input",
                text,
                "--max-new-tokens",
                "12",
                "--json",
            ];
            a.extend(extra);
            tokens_of(&json_lines(&run_ok(&a))[0])
        };
        let from_zero = library_generate(
            &m,
            Some(&zero),
            text,
            Strategy::Greedy,
            12,
            Positions::FromZero,
        );
        let after = library_generate(
            &m,
            Some(&zero),
            text,
            Strategy::Greedy,
            12,
            Positions::AfterPrefix,
        );
        assert_ne!(
            from_zero, after,
            "{family}: the positions convention changed nothing"
        );
        assert_eq!(gen_zero(&[]), from_zero, "{family}: from-zero prefix");
        assert_eq!(
            gen_zero(&["--positions", "after-prefix"]),
            after,
            "{family}: --positions"
        );

        // Sampling: reproducible for a seed, different for another.
        let sample = |seed: &str| {
            run_ok(&[
                "generate",
                "--model",
                s(&dir),
                "--input",
                text,
                "--max-new-tokens",
                "16",
                "--temperature",
                "1.5",
                "--top-k",
                "40",
                "--seed",
                seed,
            ])
        };
        assert_eq!(sample("3"), sample("3"), "{family}: sampling with a seed");
        assert_ne!(sample("3"), sample("4"), "{family}: seeds 3 and 4 agree");
    }
}

#[test]
fn jsonl_batch_mixes_named_prefixes() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2_tiny", "llama_tiny"] {
        let dir = fixture(family);
        let m = load_model(&dir).unwrap();
        let adapter = dir.join("peft_adapter"); // length 5
        let (p3, _) = prefix_file(
            &m,
            tmp.path(),
            &format!("{family}-p3.safetensors"),
            3,
            7,
            None,
            Positions::AfterPrefix,
        );
        let (p5, _) = prefix_file(
            &m,
            tmp.path(),
            &format!("{family}-p5.safetensors"),
            5,
            8,
            None,
            Positions::AfterPrefix,
        );
        let lines = [
            (r#"{"input": "one two three", "prefix": "a"}"#, Some("a")),
            (r#"{"input": "hello", "prefix": "b"}"#, Some("b")),
            (r#"{"input": "the dog", "prefix": null}"#, None),
            ("", None),
            (r#"{"input": "zz top", "prefix": "c"}"#, Some("c")),
            (r#"{"prompt": "one two three", "prefix": "b"}"#, Some("b")),
        ];
        let file = tmp.path().join(format!("{family}.jsonl"));
        let text: String = lines.iter().map(|(l, _)| format!("{l}\n")).collect();
        std::fs::write(&file, text).unwrap();
        let named = |n: &str, p: &Path| format!("{n}={}", p.display());
        let (a, b, c) = (named("a", &adapter), named("b", &p3), named("c", &p5));
        let batched = json_lines(&run_ok(&[
            "generate",
            "--model",
            s(&dir),
            "--prefix",
            &a,
            "--prefix",
            &b,
            "--prefix",
            &c,
            "--inputs",
            s(&file),
            "--max-new-tokens",
            "8",
            "--batch-size",
            "3",
            "--json",
        ]));
        let expected: Vec<(&str, Option<&PathBuf>)> = vec![
            ("one two three", Some(&adapter)),
            ("hello", Some(&p3)),
            ("the dog", None),
            ("zz top", Some(&p5)),
            ("one two three", Some(&p3)),
        ];
        assert_eq!(batched.len(), expected.len(), "{family}");
        for (i, (v, (input, prefix))) in batched.iter().zip(&expected).enumerate() {
            assert_eq!(v["index"], i);
            let mut args = vec![
                "generate",
                "--model",
                s(&dir),
                "--input",
                input,
                "--max-new-tokens",
                "8",
                "--json",
            ];
            if let Some(p) = prefix {
                args.extend(["--prefix", s(p)]);
            }
            let alone = json_lines(&run_ok(&args));
            assert_eq!(
                tokens_of(v),
                tokens_of(&alone[0]),
                "{family}: input {i} batched vs alone"
            );
            assert_eq!(v["text"], alone[0]["text"]);
        }
    }
}

#[test]
fn info_describes_the_model() {
    let dir = fixture("llama_tiny");
    let m = load_model(&dir).unwrap();
    let v: Value = serde_json::from_str(
        run_ok(&["info", "--model", s(&dir), "--prefix-len", "7", "--json"]).trim(),
    )
    .unwrap();
    let c = &m.weights.config;
    assert_eq!(v["n_layers"], c.n_layers);
    assert_eq!(v["parameters"], m.weights.n_params());
    assert_eq!(v["fingerprint"], m.fingerprint.as_str());
    assert_eq!(v["prefix"]["parameters"], 2 * c.n_layers * 7 * c.kv_dim());
    assert_eq!(v["kernels_built"], prefix_tune::cuda::kernels_built());
    let text = run_ok(&["info", "--model", s(&fixture("gpt2_tiny"))]);
    for needle in ["Gpt2", "parameters", "prefix of 10", "GPU", "kernels"] {
        assert!(text.contains(needle), "info lacks {needle:?}:\n{text}");
    }
}

#[test]
fn bad_input_is_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let gpt2 = fixture("gpt2_tiny");
    let llama = fixture("llama_tiny");
    let (g, l) = (s(&gpt2), s(&llama));
    let mg = load_model(&gpt2).unwrap();
    let ml = load_model(&llama).unwrap();
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--model", g, "--max-new-tokens", "4"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_err(&a, needles);
    };

    // Missing and unreadable model paths.
    check(
        vec![
            "generate".into(),
            "--model".into(),
            t.join("nope").display().to_string(),
            "--input".into(),
            "x".into(),
        ],
        &["nope", "no such"],
    );
    let junk_dir = t.join("junk_model");
    std::fs::create_dir_all(&junk_dir).unwrap();
    std::fs::write(junk_dir.join("config.json"), "{not json").unwrap();
    check(
        vec![
            "generate".into(),
            "--model".into(),
            s(&junk_dir).into(),
            "--input".into(),
            "x".into(),
        ],
        &["junk_model"],
    );
    let junk_gguf = t.join("junk.gguf");
    std::fs::write(&junk_gguf, b"GGUF\x03\0\0\0garbage").unwrap();
    check(
        vec!["info".into(), "--model".into(), s(&junk_gguf).into()],
        &["junk.gguf"],
    );

    // Missing, unreadable, foreign and misshapen prefixes.
    check(
        gen(&["--prefix", s(&t.join("missing")), "--input", "x"]),
        &["missing", "no such"],
    );
    let garbage = t.join("garbage.safetensors");
    std::fs::write(&garbage, vec![0x5au8; 100]).unwrap();
    check(
        gen(&["--prefix", s(&garbage), "--input", "x"]),
        &["garbage.safetensors"],
    );
    let (foreign, _) = prefix_file(
        &mg,
        t,
        "foreign.safetensors",
        3,
        1,
        Some("0123456789abcdef"),
        Positions::AfterPrefix,
    );
    check(
        gen(&["--prefix", s(&foreign), "--input", "x"]),
        &["another model"],
    );
    let (llama_prefix, _) = prefix_file(
        &ml,
        t,
        "llama.safetensors",
        3,
        2,
        None,
        Positions::AfterPrefix,
    );
    check(
        gen(&["--prefix", s(&llama_prefix), "--input", "x"]),
        &["another model"],
    );
    check(
        gen(&["--prefix", s(&llama.join("peft_adapter")), "--input", "x"]),
        &["peft adapter"],
    );
    let empty_dir = t.join("empty_dir");
    std::fs::create_dir_all(&empty_dir).unwrap();
    check(
        gen(&["--prefix", s(&empty_dir), "--input", "x"]),
        &["prefix.safetensors", "adapter_config.json"],
    );

    // Malformed inputs files name file:line.
    let write = |name: &str, body: &[u8]| {
        let p = t.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let bad_json = write("bad.jsonl", b"{\"input\": \"ok\"}\n{\"input\": \"oops\"\n");
    check(gen(&["--inputs", s(&bad_json)]), &["bad.jsonl:2", "json"]);
    let no_field = write(
        "nofield.jsonl",
        b"{\"input\": \"ok\"}\n\n{\"text\": \"x\"}\n",
    );
    check(
        gen(&["--inputs", s(&no_field)]),
        &["nofield.jsonl:3", "input"],
    );
    let not_string = write("notstring.jsonl", b"{\"input\": 5}\n");
    check(
        gen(&["--inputs", s(&not_string)]),
        &["notstring.jsonl:1", "string"],
    );
    let unknown = write(
        "unknown.jsonl",
        b"{\"input\": \"a\", \"prefix\": \"zzz\"}\n",
    );
    let named = format!("e2e={}", gpt2.join("peft_adapter").display());
    check(
        gen(&["--prefix", &named, "--inputs", s(&unknown)]),
        &["unknown.jsonl:1", "unknown prefix", "zzz", "e2e"],
    );
    let binary = write("binary.jsonl", &[0xff, 0xfe, 0x00, 0x81, 0x10, 0x0a]);
    check(gen(&["--inputs", s(&binary)]), &["binary.jsonl:1"]);
    let empty = write("empty.jsonl", b"\n\n");
    check(gen(&["--inputs", s(&empty)]), &["empty.jsonl", "no inputs"]);
    check(
        gen(&["--inputs", s(&t.join("absent.jsonl"))]),
        &["absent.jsonl"],
    );
    check(gen(&["--input", ""]), &["empty"]);

    // Hyperparameters.
    for (flag, value, needle) in [
        ("--temperature", "-1", "temperature"),
        ("--temperature", "NaN", "temperature"),
        ("--temperature", "0", "temperature"),
        ("--top-p", "1.5", "top-p"),
        ("--top-k", "0", "top-k"),
        ("--beams", "0", "beams"),
        ("--length-penalty", "nan", "length-penalty"),
        ("--max-new-tokens", "0", "max-new-tokens"),
        ("--batch-size", "0", "batch-size"),
    ] {
        check(gen(&["--input", "x", flag, value]), &[needle]);
    }
    check(
        gen(&["--input", "x", "--greedy", "--temperature", "0.7"]),
        &["greedy"],
    );
    check(
        gen(&["--input", "x", "--beams", "3", "--top-k", "5"]),
        &["beams"],
    );
    check(gen(&["--input", "x", "--seed", "5"]), &["seed"]);
    check(gen(&["--input", "x", "--device", "cuda"]), &["cuda"]);
    check(gen(&[]), &["--input"]);
    // GPT-2's 64 learned positions.
    check(
        vec![
            "generate".into(),
            "--model".into(),
            g.into(),
            "--input".into(),
            "x".into(),
            "--max-new-tokens".into(),
            "100".into(),
        ],
        &["positions"],
    );
    let _ = l;
}

#[test]
fn smollm2_greedy_knows_paris() {
    let path = prefix_tune::assets::smollm2_gguf_path();
    if !path.exists() {
        let why = format!("{} not found (run scripts/setup)", path.display());
        common::skip(
            "PREFIX_TUNE_REQUIRE_ASSETS",
            "smollm2_greedy_knows_paris",
            &why,
        );
        return;
    }
    let out = json_lines(&run_ok(&[
        "generate",
        "--model",
        s(&path),
        "--input",
        "The capital of France is",
        "--greedy",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let text = out[0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "SmolLM2 said: {text:?}");
    // HF transformers' greedy continuation (tests/fixtures/smollm2_logits.json, made by
    // tools/oracle/make_fixtures.py from the same GGUF in float64).
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_logits.json")).unwrap())
            .unwrap();
    let hf: Vec<u32> = fx["greedy"]["new_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens_of(&out[0]), hf, "greedy tokens differ from HF's");
}

#[test]
fn help_shows_examples() {
    for cmd in [
        &["--help"][..],
        &["generate", "--help"],
        &["export", "--help"],
        &["info", "--help"],
    ] {
        let out = run_ok(cmd);
        assert!(
            out.contains("Examples:"),
            "{cmd:?} --help has no example:\n{out}"
        );
        assert!(out.contains("prefix-tune "), "{cmd:?}");
    }
}
