//! The bounded load test of `prefix-tune serve` at CI's size: `prefix-tune bench serve` starts
//! the server in-process on loopback (the tiny Llama fixture, 8 random prefixes) and runs 64
//! concurrent streaming clients, 256 requests, first over the mix of 8 prefixes and then over
//! one prefix. Every request must succeed with all its tokens (none failed, none lost) and
//! greedy answers to the same task and prompt must agree across the run. The throughput and
//! latency it prints are recorded in BENCHMARKS.md from full-size runs, not asserted here.

mod serve_common;

use std::process::Command;

use serde_json::Value;
use serve_common::{fixture, s, BIN};

#[test]
fn bounded_load_with_mixed_prefixes_loses_nothing() {
    let model = fixture("llama_tiny");
    let (requests, max_tokens) = (256, 16);
    let out = Command::new(BIN)
        .args(["bench", "serve", "--model", s(&model)])
        .args(["--prefixes", "8", "--prefix-len", "4"])
        .args(["--clients", "64", "--max-batch", "32"])
        .args(["--requests", &requests.to_string()])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args([
            "--prompt",
            "the cat sat on",
            "--prompt",
            "once upon",
            "--prompt",
            "zz",
        ])
        .args(["--timeout", "120", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench serve failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    for r in runs {
        let label = r["label"].as_str().unwrap();
        assert_eq!(r["requests"], requests, "{label}");
        assert_eq!(r["ok"], requests, "{label}: {r}");
        assert_eq!(r["failed"], 0, "{label}: {r}");
        assert_eq!(r["lost"], 0, "{label}: {r}");
        assert_eq!(r["inconsistent"], 0, "{label}: {r}");
        assert_eq!(r["completion_tokens"], requests * max_tokens, "{label}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["ttft_s"]["p50"].as_f64().unwrap() > 0.0);
    }
    assert!(runs[0]["label"].as_str().unwrap().contains("8 prefixes"));
    // What BENCHMARKS.md needs to redo the run is in the report.
    for k in [
        "date",
        "machine",
        "command",
        "load_average_before",
        "load_average_after",
    ] {
        assert!(report[k].is_string(), "{k} missing: {report}");
    }
    eprintln!(
        "load (tiny model, not a benchmark): {}",
        stderr
            .lines()
            .filter(|l| l.contains("tokens/s") || l.contains("mix / one"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
