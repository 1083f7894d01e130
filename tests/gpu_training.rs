//! The device-resident training state of `train --device cuda` (`cuda::training`: a prefix
//! bank's fp32 master, gradient and optimizer moments on the device, one small read per step)
//! against the host-side state on the same engine: the same losses, norms and updates (AdamW and
//! SGD with momentum, clipping on and off), an exact resume from its snapshot, the fp16
//! overflow skip (nothing changed, the scale halved), and — on the simulated device, whose
//! counters are exact — one read back and no parameter copies per step, with the host-side state
//! as the negative control.
//!
//! Runs on GPU 0: a real card, or the simulated CUDA device (`scripts/sim`, which CI uses).
//! Skips with a visible message without one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.
//! The tests take one lock, so the device's counters see one test at a time.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::host_gpu_or_skip;
use common::tiny::{cosine, f64s, setup};
use prefix_tune::cuda::context::SimCounts;
use prefix_tune::cuda::device_optim::DeviceOptimEngine;
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::engine::{Engine, StepOutcome, StepRequest};
use prefix_tune::model::config::{Arch, ModelConfig};
use prefix_tune::optim::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{Batch, RunOptions};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::random_batch;
use prefix_tune::train::Trainable;

/// One test at a time on the device (the simulator's counters are per process).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `open_engine` gives `--device cuda`: the model engine with the device optimizer.
fn device_engine(
    s: &common::tiny::Setup,
) -> DeviceOptimEngine<prefix_tune::cuda::backend::GpuBackend> {
    DeviceOptimEngine::new(CudaEngine::new(s.weights.clone()).unwrap())
}

/// The first prefix of `bank` alone (what `train` trains).
fn one_prefix(bank: &PrefixBank<f32>) -> PrefixBank<f32> {
    let mut b = bank.clone();
    b.n_prefixes = 1;
    let per = b.prefix_len_elems();
    for l in 0..b.n_layers {
        b.k[l].truncate(per);
        b.v[l].truncate(per);
    }
    b
}

/// `steps` steps of two micro-batches each (random lengths, padding, ~75% targets).
fn step_batches(cfg: &ModelConfig, steps: usize, seed: u64) -> Vec<(Vec<Batch>, usize)> {
    (0..steps)
        .map(|s| {
            let micro: Vec<Batch> = (0..2)
                .map(|m| random_batch(cfg, 2, 9, 1, seed + 10 * s as u64 + m))
                .collect();
            let n = micro
                .iter()
                .map(|b| b.n_targets().iter().sum::<usize>())
                .sum();
            (micro, n)
        })
        .collect()
}

fn adamw(n: usize) -> Optimizer {
    Optimizer::AdamW(AdamW::new(
        AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        n,
    ))
}

fn sgd_momentum() -> Optimizer {
    Optimizer::Sgd(Sgd::new(SgdConfig {
        momentum: 0.9,
        weight_decay: 0.01,
    }))
}

/// Runs `steps` through `engine`'s training interface from `bank` and `optimizer`: each step's
/// outcome, then the final prefix and optimizer.
fn train_steps(
    engine: &mut dyn Engine,
    trainable: Trainable,
    optimizer: Optimizer,
    steps: &[(Vec<Batch>, usize)],
    lr: f64,
    clip: f64,
) -> (Vec<StepOutcome>, Trainable, Optimizer) {
    let opts = RunOptions::default();
    let mut state = engine.begin_training(trainable, optimizer).unwrap();
    let outcomes = steps
        .iter()
        .map(|(micro, n)| {
            let req = StepRequest {
                micro,
                n_targets: *n,
                opts: &opts,
                lr,
                max_grad_norm: clip,
            };
            engine.train_step(state.as_mut(), &req).unwrap()
        })
        .collect();
    let (t, o) = engine.training_snapshot(state.as_mut()).unwrap();
    (outcomes, t, o)
}

fn updated(o: &StepOutcome) -> (f64, f64) {
    match o {
        StepOutcome::Updated {
            loss_sum,
            grad_norm,
            ..
        } => (*loss_sum, *grad_norm),
        other => panic!("expected an updated step, got {other:?}"),
    }
}

