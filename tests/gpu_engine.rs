//! The GPU engine (`cuda::engine::CudaEngine`) against the CPU reference on the same weights,
//! rounded to fp16 first (what the GPU holds), so the comparison measures the engine and not the
//! weight rounding: per-sequence losses (rel ≤ 1e-2), the prefix gradient (cosine ≥ 0.999 and
//! rel ≤ 2e-2), a mixed-prefix batch against the same sequences one prefix at a time, and a short
//! training run whose loss curve tracks the CPU's. Models: GPT-2- and Llama-shaped random models
//! with head dim 64 (the fused kernels support 64 and 128), and SmolLM2-135M on real text (the GGUF
//! named by `PREFIX_TUNE_SMOLLM2_GGUF`, e.g. the first layers that the GPU check carries, else the
//! full GGUF in the cache; random weights and tokens of its shape without either).
//!
//! The tiny fixtures (`tests/fixtures/{gpt2,llama}_tiny`, head dims 12 and 8) cannot run on the
//! kernels: a test checks that the engine refuses them with a clear message (and runs without a
//! GPU).
//!
//! Without a usable GPU the GPU tests print SKIPPED and pass; with `PREFIX_TUNE_REQUIRE_GPU=1`
//! they fail instead (the device check script sets it).

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::cuda::GpuContext;
use prefix_tune::devices::open_engine;
use prefix_tune::engine::{CpuEngine, Device, Engine, GradOverflow};
use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::model::load_model;
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{Batch, Positions, RunOptions};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::{random_bank, random_batch, random_model};

const LOSS_TOL: f64 = 1e-2;
const GRAD_REL_TOL: f64 = 2e-2;
const GRAD_COS_MIN: f64 = 0.999;

fn require_gpu() -> bool {
    common::env_is_1("PREFIX_TUNE_REQUIRE_GPU")
}

/// The GPU engine on `weights`, or None (after a visible SKIPPED line) without a usable GPU.
fn gpu_engine_or_skip(test: &str, weights: Arc<ModelWeights<f32>>) -> Option<CudaEngine> {
    common::gpu_or_skip(test)?;
    Some(
        CudaEngine::new(weights)
            .unwrap_or_else(|e| panic!("{test}: opening the GPU engine: {e:#}")),
    )
}

