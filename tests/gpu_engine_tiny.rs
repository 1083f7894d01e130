//! The GPU engine (`cuda::engine::CudaEngine`) on tiny models, against the CPU reference on the
//! same fp16-rounded weights: per-sequence losses (rel ≤ 1e-2), the prefix gradient (cosine ≥
//! 0.999, rel ≤ 2e-2), both families (GPT-2: LayerNorm, biases, learned positions, GELU, tied
//! head; Llama: RMSNorm, RoPE, GQA, SwiGLU, untied head, q_dim ≠ d_model), mixed prefixes,
//! padding, both position conventions, several head chunks, and the loss-scale overflow (the
//! call returns `GradOverflow` with the loss and a halved scale; the step is skipped).
//!
//! Small models with head dim 64 (what the attention kernels support).
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use common::host_gpu_or_skip;
use common::tiny::{cosine, f64s, setup};
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::engine::{CpuEngine, Engine, GradOverflow};
use prefix_tune::model::config::Arch;
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{Batch, Positions, RunOptions};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::random_batch;

const LOSS_TOL: f64 = 1e-2;
const GRAD_REL_TOL: f64 = 2e-2;
const GRAD_COS_MIN: f64 = 0.999;

/// Emulated engine vs CPU reference on one batch; returns the worst error.
fn compare(
    what: &str,
    gpu: &mut CudaEngine,
    cpu: &mut CpuEngine,
    bank: &PrefixBank<f32>,
    batch: &Batch,
    opts: &RunOptions,
) -> f64 {
    let (want, want_g) = cpu.loss_and_grad(bank, batch, opts).unwrap();
    let (got, got_g) = gpu.loss_and_grad(bank, batch, opts).unwrap();
    assert_eq!(got.n_targets, want.n_targets, "{what}: target counts");
    let loss_err = rel_err(&f64s(&got.loss_sum), &f64s(&want.loss_sum));
    let (g, wg) = (f64s(&got_g.to_flat()), f64s(&want_g.to_flat()));
    assert!(
        g.iter().all(|x| x.is_finite()),
        "{what}: non-finite gradient"
    );
    let grad_err = rel_err(&g, &wg);
    let cos = cosine(&g, &wg);
    println!(
        "  {what}: mean loss gpu {:.6} CPU {:.6}; loss rel err {loss_err:.2e}; prefix grad rel \
         err {grad_err:.2e}, cosine {cos:.6}",
        got.mean_loss, want.mean_loss
    );
    assert!(loss_err <= LOSS_TOL, "{what}: loss rel err {loss_err:.3e}");
    assert!(
        grad_err <= GRAD_REL_TOL,
        "{what}: gradient rel err {grad_err:.3e}"
    );
    assert!(cos >= GRAD_COS_MIN, "{what}: gradient cosine {cos:.6}");
    loss_err.max(grad_err)
}

fn family(test: &str, arch: Arch, seed: u64) {
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(arch, seed);
    let mut gpu = CudaEngine::new(s.weights.clone()).unwrap();
    let mut cpu = CpuEngine::new(s.weights.clone());
    println!("{test}: {}", gpu.describe());
    let cfg = s.weights.config.clone();
    let mut worst = 0.0f64;
    // Mixed prefixes (0, 1, 0), padding, T not a multiple of the tiles.
    let batch = random_batch(&cfg, 3, 19, 2, seed + 2);
    worst = worst.max(compare(
        "B=3 T=19 P=5",
        &mut gpu,
        &mut cpu,
        &s.bank,
        &batch,
        &RunOptions::default(),
    ));
    // The LM head in chunks of 7 rows (several chunks, the last one partial).
    gpu.set_head_chunk_elems(7 * cfg.vocab_size);
    worst = worst.max(compare(
        "B=3 T=19 P=5, head chunks of 7 rows",
        &mut gpu,
        &mut cpu,
        &s.bank,
        &batch,
        &RunOptions::default(),
    ));
    // Positions from zero; a smaller batch reusing the grown workspace.
    let batch = random_batch(&cfg, 2, 11, 2, seed + 3);
    let opts = RunOptions {
        positions: Positions::FromZero,
    };
    worst = worst.max(compare(
        "B=2 T=11 FromZero",
        &mut gpu,
        &mut cpu,
        &s.bank,
        &batch,
        &opts,
    ));
    // The loss alone, without a prefix.
    let batch = random_batch(&cfg, 2, 9, 1, seed + 4);
    let got = gpu.loss(None, &batch, &RunOptions::default()).unwrap();
    let want = cpu.loss(None, &batch, &RunOptions::default()).unwrap();
    let e = rel_err(&f64s(&got.loss_sum), &f64s(&want.loss_sum));
    println!("  no prefix: loss rel err {e:.2e}");
    assert!(e <= LOSS_TOL);
    worst = worst.max(e);
    println!("RESULT gpu_engine_tiny/{test}: 4 cases, worst relative error {worst:.2e}");
}