fn moments(o: &Optimizer) -> (u64, Vec<f64>) {
    match o {
        Optimizer::AdamW(a) => (a.step, f64s(&[a.m.clone(), a.v.clone()].concat())),
        Optimizer::Sgd(s) => (s.step, f64s(&s.buf)),
    }
}

/// The device-resident step against the host-side one. Both run the same kernels, but the
/// device step scales the loss by the whole step's target count before the fp16 backward while
/// the host step scales each micro-batch by its own and reweights in fp32, so the gradients
/// differ by fp16 rounding (~1e-3 relative); AdamW's first steps (m/√v ≈ sign g) magnify that for
/// the gradient's near-zero elements.
/// (SGD is linear in the gradient: its updates agree to the gradients' ~1e-4.)
const ADAMW_UPDATE_TOL: f64 = 5e-2;
const ADAMW_UPDATE_COS_MIN: f64 = 0.999;
const SGD_UPDATE_TOL: f64 = 1e-3;
const MOMENT_TOL: f64 = 5e-3;

#[test]
fn device_resident_training_equals_the_host_state() {
    // `train --device cuda` keeps a bank's parameters, gradient and moments on the device
    // (`cuda::training`): the same steps through the host-side state (the model engine alone,
    // whose default `train_step` downloads the gradient and updates on the host) must give the
    // same losses, norms, parameters and moments — AdamW and SGD with momentum, clipping on and
    // off (the clip at 0.05 bites: the norms are larger).
    let test = "device_resident_training_equals_the_host_state";
    let _one = serial();
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(Arch::Llama, 1201);
    let cfg = s.weights.config.clone();
    let bank = one_prefix(&s.bank);
    let n = bank.n_params();
    let steps = step_batches(&cfg, 4, 1202);
    let mut worst = 0.0f64;
    for (name, opt, lr, clip, update_tol, cos_min) in [
        (
            "AdamW, clip 0.05",
            adamw(n),
            1e-2,
            0.05,
            ADAMW_UPDATE_TOL,
            ADAMW_UPDATE_COS_MIN,
        ),
        (
            "AdamW, no clip",
            adamw(n),
            1e-2,
            0.0,
            ADAMW_UPDATE_TOL,
            ADAMW_UPDATE_COS_MIN,
        ),
        (
            "SGD momentum, clip 0.05",
            sgd_momentum(),
            0.5,
            0.05,
            SGD_UPDATE_TOL,
            0.99999,
        ),
    ] {
        let mut dev = device_engine(&s);
        let mut host = CudaEngine::new(s.weights.clone()).unwrap();
        let tb = Trainable::Bank(bank.clone());
        let (od, pd, md) = train_steps(&mut dev, tb.clone(), opt.clone(), &steps, lr, clip);
        let (oh, ph, mh) = train_steps(&mut host, tb.clone(), opt, &steps, lr, clip);
        let mut clipped = 0;
        let (mut wl, mut wg) = (0.0f64, 0.0f64);
        for (i, (a, b)) in od.iter().zip(&oh).enumerate() {
            let ((la, ga), (lb, gb)) = (updated(a), updated(b));
            let (el, eg) = ((la - lb).abs() / lb.abs(), (ga - gb).abs() / gb);
            (wl, wg) = (wl.max(el), wg.max(eg));
            assert!(el <= 1e-4, "{name} step {i}: loss {la} vs host {lb}");
            assert!(
                eg <= 1e-3,
                "{name} step {i}: gradient norm {ga} vs host {gb}"
            );
            clipped += (clip > 0.0 && gb > clip) as usize;
        }
        if clip > 0.0 {
            assert_eq!(
                clipped,
                steps.len(),
                "{name}: the clip must bite on every step"
            );
        }
        let (fd, fh, f0) = (
            f64s(&pd.to_flat()),
            f64s(&ph.to_flat()),
            f64s(&tb.to_flat()),
        );
        // The updates (what the state's location could change), compared.
        let delta = |f: &[f64]| f.iter().zip(&f0).map(|(a, b)| a - b).collect::<Vec<f64>>();
        let (dd, dh) = (delta(&fd), delta(&fh));
        let ep = rel_err(&dd, &dh);
        let moved = rel_err(&fh, &f0);
        let ((sd, vd), (sh, vh)) = (moments(&md), moments(&mh));
        assert_eq!(sd, sh, "{name}: optimizer step count");
        assert_eq!(sd, steps.len() as u64, "{name}: every step counted");
        let em = rel_err(&vd, &vh);
        println!(
            "  {name}: {} steps, worst step loss rel err {wl:.2e}, gradient norm {wg:.2e}; the \
             update rel err {ep:.2e} (cosine {:.6}; it moved the parameters {moved:.2e}), \
             moments rel err {em:.2e}",
            steps.len(),
            cosine(&dd, &dh)
        );
        assert!(
            moved > 1e-3,
            "{name}: the steps must move the parameters ({moved:.2e})"
        );
        assert!(ep <= update_tol, "{name}: the update's rel err {ep:.3e}");
        let cos = cosine(&dd, &dh);
        assert!(cos >= cos_min, "{name}: the update's cosine {cos:.6}");
        assert!(em <= MOMENT_TOL, "{name}: moments rel err {em:.3e}");
        worst = worst.max(ep).max(em);
    }
    println!("RESULT gpu_training/{test}: 3 cases, worst relative error {worst:.2e}");
}