fn bank_fp16(b: &PrefixBank<f32>) -> PrefixBank<f32> {
    let mut out = b.clone();
    for v in out.k.iter_mut().chain(out.v.iter_mut()) {
        for x in v.iter_mut() {
            *x = half::f16::from_f32(*x).to_f32();
        }
    }
    out
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

fn flat64(b: &PrefixBank<f32>) -> Vec<f64> {
    b.to_flat().iter().map(|&x| x as f64).collect()
}

/// GPU vs CPU (f32 reference on the same fp16-rounded weights) on one batch: losses and the
/// prefix gradient. Returns the worst relative error.
fn compare_case(
    what: &str,
    gpu: &mut CudaEngine,
    cpu: &mut CpuEngine,
    prefix: &PrefixBank<f32>,
    batch: &Batch,
    opts: &RunOptions,
) -> f64 {
    let (want, want_g) = cpu
        .loss_and_grad(prefix, batch, opts)
        .expect("CPU loss_and_grad");
    // An fp16 overflow at the current loss scale skips the call (the scale is halved): retry.
    let mut tries = 0;
    let (got, got_g) = loop {
        match gpu.loss_and_grad(prefix, batch, opts) {
            Ok(r) => break r,
            Err(e) if tries < 8 && e.is::<GradOverflow>() => tries += 1,
            Err(e) => panic!("{what}: GPU loss_and_grad: {e:#}"),
        }
    };
    let w64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let loss_err = rel_err(&w64(&got.loss_sum), &w64(&want.loss_sum));
    assert_eq!(got.n_targets, want.n_targets, "{what}: target counts");
    let (g, wg) = (flat64(&got_g), flat64(&want_g));
    assert!(
        g.iter().all(|x| x.is_finite()),
        "{what}: non-finite GPU gradient"
    );
    if wg.iter().all(|&x| x == 0.0) {
        // No target reaches a prefix (e.g. no labels): both gradients must be zero.
        assert!(
            g.iter().all(|&x| x == 0.0),
            "{what}: GPU gradient should be zero"
        );
    }
    let grad_err = if wg.iter().all(|&x| x == 0.0) {
        0.0
    } else {
        rel_err(&g, &wg)
    };
    let cos = if wg.iter().all(|&x| x == 0.0) {
        1.0
    } else {
        cosine(&g, &wg)
    };
    println!(
        "  {what}: mean loss GPU {:.6} CPU {:.6}; loss rel err {loss_err:.2e}; grad rel err \
         {grad_err:.2e}, cosine {cos:.6}; loss scale {} ({} overflow skips)",
        got.mean_loss,
        want.mean_loss,
        gpu.loss_scale(),
        gpu.overflow_skips()
    );
    assert!(
        loss_err <= LOSS_TOL,
        "{what}: loss relative error {loss_err:.3e}"
    );
    assert!(
        grad_err <= GRAD_REL_TOL,
        "{what}: gradient relative error {grad_err:.3e}"
    );
    assert!(cos >= GRAD_COS_MIN, "{what}: gradient cosine {cos:.6}");

    // The loss-only path agrees with the loss of the training path.
    let lo = gpu.loss(Some(prefix), batch, opts).expect("GPU loss");
    let lo_err = rel_err(&w64(&lo.loss_sum), &w64(&want.loss_sum));
    assert!(
        lo_err <= LOSS_TOL,
        "{what}: loss-only relative error {lo_err:.3e}"
    );
    loss_err.max(grad_err).max(lo_err)
}

/// Small random models with kernel-compatible head dims (64).
fn shaped_config(arch: Arch) -> ModelConfig {
    let mut cfg = prefix_tune::reference::testing::tiny_config(arch, arch == Arch::Gpt2);
    cfg.head_dim = 64;
    cfg.d_model = 128;
    cfg.vocab_size = 211;
    match arch {
        Arch::Gpt2 => {
            cfg.n_heads = 2;
            cfg.n_kv_heads = 2;
            cfg.d_ff = 256;
            cfg.max_positions = 96;
            cfg.bos_token_id = Some(210);
            cfg.eos_token_ids = vec![210];
        }
        Arch::Llama => {
            cfg.n_heads = 4; // q_dim 256 != d_model: the projections are not square
            cfg.n_kv_heads = 2;
            cfg.d_ff = 192;
        }
    }
    cfg
}

fn shaped_setup(arch: Arch, seed: u64) -> (Arc<ModelWeights<f32>>, PrefixBank<f32>) {
    let cfg = shaped_config(arch);
    let w = random_model(&cfg, 0.08, seed)
        .cast::<f32>()
        .rounded_to_f16();
    let bank = bank_fp16(&random_bank(&cfg, 2, 7, 0.5, seed + 1).cast::<f32>());
    (Arc::new(w), bank)
}

fn family_case(test: &str, arch: Arch, seed: u64) {
    let (w, bank) = shaped_setup(arch, seed);
    let Some(mut gpu) = gpu_engine_or_skip(test, w.clone()) else {
        return;
    };
    println!("{test}: {}", gpu.describe());
    let mut cpu = CpuEngine::new(w.clone());
    let cfg = w.config.clone();
    let mut worst = 0.0f64;
    let mut n = 0;
    for (b, t, positions, seed) in [
        (3, 37, Positions::AfterPrefix, 1),
        (2, 70, Positions::AfterPrefix, 2),
        (4, 1, Positions::AfterPrefix, 3),
        (3, 29, Positions::FromZero, 4),
    ] {
        let batch = random_batch(&cfg, b, t, bank.n_prefixes, seed);
        let opts = RunOptions { positions };
        let what = format!("B={b} T={t} P={} {positions:?}", bank.len);
        worst = worst.max(compare_case(
            &what, &mut gpu, &mut cpu, &bank, &batch, &opts,
        ));
        n += 1;
    }
    // Activation recomputation: the same comparison.
    gpu.set_recompute(true);
    let batch = random_batch(&cfg, 3, 37, bank.n_prefixes, 1);
    worst = worst.max(compare_case(
        "B=3 T=37 recomputation",
        &mut gpu,
        &mut cpu,
        &bank,
        &batch,
        &RunOptions::default(),
    ));
    n += 1;
    gpu.set_recompute(false);
    // No prefix at all (the base model's loss).
    let batch = random_batch(&cfg, 2, 33, 1, 9);
    let want = cpu.loss(None, &batch, &RunOptions::default()).unwrap();
    let got = gpu.loss(None, &batch, &RunOptions::default()).unwrap();
    let e = rel_err(&[got.mean_loss as f64], &[want.mean_loss as f64]);
    println!(
        "  no prefix: mean loss GPU {} CPU {}, rel err {e:.2e}",
        got.mean_loss, want.mean_loss
    );
    assert!(e <= LOSS_TOL);
    worst = worst.max(e);
    n += 1;
    println!(
        "  peak device memory {:.1} MiB, workspace {:.1} MiB",
        gpu.peak_device_memory() as f64 / 1048576.0,
        gpu.workspace_bytes() as f64 / 1048576.0
    );
    println!("RESULT gpu_engine/{test}: {n} cases, worst relative error {worst:.2e}");
}

#[test]
fn gpt2_shaped_loss_and_grad() {
    family_case("gpt2_shaped_loss_and_grad", Arch::Gpt2, 101);
}

#[test]
fn llama_shaped_loss_and_grad() {
    family_case("llama_shaped_loss_and_grad", Arch::Llama, 202);
}

#[test]
fn mixed_prefix_batch_equals_one_prefix_at_a_time() {
    let test = "mixed_prefix_batch_equals_one_prefix_at_a_time";
    let (w, bank) = shaped_setup(Arch::Llama, 303);
    let Some(mut gpu) = gpu_engine_or_skip(test, w.clone()) else {
        return;
    };
    let cfg = w.config.clone();
    let batch = random_batch(&cfg, 4, 21, 2, 5); // prefixes 0, 1, 0, 1
    let opts = RunOptions::default();
    let mixed = gpu.loss(Some(&bank), &batch, &opts).unwrap();
    let mut worst = 0.0f64;
    for b in 0..batch.batch {
        let s = batch.seq;
        let one = Batch {
            batch: 1,
            seq: s,
            tokens: batch.tokens[b * s..(b + 1) * s].to_vec(),
            labels: batch.labels[b * s..(b + 1) * s].to_vec(),
            valid_len: vec![batch.valid_len[b]],
            prefix_index: vec![0],
        };
        let alone = gpu
            .loss(Some(&bank.select(batch.prefix_index[b])), &one, &opts)
            .unwrap();
        let e = rel_err(&[alone.loss_sum[0] as f64], &[mixed.loss_sum[b] as f64]);
        println!(
            "  sequence {b} (prefix {}): mixed {} alone {} rel err {e:.2e}",
            batch.prefix_index[b], mixed.loss_sum[b], alone.loss_sum[0]
        );
        assert!(e <= LOSS_TOL, "sequence {b}: {e:.3e}");
        worst = worst.max(e);
    }
    println!(
        "RESULT gpu_engine/{test}: {} cases, worst relative error {worst:.2e}",
        batch.batch
    );
}

#[test]
fn training_run_tracks_the_cpu() {
    let test = "training_run_tracks_the_cpu";
    let (w, bank0) = shaped_setup(Arch::Gpt2, 404);
    let Some(mut gpu) = gpu_engine_or_skip(test, w.clone()) else {
        return;
    };
    let mut cpu = CpuEngine::new(w.clone());
    let cfg = w.config.clone();
    let batch = random_batch(&cfg, 4, 24, 2, 6);
    let opts = RunOptions::default();
    let lr = 0.5f32;
    let mut curves = Vec::new();
    for engine in [&mut gpu as &mut dyn Engine, &mut cpu as &mut dyn Engine] {
        let mut bank = bank0.clone();
        let mut losses = Vec::new();
        for step in 0..20 {
            // An fp16 overflow skips a step in training; here the step is redone at the
            // lowered scale so both curves have 20 updates.
            let mut tries = 0;
            let (out, g) = loop {
                match engine.loss_and_grad(&bank, &batch, &opts) {
                    Ok(r) => break r,
                    Err(e) if e.is::<GradOverflow>() && tries < 8 => {
                        println!("  step {step}: {e}");
                        tries += 1;
                    }
                    Err(e) => panic!("step {step}: {e:#}"),
                }
            };
            losses.push(out.mean_loss as f64);
            let mut flat = bank.to_flat();
            flat.iter_mut()
                .zip(g.to_flat())
                .for_each(|(p, g)| *p -= lr * g);
            bank.copy_from_flat(&flat);
        }
        curves.push(losses);
    }
    let (g, c) = (&curves[0], &curves[1]);
    println!("  GPU losses {g:.4?}\n  CPU losses {c:.4?}");
    assert!(
        c[19] < c[0],
        "the CPU run must learn (loss {} -> {})",
        c[0],
        c[19]
    );
    assert!(
        g[19] < g[0],
        "the GPU run must learn (loss {} -> {})",
        g[0],
        g[19]
    );
    let e = rel_err(g, c);
    assert!(e <= LOSS_TOL, "loss curves differ: rel err {e:.3e}");
    println!("RESULT gpu_engine/{test}: 20 cases, worst relative error {e:.2e}");
}

#[test]
fn smollm2_loss_and_grad() {
    let test = "smollm2_loss_and_grad";
    if common::gpu_or_skip(test).is_none() {
        return;
    }
    // Real weights when there are any: the GGUF named by PREFIX_TUNE_SMOLLM2_GGUF (scripts/gpu-check
    // carries the first layers of the model there), else the full model in the cache.
    let full_layers = prefix_tune::reference::testing::smollm2_135m_config().n_layers;
    let path = std::env::var_os("PREFIX_TUNE_SMOLLM2_GGUF")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| Some(prefix_tune::assets::smollm2_gguf_path()).filter(|p| p.is_file()));
    let (w, tokenizer, source) = match path {
        Some(path) => {
            let m =
                load_model(&path).unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()));
            let n = m.weights.config.n_layers;
            let what = if n == full_layers {
                format!("real SmolLM2 weights, all {n} layers")
            } else {
                format!("real SmolLM2 weights, {n} of {full_layers} layers")
            };
            let source = format!("{what} ({})", path.display());
            (m.weights, Some(m.tokenizer), source)
        }
        None => {
            let cfg = prefix_tune::reference::testing::smollm2_135m_config();
            (
                random_model(&cfg, 0.05, 7).cast::<f32>(),
                None,
                "random weights and tokens of SmolLM2-135M's shape (no GGUF: \
                 PREFIX_TUNE_SMOLLM2_GGUF unset and none in the cache)"
                    .into(),
            )
        }
    };
    println!("{test}: weights: {source}");
    let w = Arc::new(w.rounded_to_f16());
    let Some(mut gpu) = gpu_engine_or_skip(test, w.clone()) else {
        return;
    };
    let mut cpu = CpuEngine::new(w.clone());
    let cfg = w.config.clone();
    // Real-word prefixes with real weights (random ones make the fp16 gradient of a deep real
    // model's first layers ill-conditioned: see tests/gpu_smollm2.rs).
    let bank = match &tokenizer {
        Some(t) => {
            let texts = [
                "Describe the restaurant in one sentence:",
                "Answer with a number only:",
            ];
            common::real_word_bank(&w, &texts.map(|s| t.encode(s).expect("encoding")))
        }
        None => bank_fp16(&random_bank(&cfg, 2, 10, 0.5, 8).cast::<f32>()),
    };
    // With the model's tokenizer: two chat prompt/answer pairs of different lengths (loss on the
    // answers), one per prefix; else random tokens.
    const PAIRS: [(&str, &str); 2] = [
        (
            "<|im_start|>user\nWhat is the capital of France, and what is it known for?\
             <|im_end|>\n<|im_start|>assistant\n",
            "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and its \
             cafés along the Seine.",
        ),
        (
            "<|im_start|>user\nAdd 17 and 25.<|im_end|>\n<|im_start|>assistant\n",
            "17 + 25 = 42.",
        ),
    ];
    let batch = match &tokenizer {
        Some(t) => {
            let enc = |s: &str| {
                t.encode(s)
                    .unwrap_or_else(|e| panic!("encoding {s:?}: {e:#}"))
            };
            let pairs = PAIRS.map(|(i, o)| (enc(i), enc(o)));
            let eos = t.eos_token_ids().first().copied();
            Batch::from_pairs(&pairs, eos, eos.unwrap_or(0)).with_prefix_index(vec![0, 1])
        }
        None => random_batch(&cfg, 2, 48, 2, 9),
    };
    let e = compare_case(
        &format!("SmolLM2 B=2 T={} P={}", batch.seq, bank.len),
        &mut gpu,
        &mut cpu,
        &bank,
        &batch,
        &RunOptions::default(),
    );
    println!("RESULT gpu_engine/{test}: 1 cases, worst relative error {e:.2e}");
}

