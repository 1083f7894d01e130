//! Dataset parsing (JSONL, E2E CSV, BIG-bench), errors that name file and line, the eval split by
//! distinct input, and the sequence convention (labels on target + eos, truncation).

use std::path::{Path, PathBuf};

use prefix_tune::data::{
    effective_max_len, encode_examples, load_examples, make_batch, split_by_input, Example,
    LongPolicy,
};
use prefix_tune::model::load::load_model;
use prefix_tune::reference::model::Positions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn err_of(path: &Path) -> String {
    format!("{:#}", load_examples(path).unwrap_err())
}

#[test]
fn jsonl_both_field_styles_and_blank_lines() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "a.jsonl",
        b"{\"input\": \"in one\", \"target\": \"out one\"}\n\n{\"prompt\": \"p2\", \"completion\": \"c2\", \"extra\": 3}\n",
    );
    let ex = load_examples(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(
        (ex[0].input.as_str(), ex[0].target.as_str(), ex[0].line),
        ("in one", "out one", 1)
    );
    assert_eq!(
        (ex[1].input.as_str(), ex[1].target.as_str(), ex[1].line),
        ("p2", "c2", 3)
    );
}

#[test]
fn e2e_csv_with_quotes() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "e2e.csv",
        b"mr,ref\n\"name[The Eagle], food[French]\",\"The Eagle serves \"\"French\"\" food.\"\nname[Zizzi],Zizzi is a pub.\n",
    );
    let ex = load_examples(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].input, "name[The Eagle], food[French]");
    assert_eq!(ex[0].target, "The Eagle serves \"French\" food.");
    assert_eq!(ex[1].line, 3);
    // Header without the columns.
    let bad = write(d.path(), "bad.csv", b"a,b\nx,y\n");
    assert!(err_of(&bad).contains("bad.csv:1"), "{}", err_of(&bad));
    let short = write(d.path(), "short.csv", b"mr,ref\nx,y\nonly-one\n");
    assert!(err_of(&short).contains("short.csv:3"), "{}", err_of(&short));
}

#[test]
fn bigbench_task_with_list_targets() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "task.json",
        br#"{"name": "t", "examples": [{"input": "a", "target": ["first", "second"]}, {"input": "b", "target": "c", "comment": "x"}]}"#,
    );
    let ex = load_examples(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].target, "first");
    assert_eq!(ex[1].target, "c");
    let bad = write(
        d.path(),
        "task2.json",
        br#"{"examples": [{"input": "a", "target": "b"}, {"input": "a"}]}"#,
    );
    let e = err_of(&bad);
    assert!(
        e.contains("task2.json") && e.contains("examples[1]") && e.contains("target"),
        "{e}"
    );
}

#[test]
fn the_real_e2e_task_parses_when_present() {
    let p = prefix_tune::assets::cache_dir().join("data/e2e_nlg/task.json");
    if !p.is_file() {
        eprintln!(
            "skipping: {} not fetched (scripts/setup --data)",
            p.display()
        );
        return;
    }
    let ex = load_examples(&p).unwrap();
    assert!(ex.len() >= 100);
    assert!(ex
        .iter()
        .all(|e| !e.input.is_empty() && !e.target.is_empty()));
}

#[test]
fn errors_name_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &[u8], &[&str])> = vec![
        (
            "malformed.jsonl",
            b"{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\", \"target\": }\n",
            &["malformed.jsonl:2", "malformed JSON"],
        ),
        (
            "missing.jsonl",
            b"{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\"}\n",
            &["missing.jsonl:3", "target"],
        ),
        (
            "nofields.jsonl",
            b"{\"question\": \"a\"}\n",
            &["nofields.jsonl:1", "missing fields"],
        ),
        (
            "number.jsonl",
            b"{\"input\": \"a\", \"target\": 5}\n",
            &["number.jsonl:1", "number"],
        ),
        ("notobj.jsonl", b"[1, 2]\n", &["notobj.jsonl:1", "object"]),
        ("empty.jsonl", b"", &["empty.jsonl", "empty"]),
        ("blank.jsonl", b"\n  \n\n", &["blank.jsonl", "empty"]),
        (
            "binary.jsonl",
            b"{\"input\": \"a\", \"target\": \"b\"}\n\x00\x01\x02\xff\n",
            &["binary.jsonl:2", "binary"],
        ),
        (
            "latin1.jsonl",
            b"{\"input\": \"caf\xe9\", \"target\": \"b\"}\n",
            &["latin1.jsonl:1", "binary"],
        ),
    ];
    for (name, content, wants) in cases {
        let p = write(d.path(), name, content);
        let e = err_of(&p);
        for w in wants {
            assert!(e.contains(w), "{name}: error {e:?} lacks {w:?}");
        }
    }
    let missing = d.path().join("nope.jsonl");
    let e = err_of(&missing);
    assert!(e.contains("nope.jsonl"), "{e}");
    let e = err_of(d.path());
    assert!(e.contains("directory"), "{e}");
}