#[test]
fn device_training_resumes_from_its_snapshot() {
    // A checkpoint of the device-resident state (parameters, moments, step count) read back and
    // trained on from a new state = the uninterrupted run.
    let test = "device_training_resumes_from_its_snapshot";
    let _one = serial();
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(Arch::Gpt2, 1301);
    let cfg = s.weights.config.clone();
    let bank = one_prefix(&s.bank);
    let steps = step_batches(&cfg, 4, 1302);
    for (name, opt) in [
        ("AdamW", adamw(bank.n_params())),
        ("SGD momentum", sgd_momentum()),
    ] {
        let mut dev = device_engine(&s);
        let tb = Trainable::Bank(bank.clone());
        let (_, whole, wopt) = train_steps(&mut dev, tb.clone(), opt.clone(), &steps, 1e-2, 1.0);
        let (_, half, hopt) = train_steps(&mut dev, tb, opt, &steps[..2], 1e-2, 1.0);
        let (_, resumed, ropt) = train_steps(&mut dev, half, hopt, &steps[2..], 1e-2, 1.0);
        let e = rel_err(&f64s(&resumed.to_flat()), &f64s(&whole.to_flat()));
        let (sr, vr) = moments(&ropt);
        let (sw, vw) = moments(&wopt);
        let em = rel_err(&vr, &vw);
        println!(
            "  {name}: resumed after 2 of 4 steps: parameters rel err {e:.2e}, moments {em:.2e}"
        );
        assert_eq!(sr, sw, "{name}: step count");
        assert!(
            e <= 1e-6,
            "{name}: the resumed parameters differ (rel err {e:.3e})"
        );
        assert!(
            em <= 1e-6,
            "{name}: the resumed moments differ (rel err {em:.3e})"
        );
    }
}