#[test]
fn tiny_fixtures_are_refused_with_a_clear_message() {
    // Runs everywhere: the head-dim check comes before any GPU work.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if !root.is_dir() {
        // A bundled test binary run away from the source tree (scripts/gpu-check).
        let _ = writeln!(
            std::io::stderr(),
            "note: tiny_fixtures_are_refused_with_a_clear_message not run: no {}",
            root.display()
        );
        return;
    }
    for name in ["gpt2_tiny", "llama_tiny"] {
        let m = load_model(&root.join(name)).unwrap();
        let hd = m.weights.config.head_dim;
        let err = match CudaEngine::new(Arc::new(m.weights)) {
            Ok(_) => panic!("{name}: head dim {hd} accepted by the GPU engine"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("head dim")
                && err.contains(&hd.to_string())
                && err.contains("--device cpu"),
            "{name}: unclear refusal: {err}"
        );
    }
}

#[test]
fn device_choice_without_and_with_a_gpu() {
    // Runs everywhere: `auto` picks the GPU engine exactly when a GPU is usable, and `cuda`
    // without one is an error that says why (never a panic).
    let (w, _) = shaped_setup(Arch::Llama, 505);
    let gpu = GpuContext::new(0);
    let auto = open_engine(w.clone(), Device::Auto).expect("auto always opens an engine");
    let cuda = open_engine(w.clone(), Device::Cuda);
    match gpu {
        Ok(_) => {
            assert!(
                auto.describe().contains("fused prefix attention"),
                "{}",
                auto.describe()
            );
            assert!(
                cuda.is_ok(),
                "--device cuda with a GPU: {:#}",
                cuda.err().unwrap()
            );
        }
        Err(e) => {
            if require_gpu() {
                panic!("PREFIX_TUNE_REQUIRE_GPU=1 but no usable GPU: {e:#}");
            }
            assert!(auto.describe().contains("CPU"), "{}", auto.describe());
            let msg = format!(
                "{:#}",
                cuda.err().expect("--device cuda without a GPU must fail")
            );
            assert!(msg.contains("--device cuda"), "{msg}");
        }
    }
}