#[test]
fn eval_split_is_by_distinct_input_and_deterministic() {
    let mut rng = StdRng::seed_from_u64(7);
    let examples: Vec<Example> = (0..300)
        .map(|i| Example {
            input: format!("input {}", rng.random_range(0..40)),
            target: format!("target {i}"),
            line: i + 1,
        })
        .collect();
    let n_inputs = examples
        .iter()
        .map(|e| &e.input)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let (train, eval) = split_by_input(&examples, 0.25, 3).unwrap();
    assert_eq!(train.len() + eval.len(), examples.len());
    let ti: std::collections::HashSet<_> = train.iter().map(|e| &e.input).collect();
    let ei: std::collections::HashSet<_> = eval.iter().map(|e| &e.input).collect();
    assert!(ti.is_disjoint(&ei), "an input is on both sides");
    assert_eq!(ei.len(), (0.25 * n_inputs as f64).round() as usize);
    // Data order kept on both sides.
    assert!(train.windows(2).all(|w| w[0].line < w[1].line));
    assert!(eval.windows(2).all(|w| w[0].line < w[1].line));
    // Deterministic with the seed, different with another seed.
    let (_, eval2) = split_by_input(&examples, 0.25, 3).unwrap();
    assert_eq!(eval, eval2);
    let (_, eval3) = split_by_input(&examples, 0.25, 4).unwrap();
    assert_ne!(eval, eval3);
    // Bad fractions.
    for f in [0.0, 1.0, -0.5, f64::NAN] {
        assert!(split_by_input(&examples, f, 0).is_err(), "{f}");
    }
    let one_input: Vec<Example> = examples
        .iter()
        .map(|e| Example {
            input: "same".into(),
            ..e.clone()
        })
        .collect();
    assert!(split_by_input(&one_input, 0.5, 0).is_err());
}

#[test]
fn sequence_convention_and_truncation() {
    let model = load_model(&fixture("gpt2_tiny")).unwrap();
    let tok = &model.tokenizer;
    assert!(!tok.add_bos());
    let eos = tok.eos_token_ids()[0];
    let ex = vec![
        Example {
            input: "abc".into(),
            target: "de".into(),
            line: 1,
        },
        Example {
            input: "x".repeat(30),
            target: "y".repeat(30),
            line: 2,
        },
    ];
    let set = encode_examples(tok, &ex, 20, LongPolicy::Truncate, "d").unwrap();
    assert_eq!(set.n_truncated, 1);
    let a = &set.items[0];
    assert_eq!(a.input, tok.encode("abc").unwrap());
    let mut tgt = tok.encode("de").unwrap();
    tgt.push(eos);
    assert_eq!(a.target, tgt);
    // The cut one: at most 20 tokens, the input keeps its last 19, at least one target token.
    let b = &set.items[1];
    assert_eq!(b.len(), 20);
    assert_eq!(b.input.len(), 19);
    assert_eq!(b.target.len(), 1);
    // Labels: exactly on the positions predicting target tokens and the eos.
    let batch = make_batch(&[a, b], eos);
    assert_eq!(batch.n_targets(), vec![a.target.len(), 1]);
    for t in 0..batch.seq {
        let l = batch.labels[t];
        if t + 1 >= a.input.len() && t + 1 < a.len() {
            assert_eq!(l, Some(batch.tokens[t + 1]));
        } else {
            assert_eq!(l, None, "position {t}");
        }
    }
    // Refusing instead.
    let e = encode_examples(tok, &ex, 20, LongPolicy::Refuse, "data.jsonl").unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("data.jsonl:2") && e.contains("20"), "{e}");
    // The model's position table bounds the length after a prefix.
    let cfg = &model.weights.config;
    assert_eq!(
        effective_max_len(cfg, 1000, 10, Positions::AfterPrefix).unwrap(),
        cfg.max_positions - 10
    );
    assert_eq!(
        effective_max_len(cfg, 1000, 10, Positions::FromZero).unwrap(),
        cfg.max_positions
    );
    assert!(effective_max_len(cfg, 1000, cfg.max_positions, Positions::AfterPrefix).is_err());
}

#[test]
fn bos_is_added_only_when_the_tokenizer_asks() {
    // SmolLM2's GGUF tokenizer (when present) declares whether it adds BOS; the convention follows it.
    let p = prefix_tune::assets::smollm2_gguf_path();
    if !p.is_file() {
        eprintln!("skipping: {} not present", p.display());
        return;
    }
    let model = load_model(&p).unwrap();
    let tok = &model.tokenizer;
    let ex = vec![Example {
        input: "name: Aromi".into(),
        target: " A place.".into(),
        line: 1,
    }];
    let set = encode_examples(tok, &ex, 64, LongPolicy::Truncate, "d").unwrap();
    let plain = tok.encode("name: Aromi").unwrap();
    if tok.add_bos() {
        assert_eq!(set.items[0].input[0], tok.bos_token_id().unwrap());
        assert_eq!(&set.items[0].input[1..], &plain[..]);
    } else {
        assert_eq!(set.items[0].input, plain);
    }
    assert_eq!(*set.items[0].target.last().unwrap(), tok.eos_token_ids()[0]);
}