#[test]
fn gpt2_engine_matches_the_reference() {
    family("gpt2_engine_matches_the_reference", Arch::Gpt2, 11);
}

#[test]
fn llama_engine_matches_the_reference() {
    family("llama_engine_matches_the_reference", Arch::Llama, 22);
}

#[test]
fn loss_scale_overflow_skips_the_step() {
    let test = "loss_scale_overflow_skips_the_step";
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(Arch::Llama, 33);
    let mut gpu = CudaEngine::new(s.weights.clone()).unwrap();
    let mut cpu = CpuEngine::new(s.weights.clone());
    let cfg = s.weights.config.clone();
    let batch = random_batch(&cfg, 2, 8, 2, 34);
    let opts = RunOptions::default();
    let (want, want_g) = cpu.loss_and_grad(&s.bank, &batch, &opts).unwrap();
    // 2^22 / (a dozen targets) puts the logits' gradient far beyond fp16's 65504.
    let start = 4194304.0f32;
    gpu.set_loss_scale(start);
    let mut scale = start;
    let mut skips = 0u64;
    let mut worst_loss = 0.0f64;
    let (got, got_g) = loop {
        assert!(skips < 12, "still overflowing after {skips} skipped calls");
        match gpu.loss_and_grad(&s.bank, &batch, &opts) {
            Ok(r) => break r,
            Err(e) => {
                let o = e
                    .downcast_ref::<GradOverflow>()
                    .unwrap_or_else(|| panic!("not a GradOverflow: {e:#}"));
                skips += 1;
                assert_eq!(o.scale, scale, "the overflow names the scale it ran at");
                assert_eq!(o.new_scale, scale / 2.0, "the scale is halved");
                assert_eq!(
                    gpu.loss_scale(),
                    o.new_scale,
                    "the engine took the new scale"
                );
                assert!(
                    o.loss.mean_loss.is_finite(),
                    "the overflowed call's loss is finite"
                );
                let el = rel_err(&f64s(&o.loss.loss_sum), &f64s(&want.loss_sum));
                println!(
                    "  skip {skips}: scale {} -> {}, loss {:.6} (CPU {:.6}), rel err {el:.2e}; {o}",
                    o.scale, o.new_scale, o.loss.mean_loss, want.mean_loss
                );
                assert!(el <= 1e-4, "the overflowed call's loss: rel err {el:.3e}");
                worst_loss = worst_loss.max(el);
                scale = o.new_scale;
            }
        }
    };
    assert!(skips >= 1, "2^22 must overflow at least once");
    assert_eq!(
        gpu.overflow_skips(),
        skips,
        "overflow_skips counts the Errs"
    );
    assert_eq!(gpu.loss_scale(), scale, "no change on the clean call");
    let loss_err = rel_err(&f64s(&got.loss_sum), &f64s(&want.loss_sum));
    let (g, wg) = (f64s(&got_g.to_flat()), f64s(&want_g.to_flat()));
    assert!(g.iter().all(|x| x.is_finite()), "non-finite gradient");
    let grad_err = rel_err(&g, &wg);
    let cos = cosine(&g, &wg);
    println!(
        "  clean at scale {scale} after {skips} skips: loss rel err {loss_err:.2e}, prefix grad \
         rel err {grad_err:.2e}, cosine {cos:.6}"
    );
    assert!(loss_err <= LOSS_TOL, "loss rel err {loss_err:.3e}");
    assert!(grad_err <= GRAD_REL_TOL, "gradient rel err {grad_err:.3e}");
    assert!(cos >= GRAD_COS_MIN, "gradient cosine {cos:.6}");
    println!(
        "RESULT gpu_engine_tiny/{test}: {skips} skipped calls, worst skipped-loss rel err \
         {worst_loss:.2e}, gradient rel err {grad_err:.2e}"
    );
}