#[test]
fn greedy_generation_equals_the_cpu() {
    let test = "greedy_generation_equals_the_cpu";
    for (arch, seed) in [(Arch::Gpt2, 606), (Arch::Llama, 707)] {
        let (w, bank) = shaped_setup(arch, seed);
        let Some(mut gpu) = gpu_engine_or_skip(test, w.clone()) else {
            return;
        };
        let mut cpu = CpuEngine::new(w.clone());
        let opts = RunOptions::default();
        let index = [Some(0), None, Some(1)];
        let mut ce = cpu.begin_decode(Some(&bank), &index, &opts).unwrap();
        // A small headroom: the KV cache has to grow (twice) during the 16 steps.
        gpu.set_decode_headroom(4);
        let mut ge = gpu.begin_decode(Some(&bank), &index, &opts).unwrap();
        let vocab = w.config.vocab_size;
        let mut feed: Vec<Vec<u32>> = vec![vec![3, 14, 15, 9, 2], vec![26, 5], vec![35, 8, 9]];
        let mut worst = 0.0f64;
        for step in 0..16 {
            if step == 8 {
                // Beam-style reorder: the KV cache rows are gathered on the device.
                let rows = [2, 0, 0];
                ce.reorder(&rows).unwrap();
                ge.reorder(&rows).unwrap();
                feed = rows.iter().map(|&r| feed[r].clone()).collect();
            }
            let want = cpu.decode(ce.as_mut(), &feed).unwrap();
            let got = gpu.decode(ge.as_mut(), &feed).unwrap();
            let w64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let e = rel_err(&w64(&got), &w64(&want));
            worst = worst.max(e);
            assert!(
                e <= LOSS_TOL,
                "{arch:?} step {step}: logits rel err {e:.3e}"
            );
            let argmax =
                |x: &[f32]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as u32;
            feed = (0..3)
                .map(|b| {
                    let (g, c) = (
                        argmax(&got[b * vocab..(b + 1) * vocab]),
                        argmax(&want[b * vocab..(b + 1) * vocab]),
                    );
                    assert_eq!(
                        g, c,
                        "{arch:?} step {step}, sequence {b}: greedy tokens differ"
                    );
                    vec![c]
                })
                .collect();
        }
        println!(
            "  {arch:?}: 16 greedy tokens equal (KV cache, a reorder at step 8), worst logits \
             rel err {worst:.2e}"
        );
        println!("RESULT gpu_engine/{test}_{arch:?}: 16 cases, worst relative error {worst:.2e}");
    }
}