#[test]
fn device_training_skips_an_overflowing_step() {
    // At a loss scale that overflows fp16, the device-resident step changes nothing (parameters
    // bit for bit, step count), halves the scale, and a later step updates.
    let test = "device_training_skips_an_overflowing_step";
    let _one = serial();
    if !host_gpu_or_skip(test) {
        return;
    }
    let s = setup(Arch::Llama, 1401);
    let cfg = s.weights.config.clone();
    let bank = one_prefix(&s.bank);
    let steps = step_batches(&cfg, 1, 1402);
    let (micro, n) = &steps[0];
    let opts = RunOptions::default();
    let req = StepRequest {
        micro,
        n_targets: *n,
        opts: &opts,
        lr: 1e-2,
        max_grad_norm: 1.0,
    };
    let mut dev = device_engine(&s);
    let start = 4194304.0f32;
    dev.set_loss_scale(start);
    let mut state = dev
        .begin_training(Trainable::Bank(bank.clone()), adamw(bank.n_params()))
        .unwrap();
    let mut scale = start;
    let mut skips = 0;
    loop {
        assert!(skips < 12, "still overflowing after {skips} skipped steps");
        let before = dev.training_prefix(state.as_mut()).unwrap().to_flat();
        match dev.train_step(state.as_mut(), &req).unwrap() {
            StepOutcome::Skipped {
                new_scale,
                micro_batches_run,
                loss_sum,
                ..
            } => {
                skips += 1;
                assert_eq!(new_scale, scale / 2.0, "the scale is halved");
                assert_eq!(dev.loss_scale(), Some(new_scale), "the engine took it");
                assert!(loss_sum.is_finite(), "the skipped step's loss is finite");
                assert_eq!(micro_batches_run, micro.len());
                let after = dev.training_prefix(state.as_mut()).unwrap().to_flat();
                assert!(before == after, "a skipped step changed the parameters");
                let (_, o) = dev.training_snapshot(state.as_mut()).unwrap();
                assert_eq!(moments(&o).0, 0, "a skipped step is not counted");
                scale = new_scale;
            }
            StepOutcome::Updated { .. } => {
                let after = dev.training_prefix(state.as_mut()).unwrap().to_flat();
                assert!(before != after, "an updated step changed nothing");
                let (_, o) = dev.training_snapshot(state.as_mut()).unwrap();
                assert_eq!(moments(&o).0, 1, "one step counted");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(skips >= 1, "2^22 must overflow at least once");
    println!("RESULT gpu_training/{test}: {skips} skipped steps, then an update");
}

#[test]
fn device_training_step_reads_back_once() {
    // The simulator's exact counters: a device-resident step copies no parameters either way and
    // reads back one small buffer; the host-side state on the same engine (the negative control,
    // proving the counts can tell) downloads the gradient and uploads the bank.
    let test = "device_training_step_reads_back_once";
    let _one = serial();
    if !host_gpu_or_skip(test) {
        return;
    }
    if SimCounts::now().is_none() {
        common::skip(
            "PREFIX_TUNE_REQUIRE_SIM",
            test,
            "the exact counters need the simulated device (scripts/sim)",
        );
        return;
    }
    let s = setup(Arch::Llama, 1501);
    let cfg = s.weights.config.clone();
    let bank = one_prefix(&s.bank);
    let n = bank.n_params();
    let steps = step_batches(&cfg, 2, 1502);
    let opts = RunOptions::default();
    let count = |engine: &mut dyn Engine| {
        let mut state = engine
            .begin_training(Trainable::Bank(bank.clone()), adamw(n))
            .unwrap();
        let req = |i: usize| StepRequest {
            micro: &steps[i].0,
            n_targets: steps[i].1,
            opts: &opts,
            lr: 1e-2,
            max_grad_norm: 1.0,
        };
        // Warm (workspaces and the results buffer sized for this step), then counted.
        updated(&engine.train_step(state.as_mut(), &req(1)).unwrap());
        let c0 = SimCounts::now().unwrap();
        updated(&engine.train_step(state.as_mut(), &req(1)).unwrap());
        SimCounts::now().unwrap().since(&c0)
    };
    let mut dev = device_engine(&s);
    let d = count(&mut dev);
    let mut plain = CudaEngine::new(s.weights.clone()).unwrap();
    let h = count(&mut plain);
    let show = |c: &SimCounts| {
        format!(
            "{} launches, {} H2D ({} B), {} D2H ({} B), {} syncs, {} allocations",
            c.get("launches"),
            c.get("htod_copies"),
            c.get("htod_bytes"),
            c.get("dtoh_copies"),
            c.get("dtoh_bytes"),
            c.get("host_syncs"),
            c.get("allocations")
        )
    };
    println!(
        "  device-resident step: {}\n  host-side state:      {}",
        show(&d),
        show(&h)
    );
    let targets = steps[1].1 as u64;
    assert_eq!(d.get("dtoh_copies"), 1, "one read per device-resident step");
    assert_eq!(
        d.get("dtoh_bytes"),
        4 * (2 + targets),
        "the read is the two norms and the per-target losses"
    );
    assert!(
        d.get("htod_bytes") < 2 * n as u64,
        "the device-resident step uploaded {} B: parameters ({n} of them) must stay on the device",
        d.get("htod_bytes")
    );
    assert_eq!(d.get("allocations"), 0, "a warm step allocates nothing");
    assert_eq!(d.get("host_syncs"), 1, "one wait per device-resident step");
    assert!(
        h.get("dtoh_bytes") >= 4 * n as u64,
        "the control must download the gradient"
    );
    assert!(
        h.get("htod_bytes") >= 2 * n as u64,
        "the control must upload the bank"
    );
}
