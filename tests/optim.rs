//! Replays torch's AdamW / SGD, transformers' schedules and `clip_grad_norm_` as recorded by
//! tools/oracle/optim_fixture.py (tests/fixtures/optim_torch.json), and checks checkpoint
//! round trips of the optimizer state.

use prefix_tune::optim::{clip_grad_norm, AdamW, AdamWConfig, Optimizer, Schedule, Sgd, SgdConfig};
use prefix_tune::reference::real::rel_err;
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Two tensors as recorded, concatenated, plus the split point.
fn pair(v: &Value) -> (Vec<f32>, usize) {
    let a = f32s(&v[0]);
    let b = f32s(&v[1]);
    let cut = a.len();
    ([a, b].concat(), cut)
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim_torch.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn schedule_of(case: &Value) -> Schedule {
    let warmup = case["warmup"].as_u64().unwrap();
    let total = case["total"].as_u64().unwrap();
    match case["schedule"].as_str().unwrap() {
        "linear" => Schedule::Linear { warmup, total },
        "cosine" => Schedule::Cosine {
            warmup,
            total,
            cycles: 0.5,
        },
        "constant" => Schedule::Constant { warmup },
        s => panic!("unknown schedule {s}"),
    }
}

fn optimizer_of(case: &Value, n: usize) -> Optimizer {
    let wd = case["weight_decay"].as_f64().unwrap();
    match case["opt"].as_str().unwrap() {
        "adamw" => Optimizer::AdamW(AdamW::new(
            AdamWConfig {
                beta1: case["betas"][0].as_f64().unwrap(),
                beta2: case["betas"][1].as_f64().unwrap(),
                eps: case["eps"].as_f64().unwrap(),
                weight_decay: wd,
            },
            n,
        )),
        "sgd" => Optimizer::Sgd(Sgd::new(SgdConfig {
            momentum: case["momentum"].as_f64().unwrap(),
            weight_decay: wd,
        })),
        s => panic!("unknown optimizer {s}"),
    }
}

#[test]
fn replays_torch_optimizers_schedules_and_clipping() {
    let doc = fixture();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (mut params, cut) = pair(&case["init"]);
        let base_lr = case["lr"].as_f64().unwrap();
        let max_norm = case["max_norm"].as_f64().unwrap();
        let sched = schedule_of(case);
        let mut opt = optimizer_of(case, params.len());
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let (mut grads, _) = pair(&step["grads"]);
            let (g0, g1) = grads.split_at_mut(cut);
            let norm = clip_grad_norm(&mut [g0, g1], max_norm);
            let want_norm = step["norm"].as_f64().unwrap();
            let e_norm = (norm - want_norm).abs() / want_norm;
            assert!(
                e_norm <= 1e-6,
                "{name} step {s}: norm {norm} vs {want_norm}"
            );
            let (want_clipped, _) = pair(&step["clipped"]);
            let e_clip = rel_err(&grads, &want_clipped);
            assert!(
                e_clip <= 1e-6,
                "{name} step {s}: clipped grads rel {e_clip:e}"
            );

            let lr = sched.lr(base_lr, s as u64);
            let want_lr = step["lr"].as_f64().unwrap();
            assert!(
                (lr - want_lr).abs() <= 1e-12 * base_lr,
                "{name} step {s}: lr {lr} vs torch {want_lr}"
            );
            opt.step(&mut params, &grads, lr);
            let (want, _) = pair(&step["params"]);
            let e = rel_err(&params, &want);
            assert!(e <= 1e-6, "{name} step {s}: params rel err {e:e}");
            // The update itself (not just the parameters) must agree: compare p − p0 too.
            worst.0 = worst.0.max(e);
            worst.1 = worst.1.max(e_norm);
            worst.2 = worst.2.max(e_clip);
        }
        assert_eq!(
            opt.steps_done(),
            case["steps"].as_array().unwrap().len() as u64
        );
    }
    eprintln!(
        "worst rel err: params {:.2e}, norm {:.2e}, clipped grads {:.2e}",
        worst.0, worst.1, worst.2
    );
}

/// The parameter updates (p_after − p_before) agree with torch's, which is a stricter check
/// than the parameters themselves when the steps are small.
#[test]
fn updates_match_torch() {
    let doc = fixture();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (mut params, cut) = pair(&case["init"]);
        let base_lr = case["lr"].as_f64().unwrap();
        let sched = schedule_of(case);
        let mut opt = optimizer_of(case, params.len());
        let mut prev_want = params.clone();
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let (mut grads, _) = pair(&step["grads"]);
            let (g0, g1) = grads.split_at_mut(cut);
            clip_grad_norm(&mut [g0, g1], case["max_norm"].as_f64().unwrap());
            let before = params.clone();
            opt.step(&mut params, &grads, sched.lr(base_lr, s as u64));
            let (want, _) = pair(&step["params"]);
            let ours: Vec<f64> = params
                .iter()
                .zip(&before)
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect();
            let theirs: Vec<f64> = want
                .iter()
                .zip(&prev_want)
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect();
            if theirs.iter().all(|x| *x == 0.0) {
                // Warmup step with lr 0 and no decay: nothing moves in either.
                assert!(ours.iter().all(|x| *x == 0.0), "{name} step {s}");
            } else {
                let e = rel_err(&ours, &theirs);
                assert!(e <= 1e-4, "{name} step {s}: update rel err {e:e}");
            }
            prev_want = want;
        }
    }
}

#[test]
fn optimizer_state_round_trips_through_json_and_resumes_identically() {
    let doc = fixture();
    let case = &doc["cases"][0];
    let (init, cut) = pair(&case["init"]);
    let steps = case["steps"].as_array().unwrap();
    let sched = schedule_of(case);
    let base_lr = case["lr"].as_f64().unwrap();
    let run = |params: &mut Vec<f32>, opt: &mut Optimizer, range: std::ops::Range<usize>| {
        for s in range {
            let (mut grads, _) = pair(&steps[s]["grads"]);
            let (g0, g1) = grads.split_at_mut(cut);
            clip_grad_norm(&mut [g0, g1], 1.0);
            opt.step(params, &grads, sched.lr(base_lr, s as u64));
        }
    };
    let mut straight = init.clone();
    let mut o1 = optimizer_of(case, init.len());
    run(&mut straight, &mut o1, 0..steps.len());

    let mut resumed = init.clone();
    let mut o2 = optimizer_of(case, init.len());
    run(&mut resumed, &mut o2, 0..3);
    let saved = serde_json::to_string(&o2).unwrap();
    let mut o3: Optimizer = serde_json::from_str(&saved).unwrap();
    assert_eq!(o3, o2);
    o3.check_len(init.len()).unwrap();
    assert!(o3.check_len(init.len() + 1).is_err());
    run(&mut resumed, &mut o3, 3..steps.len());
    assert_eq!(resumed, straight);
}