#[test]
fn mixed_prefix_batch_equals_one_prefix_at_a_time() {
    let test = "mixed_prefix_batch_equals_one_prefix_at_a_time";
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(Arch::Gpt2, 44);
    let mut gpu = CudaEngine::new(s.weights.clone()).unwrap();
    let cfg = s.weights.config.clone();
    let batch = random_batch(&cfg, 3, 9, 2, 45); // prefixes 0, 1, 0
    let opts = RunOptions::default();
    let mixed = gpu.loss(Some(&s.bank), &batch, &opts).unwrap();
    for b in 0..batch.batch {
        let t = batch.seq;
        let one = Batch {
            batch: 1,
            seq: t,
            tokens: batch.tokens[b * t..(b + 1) * t].to_vec(),
            labels: batch.labels[b * t..(b + 1) * t].to_vec(),
            valid_len: vec![batch.valid_len[b]],
            prefix_index: vec![0],
        };
        let alone = gpu
            .loss(Some(&s.bank.select(batch.prefix_index[b])), &one, &opts)
            .unwrap();
        let e = rel_err(&[alone.loss_sum[0] as f64], &[mixed.loss_sum[b] as f64]);
        println!(
            "  sequence {b} (prefix {}): mixed {} alone {} rel err {e:.2e}",
            batch.prefix_index[b], mixed.loss_sum[b], alone.loss_sum[0]
        );
        assert!(e <= 1e-3, "sequence {b}: {e:.3e}");
    }
}

#[test]
fn recomputation_gives_the_same_gradient() {
    let test = "recomputation_gives_the_same_gradient";
    if !host_gpu_or_skip(test) {
        return;
    }
    {
        let (arch, seed) = (Arch::Llama, 66);
        let s = setup(arch, seed);
        let mut gpu = CudaEngine::new(s.weights.clone()).unwrap();
        let mut cpu = CpuEngine::new(s.weights.clone());
        let cfg = s.weights.config.clone();
        let batch = random_batch(&cfg, 2, 9, 2, seed + 1);
        let opts = RunOptions::default();
        let (kept, kept_g) = gpu.loss_and_grad(&s.bank, &batch, &opts).unwrap();
        let kept_bytes = gpu.workspace_bytes();
        gpu.set_recompute(true);
        compare(
            &format!("{arch:?} with recomputation"),
            &mut gpu,
            &mut cpu,
            &s.bank,
            &batch,
            &opts,
        );
        let (re, re_g) = gpu.loss_and_grad(&s.bank, &batch, &opts).unwrap();
        // The same kernels on the same inputs: bitwise the same results.
        assert_eq!(re.loss_sum, kept.loss_sum, "{arch:?}: losses");
        assert_eq!(
            re_g.to_flat(),
            kept_g.to_flat(),
            "{arch:?}: prefix gradients"
        );
        println!(
            "  {arch:?}: workspace {} bytes keeping activations, {} recomputing",
            kept_bytes,
            gpu.workspace_bytes()
        );
        assert!(gpu.workspace_bytes() < kept_bytes);
    }
}

/// Greedy decoding with both engines from the same prompts; returns the worst logits error.
fn greedy_both(
    gpu: &mut CudaEngine,
    cpu: &mut CpuEngine,
    bank: &PrefixBank<f32>,
    index: &[Option<usize>],
    prompts: &[Vec<u32>],
    steps: usize,
    reorder_at: Option<(usize, Vec<usize>)>,
) -> f64 {
    let opts = RunOptions::default();
    let mut ce = cpu.begin_decode(Some(bank), index, &opts).unwrap();
    let mut ge = gpu.begin_decode(Some(bank), index, &opts).unwrap();
    let vocab = gpu.config().vocab_size;
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut worst = 0.0f64;
    for step in 0..steps {
        if let Some((at, rows)) = &reorder_at {
            if step == *at {
                ce.reorder(rows).unwrap();
                ge.reorder(rows).unwrap();
                feed = rows.iter().map(|&r| feed[r].clone()).collect();
            }
        }
        let want = cpu.decode(ce.as_mut(), &feed).unwrap();
        let got = gpu.decode(ge.as_mut(), &feed).unwrap();
        let e = rel_err(&f64s(&got), &f64s(&want));
        worst = worst.max(e);
        assert!(e <= LOSS_TOL, "step {step}: logits rel err {e:.3e}");
        let argmax =
            |x: &[f32]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as u32;
        feed = (0..feed.len())
            .map(|b| {
                let (g, w) = (
                    argmax(&got[b * vocab..(b + 1) * vocab]),
                    argmax(&want[b * vocab..(b + 1) * vocab]),
                );
                assert_eq!(g, w, "step {step}, sequence {b}: greedy tokens differ");
                vec![w]
            })
            .collect();
    }
    worst
}

