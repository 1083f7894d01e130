//! `prefix-tune bench` through the real binary: the CPU attention bench gives well-formed JSON
//! rows whose FLOP counts follow the formula, the CPU training bench reports tokens/s on tiny
//! models, the GPU benches without a GPU fail with a message (no panic), and on the simulated
//! device the training bench's exact counts are the same whether the kernels run or are only
//! counted (`PTSIM_EXECUTE=0`).

mod common;

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
        .arg("bench")
        .args(args)
        .output()
        .expect("running prefix-tune")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json_rows(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON row: {l:?} ({e})")))
        .collect()
}

fn num(r: &Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {r}"))
}

/// Whether the loaded driver is prefix-tune's simulator; else a visible skip (a failure under
/// `PREFIX_TUNE_REQUIRE_SIM=1`).
fn on_the_simulator(test: &str) -> bool {
    common::simulator_or_skip(test)
}

fn gpu_present() -> bool {
    prefix_tune::cuda::gpu_available().is_ok()
}

#[test]
fn cpu_attention_rows_are_well_formed() {
    let out = bench(&["attention", "--device", "cpu", "--quick", "--json"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let rows = json_rows(&out);
    // Plain and blockwise, forward and backward, for every shape of the quick grid.
    assert!(
        !rows.is_empty() && rows.len() % 4 == 0,
        "{} rows",
        rows.len()
    );
    let mut seen = std::collections::HashSet::new();
    for r in &rows {
        assert_eq!(r["bench"], "attention");
        let imp = r["implementation"].as_str().unwrap().to_string();
        let pass = r["pass"].as_str().unwrap().to_string();
        assert!(
            ["cpu-plain", "cpu-blockwise"].contains(&imp.as_str()),
            "{r}"
        );
        assert!(["fwd", "bwd"].contains(&pass.as_str()), "{r}");
        let (b, h, t, p, d) = (
            num(r, "batch"),
            num(r, "q_heads"),
            num(r, "seq"),
            num(r, "prefix"),
            num(r, "head_dim"),
        );
        assert!(
            b >= 1.0 && h >= 1.0 && t >= 1.0 && p >= 1.0 && d >= 1.0,
            "{r}"
        );
        assert_eq!(r["shape"], format!("T{t}_P{p}_D{d}"));
        // The count: 4·B·Hq·D·T·(P + T/2) forward, 2.5× backward.
        let fwd = 4.0 * b * h * d * t * (p + t / 2.0);
        let want = if pass == "fwd" { fwd } else { 2.5 * fwd };
        let flops = num(r, "flops");
        assert!(
            (flops - want).abs() <= 1e-9 * want,
            "{r}: flops {flops}, want {want}"
        );
        let ms = num(r, "ms");
        assert!(ms > 0.0 && ms.is_finite(), "{r}");
        let tflops = num(r, "tflops");
        let implied = flops / (ms * 1e-3) / 1e12;
        assert!((tflops - implied).abs() <= 1e-6 * implied, "{r}");
        seen.insert((imp, pass, r["shape"].as_str().unwrap().to_string()));
    }
    assert_eq!(seen.len(), rows.len(), "duplicate rows");
}

#[test]
fn cpu_attention_table_without_json() {
    let out = bench(&["attention", "--device", "cpu", "--quick"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("TFLOP/s") && s.contains("cpu-blockwise"), "{s}");
    assert!(!s.lines().any(|l| l.starts_with('{')), "{s}");
}

#[test]
fn cpu_train_reports_tokens_per_second() {
    let out = bench(&[
        "train",
        "--device",
        "cpu",
        "--shape",
        "tiny-llama",
        "tiny-gpt2",
        "--batch-size",
        "2",
        "--seq",
        "16",
        "--prefix-len",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (r, name) in rows.iter().zip(["tiny-llama", "tiny-gpt2"]) {
        assert_eq!(r["bench"], "train");
        assert_eq!(r["model"], name);
        assert_eq!(
            (num(r, "batch"), num(r, "seq"), num(r, "prefix")),
            (2.0, 16.0, 4.0)
        );
        let (step, tps) = (num(r, "step_ms"), num(r, "tokens_per_s"));
        assert!(step > 0.0 && step.is_finite(), "{r}");
        assert!((tps - 32.0 / (step * 1e-3)).abs() <= 1e-6 * tps, "{r}");
        assert!(num(r, "forward_ms") > 0.0, "{r}");
        let loss = num(r, "loss");
        // Random tokens over a vocabulary of 61: the loss is near ln 61 ≈ 4.1, never 0.
        assert!(loss > 1.0 && loss < 10.0, "{r}");
        assert!(
            r["peak_device_mib"].is_null(),
            "CPU has no device memory: {r}"
        );
    }

    // The table names tokens/s and says "n/a" for the memory.
    let out = bench(&[
        "train",
        "--device",
        "cpu",
        "--shape",
        "tiny-gpt2",
        "--steps",
        "1",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("tokens/s") && s.contains("tiny-gpt2") && s.contains("n/a"),
        "{s}"
    );
}

#[test]
fn cpu_train_on_a_model_directory() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gpt2_tiny");
    let out = bench(&[
        "train",
        "--device",
        "cpu",
        "--model",
        dir,
        "--batch-size",
        "2",
        "--seq",
        "8",
        "--steps",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let rows = json_rows(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["model"], "gpt2_tiny");
    assert!(num(&rows[0], "tokens_per_s") > 0.0, "{}", rows[0]);

    let out = bench(&[
        "train",
        "--device",
        "cpu",
        "--model",
        "/nonexistent/model.gguf",
    ]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/model.gguf"),
        "{err}"
    );
    assert!(text(&out.stdout).is_empty(), "no table for a missing model");
}

#[test]
fn train_rejects_too_long_gpt2_sequences() {
    // tiny-gpt2 has 40 positions: 4 prefix + 40 tokens do not fit.
    let out = bench(&[
        "train",
        "--device",
        "cpu",
        "--shape",
        "tiny-gpt2",
        "--seq",
        "40",
        "--prefix-len",
        "4",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("positions") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn gpu_benches_without_a_gpu_fail_cleanly() {
    if gpu_present() {
        eprintln!("a GPU is present: the no-GPU error path is not exercised here");
        return;
    }
    for args in [
        &["attention", "--quick"][..],
        &["train", "--shape", "tiny-llama", "--steps", "1"][..],
    ] {
        let out = bench(args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without a GPU");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("error:") && err.contains("GPU"),
            "{args:?}: {err}"
        );
        assert!(text(&out.stdout).trim().is_empty() || !text(&out.stdout).contains('{'));
    }
}

/// `PTSIM_EXECUTE=0` (count only, for full-size shapes in seconds) must count what a run that
/// computes does: same launches, cuBLAS calls, copies, syncs, allocations and peak memory for a
/// training step, a prefill and decoded tokens; and the computing run's loss is a real number.
#[test]
fn sim_counts_without_executing_match_a_run_that_computes() {
    let test = "sim_counts_without_executing_match_a_run_that_computes";
    if !on_the_simulator(test) {
        return;
    }
    let args = [
        "train",
        "--device",
        "cuda",
        "--shape",
        "tiny-gpu",
        "--batch-size",
        "2",
        "--seq",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--profile-steps",
        "0",
        "--json",
    ];
    let run = |execute: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
            .arg("bench")
            .args(args)
            .env("PTSIM_EXECUTE", execute)
            .output()
            .expect("running prefix-tune");
        assert!(
            out.status.success(),
            "PTSIM_EXECUTE={execute}: {}",
            text(&out.stderr)
        );
        let rows = json_rows(&out);
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    };
    let computed = run("1");
    let counted = run("0");
    let loss = num(&computed, "loss");
    assert!(
        loss.is_finite() && loss > 1.0,
        "loss {loss} (random tokens over 83: ~ln 83)"
    );
    for part in ["sim_step", "sim_prefill", "sim_decode"] {
        let (a, b) = (&computed[part], &counted[part]);
        let obj = a
            .as_object()
            .unwrap_or_else(|| panic!("{part} missing in {computed}"));
        for key in [
            "launches",
            "cublas_calls",
            "htod_copies",
            "dtoh_copies",
            "host_syncs",
            "allocations",
        ] {
            assert!(obj.contains_key(key), "{part}.{key} missing: {a}");
        }
        assert!(num(a, "launches") > 0.0, "{part}: no launches counted: {a}");
        // Frees are stream-ordered (cuMemFreeAsync), so the peak depends on when the stream
        // reaches them: equal within 0.1%; every counter exactly.
        let (pa, pb) = (num(a, "peak_bytes"), num(b, "peak_bytes"));
        assert!(
            (pa - pb).abs() <= 1e-3 * pa.max(pb),
            "{part}: peak {pa} vs {pb}"
        );
        let strip = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("peak_bytes");
            v
        };
        assert_eq!(
            strip(a),
            strip(b),
            "{part}: computing and count-only runs differ"
        );
    }
}

/// A driver older than the kernels (CUDA 12.8, as on R570) is refused up front with the minimum
/// driver named, `info` says which driver there is and which the kernels need, and
/// `--device auto` falls back to the CPU. On the simulated device (`PTSIM_DRIVER_VERSION`).
#[test]
fn an_old_driver_is_named_and_refused_cleanly() {
    let test = "an_old_driver_is_named_and_refused_cleanly";
    if !on_the_simulator(test) {
        return;
    }
    let run = |version: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
            .arg("info")
            .env("PTSIM_DRIVER_VERSION", version)
            .output()
            .expect("running prefix-tune");
        assert!(out.status.success(), "info failed: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let old = run("12080");
    assert!(old.contains("driver         CUDA 12.8"), "{old}");
    assert!(
        old.contains("none usable") && old.contains("CUDA 13.0 or newer") && old.contains("R580"),
        "{old}"
    );
    assert!(old.contains("the CPU reference engine"), "{old}");
    // No NVRTC on this library path: the run-time compilation fallback says why it cannot help
    // (tests/gpu_driver_fallback.rs runs it with one).
    assert!(old.contains("no NVRTC library"), "{old}");
    let new = run("13000");
    assert!(
        new.contains("driver         CUDA 13.0") && !new.contains("none usable"),
        "{new}"
    );
    // The GPU bench names the reason too (a non-zero exit, no panic).
    let out = Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
        .args([
            "bench", "train", "--device", "cuda", "--shape", "tiny-gpu", "--steps", "1",
        ])
        .env("PTSIM_DRIVER_VERSION", "12080")
        .output()
        .expect("running prefix-tune");
    let err = text(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("CUDA 12.8") && err.contains("R580"), "{err}");
}