#[test]
fn greedy_decoding_matches_the_reference() {
    let test = "greedy_decoding_matches_the_reference";
    if !host_gpu_or_skip(test) {
        return;
    }
    for (arch, seed) in [(Arch::Gpt2, 77), (Arch::Llama, 88)] {
        let s = setup(arch, seed);
        let mut gpu = CudaEngine::new(s.weights.clone()).unwrap();
        let mut cpu = CpuEngine::new(s.weights.clone());
        let prompts = vec![vec![3, 14, 15, 9, 2], vec![26, 5], vec![35, 8, 9]];
        // Mixed prefixes and no prefix in one batch; a beam-style reorder half-way.
        let worst = greedy_both(
            &mut gpu,
            &mut cpu,
            &s.bank,
            &[Some(0), None, Some(1)],
            &prompts,
            8,
            Some((4, vec![2, 0, 0])),
        );
        println!("  {arch:?}: 8 greedy tokens equal, worst logits rel err {worst:.2e}");
    }
}

#[test]
fn training_loop_tracks_the_cpu() {
    let test = "training_loop_tracks_the_cpu";
    if !host_gpu_or_skip(test) {
        return;
    }
    use prefix_tune::data::Encoded;
    use prefix_tune::prefix::PrefixMeta;
    use prefix_tune::train::{
        train, OptimizerKind, RunSetup, ScheduleKind, TrainConfig, Trainable,
    };
    use rand::{Rng, SeedableRng};
    // The real training loop (`train --device cuda`'s: micro-batches, clipping and AdamW through
    // the engine's `apply_update`, on the device optimizer kernels) for
    // 20 steps, against the same loop on the CPU reference.
    let s = setup(Arch::Llama, 909);
    let cfg = s.weights.config.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(910);
    let items: Vec<Encoded> = (0..8)
        .map(|_| {
            let n_in = rng.random_range(4..9);
            let n_out = rng.random_range(2..6);
            let mut tok = || rng.random_range(0..cfg.vocab_size as u32);
            Encoded {
                input: (0..n_in).map(|_| tok()).collect(),
                target: (0..n_out).map(|_| tok()).collect(),
            }
        })
        .collect();
    let config = TrainConfig {
        optimizer: OptimizerKind::Adamw,
        lr: 2e-2,
        weight_decay: 0.0,
        warmup_steps: 2,
        schedule: ScheduleKind::Constant,
        max_grad_norm: 1.0,
        steps: 20,
        batch_size: 2,
        grad_accum: 2,
        seed: 911,
        eval_every: 0,
        save_every: 0,
    };
    let mut init = s.bank.clone();
    init.n_prefixes = 1;
    for l in 0..init.n_layers {
        let per = init.prefix_len_elems();
        init.k[l].truncate(per);
        init.v[l].truncate(per);
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = PrefixMeta::for_model(
        &cfg,
        init.len,
        "test",
        Positions::AfterPrefix,
        &serde_json::json!({}),
    );
    let mut curves = Vec::new();
    // What `open_engine` gives `--device cuda`: the model engine with the device optimizer.
    let mut gpu = prefix_tune::cuda::device_optim::DeviceOptimEngine::new(
        CudaEngine::new(s.weights.clone()).unwrap(),
    );
    let mut cpu = CpuEngine::new(s.weights.clone());
    for (name, engine) in [
        ("GPU", &mut gpu as &mut dyn Engine),
        ("cpu", &mut cpu as &mut dyn Engine),
    ] {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let setup = RunSetup {
            out: &out,
            run: RunOptions::default(),
            pad_id: 0,
            meta: meta.clone(),
            args: serde_json::json!({}),
            stop_after: None,
            progress: false,
        };
        let done = train(
            engine,
            &config,
            Trainable::Bank(init.clone()),
            None,
            &items,
            &[],
            &setup,
        )
        .unwrap();
        let losses: Vec<f64> = done.state.history.iter().filter_map(|r| r.loss).collect();
        assert_eq!(losses.len(), 20, "{name}: one loss per step");
        assert_eq!(done.state.overflow_skipped, 0, "{name}: no skipped step");
        curves.push(losses);
    }
    let (g, c) = (&curves[0], &curves[1]);
    println!("  GPU losses {g:.4?}\n  CPU losses {c:.4?}");
    let first = |v: &[f64]| v[..4].iter().sum::<f64>();
    let last = |v: &[f64]| v[16..].iter().sum::<f64>();
    assert!(last(c) < first(c), "the CPU run must learn");
    assert!(last(g) < first(g), "the GPU run must learn");
    let e = rel_err(g, c);
    assert!(e <= LOSS_TOL, "loss curves differ: rel err {e:.3e}");
    println!("RESULT gpu_engine_tiny/{test}: 20 cases, worst relative error {e:.2e}");
}
