//! Kill at any point, resume exactly: `prefix-tune train` with a checkpoint every step is killed
//! with SIGKILL again and again (inside checkpoint writes and at random moments) and resumed with
//! `--resume` each time; the final prefix, the best prefix and every `metrics.jsonl` record (but
//! the wall-clock `elapsed`) must equal an uninterrupted run's bit for bit, no step may be
//! missing or repeated, and a resume must start from the last checkpoint whose write completed
//! (never from a torn one).
//!
//! Kills inside a checkpoint write are made certain by the writer's test hook
//! (`PREFIX_TUNE_TEST_CHECKPOINT_PAUSE_MS`, src/checkpoint.rs): it prints `checkpoint-stage NAME`
//! at each stage of a write and pauses there, and every other kill waits for one of those stages
//! (each stage in turn, the k-th time it shows, k random); the other kills come after a random
//! delay. The randomness is seeded: the seed is printed and in every failure message, and
//! `PREFIX_TUNE_KILL_SEED=N` replays a plan.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use prefix_tune::prefix::load_prefix;

const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");
/// The checkpoint writer's stages (see `save_checkpoint`): the files are in `checkpoint.tmp/`;
/// the trainer file too (complete); the old checkpoint is renamed `checkpoint.old/`; the new
/// one is renamed into place (`checkpoint.old/` not yet removed).
const STAGES: [&str; 4] = ["files", "written", "set-aside", "renamed"];
const KILLS: usize = 10;
const STEPS: u64 = 30;
const PAUSE_MS: &str = "20";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `n` random short examples over the tiny models' character vocabulary.
fn write_data(dir: &Path, n: usize) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(11);
    let word = |rng: &mut StdRng, len: usize| -> String {
        (0..len)
            .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
            .collect()
    };
    let mut text = String::new();
    for _ in 0..n {
        let (li, lt) = (rng.random_range(3..10), rng.random_range(2..9));
        let line = serde_json::json!({"input": word(&mut rng, li), "target": word(&mut rng, lt)});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn fresh_args(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    let steps = STEPS.to_string();
    [
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--prefix-len",
        "3",
        "--steps",
        &steps,
        "--batch-size",
        "2",
        "--lr",
        "0.02",
        "--warmup-steps",
        "2",
        "--schedule",
        "cosine",
        "--eval-split",
        "0.25",
        "--eval-every",
        "3",
        "--save-every",
        "1",
        "--seed",
        "9",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

/// How one process is stopped.
#[derive(Clone, Debug)]
enum Plan {
    /// Killed while paused at the `nth` (1-based) `checkpoint-stage` line naming this stage.
    AtStage(&'static str, usize),
    /// Killed this long after it started.
    After(Duration),
    /// Runs to the end.
    Finish,
}

/// What one process did before it ended or was killed.
struct Ran {
    killed: bool,
    success: bool,
    /// `resuming from DIR at step N`, if it got that far.
    resumed_from: Option<(String, u64)>,
    /// Checkpoint writes completed (`renamed` stage lines seen).
    committed: u64,
    stderr: Vec<String>,
}

fn spawn(args: &[String], pause: bool) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if pause {
        cmd.env("PREFIX_TUNE_TEST_CHECKPOINT_PAUSE_MS", PAUSE_MS);
    } else {
        cmd.env_remove("PREFIX_TUNE_TEST_CHECKPOINT_PAUSE_MS");
    }
    let mut child = cmd.spawn().expect("runs the binary");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn run_with(args: &[String], plan: &Plan) -> Ran {
    let started = Instant::now();
    let (mut child, rx) = spawn(args, !matches!(plan, Plan::Finish));
    let mut ran = Ran {
        killed: false,
        success: false,
        resumed_from: None,
        committed: 0,
        stderr: Vec::new(),
    };
    let mut stage_seen = 0usize;
    loop {
        let wait = match plan {
            Plan::After(d) => d
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1)),
            _ => Duration::from_secs(60),
        };
        match rx.recv_timeout(wait) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("resuming from ") {
                    let (dir, step) = rest.split_once(" at step ").expect("resume line");
                    let step = step.split(' ').next().unwrap().parse().unwrap();
                    ran.resumed_from = Some((dir.to_string(), step));
                }
                let stage = line.strip_prefix("checkpoint-stage ").map(str::to_string);
                if stage.as_deref() == Some("renamed") {
                    ran.committed += 1;
                }
                ran.stderr.push(line);
                if let (Plan::AtStage(want, nth), Some(got)) = (plan, stage) {
                    if got == *want {
                        stage_seen += 1;
                        if stage_seen == *nth {
                            // The writer is paused at this stage: the kill lands inside it.
                            child.kill().unwrap();
                            break;
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if matches!(plan, Plan::After(_)) {
                    let _ = child.kill(); // a no-op when it has just exited by itself
                    break;
                }
                panic!("the training process printed nothing for 60 s");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().unwrap();
    ran.success = status.success();
    {
        use std::os::unix::process::ExitStatusExt;
        ran.killed = status.signal() == Some(9);
    }
    // Whatever it printed after the decision to kill.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        if line.strip_prefix("checkpoint-stage ") == Some("renamed") {
            ran.committed += 1;
        }
        ran.stderr.push(line);
    }
    ran
}

/// `metrics.jsonl` as records without the wall-clock field.
fn records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed");
            v
        })
        .collect()
}

fn bits(p: &Path) -> (Vec<u32>, prefix_tune::prefix::PrefixMeta) {
    let (bank, meta) = load_prefix(p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
    (bank.to_flat().iter().map(|x| x.to_bits()).collect(), meta)
}

#[test]
fn killed_at_any_point_and_resumed_equals_an_uninterrupted_run() {
    let seed: u64 = std::env::var("PREFIX_TUNE_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        });
    let _ = writeln!(
        std::io::stderr(),
        "kill_resume: seed {seed} (PREFIX_TUNE_KILL_SEED={seed} replays this plan)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let d = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny");
    let data = write_data(d.path(), 14);
    let straight = d.path().join("straight");
    let killed = d.path().join("killed");

    let t0 = Instant::now();
    let r = run_with(&fresh_args(&model, &data, &straight), &Plan::Finish);
    assert!(
        r.success,
        "uninterrupted run failed: {}",
        r.stderr.join("\n")
    );
    let one_run = t0.elapsed();

    let resume_args: Vec<String> = ["train", "--resume", s(&killed), "--device", "cpu"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    let ctx = |what: &str, log: &[String]| format!("seed {seed}: {what}\n{}", log.join("\n"));
    // The step of the last checkpoint known to be complete, and whether the last kill could have
    // completed one more (a timed kill right after a rename, before its stage line).
    let mut committed: u64 = 0;
    let mut maybe_one_more = false;
    let mut mid_write_kills = 0;
    let mut only_old_kills = 0;
    let mut log: Vec<String> = Vec::new();
    for i in 0..=KILLS {
        let plan = if i == KILLS {
            Plan::Finish
        } else if i % 2 == 0 {
            Plan::AtStage(STAGES[(i / 2) % STAGES.len()], rng.random_range(1..=3))
        } else {
            // At most half an uninterrupted run (a killed run also pauses in its checkpoint
            // writes, so this is a small part of it): the run should not end before the kills.
            let most = (one_run.as_millis() as u64 / 2).clamp(150, 1500);
            Plan::After(Duration::from_millis(rng.random_range(50..=most)))
        };
        let has_trainer = |d: &str| killed.join(d).join("trainer.safetensors").is_file();
        let resume = has_trainer("checkpoint") || has_trainer("checkpoint.old");
        let args = if resume {
            resume_args.clone()
        } else {
            // No checkpoint was ever completed (one that was must never be lost).
            assert!(
                committed == 0,
                "{}",
                ctx(&format!("the checkpoint of step {committed} is gone"), &log)
            );
            let mut args = fresh_args(&model, &data, &killed);
            if killed.exists() {
                // Killed before its first checkpoint: nothing to resume, it starts over.
                let r = run_with(&resume_args, &Plan::Finish);
                assert!(
                    !r.success && r.stderr.iter().any(|l| l.contains("no checkpoint")),
                    "{}",
                    ctx(
                        "a resume without any checkpoint should be refused",
                        &r.stderr
                    )
                );
                args.push("--overwrite".into());
            }
            args
        };
        let r = run_with(&args, &plan);
        log.push(format!(
            "run {i}: {plan:?}: killed {} success {} resumed from {:?}, {} checkpoints written",
            r.killed, r.success, r.resumed_from, r.committed
        ));
        let start = match &r.resumed_from {
            Some((dir, step)) => {
                assert!(resume, "{}", ctx("a fresh run resumed", &r.stderr));
                assert!(
                    !dir.ends_with("checkpoint.tmp"),
                    "{}",
                    ctx("resumed from the unfinished checkpoint.tmp", &log)
                );
                let ok = *step == committed || (maybe_one_more && *step == committed + 1);
                assert!(
                    ok,
                    "{}",
                    ctx(
                        &format!(
                            "resumed from step {step}; the last complete checkpoint is step {committed}{}",
                            if maybe_one_more { " (or the next)" } else { "" }
                        ),
                        &r.stderr
                    )
                );
                Some(*step)
            }
            None if resume => {
                // Killed before it got as far as reading the checkpoint: nothing changed.
                assert!(
                    r.killed,
                    "{}",
                    ctx("a resume did not say where it resumed from", &r.stderr)
                );
                None
            }
            None => Some(0),
        };
        if let Some(start) = start {
            committed = start + r.committed;
            maybe_one_more = false;
        }
        maybe_one_more |= matches!(plan, Plan::After(_)) && r.killed;
        if r.success {
            // Finished (a kill that came too late finds it done).
            break;
        }
        assert!(
            r.killed,
            "{}",
            ctx("the run failed without being killed", &r.stderr)
        );
        let has = |n: &str| killed.join(n).exists();
        if has("checkpoint.tmp") || has("checkpoint.old") {
            mid_write_kills += 1;
        }
        if has("checkpoint.old") && !has("checkpoint") {
            only_old_kills += 1;
        }
    }
    let _ = writeln!(std::io::stderr(), "kill_resume: {}", log.join("\n  "));
    assert!(
        mid_write_kills >= 3 && only_old_kills >= 1,
        "{}",
        ctx(
            &format!("{mid_write_kills} kills inside a checkpoint write, {only_old_kills} between its renames"),
            &log
        )
    );

    // The same final prefix, best prefix and metrics as the uninterrupted run.
    for f in ["prefix.safetensors", "best_prefix.safetensors"] {
        let (a, mut ma) = bits(&straight.join(f));
        let (b, mut mb) = bits(&killed.join(f));
        assert!(a == b, "{}", ctx(&format!("{f}: the values differ"), &log));
        // The recorded arguments differ only in --out (the two runs write to two directories).
        let without_out = |m: &mut prefix_tune::prefix::PrefixMeta| {
            let mut v: Value = serde_json::from_str(&m.training_args).unwrap();
            v.as_object_mut()
                .unwrap()
                .remove("out")
                .expect("out recorded");
            m.training_args = v.to_string();
        };
        without_out(&mut ma);
        without_out(&mut mb);
        assert_eq!(
            ma,
            mb,
            "{}",
            ctx(&format!("{f}: the metadata differs"), &log)
        );
    }
    let (ra, rb) = (records(&straight), records(&killed));
    let steps: Vec<u64> = rb
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "{}",
        ctx("metrics.jsonl steps are missing or repeated", &log)
    );
    assert_eq!(
        ra.len(),
        rb.len(),
        "{}",
        ctx("metrics.jsonl lengths differ", &log)
    );
    for (a, b) in ra.iter().zip(&rb) {
        assert_eq!(a, b, "{}", ctx("a metrics.jsonl record differs", &log));
    }
    for left in ["checkpoint.tmp", "checkpoint.old"] {
        assert!(
            !killed.join(left).exists(),
            "{}",
            ctx(&format!("{left} left behind"), &log)
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "kill_resume: seed {seed}: {mid_write_kills} kills inside checkpoint writes ({only_old_kills} between its renames), results equal; {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn killed_after_the_last_checkpoint_the_resume_writes_the_final_outputs() {
    let d = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny");
    let data = write_data(d.path(), 14);
    let out = d.path().join("run");
    let mut args = fresh_args(&model, &data, &out);
    let i = args.iter().position(|a| a == "--steps").unwrap();
    args[i + 1] = "4".into();
    // The 4th completed checkpoint is the last step's: killed there, before prefix.safetensors.
    let r = run_with(&args, &Plan::AtStage("renamed", 4));
    assert!(r.killed && r.committed == 4, "{}", r.stderr.join("\n"));
    assert!(!out.join("prefix.safetensors").exists());
    let resume: Vec<String> = ["train", "--resume", s(&out), "--device", "cpu"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    let r = run_with(&resume, &Plan::Finish);
    assert!(r.success, "{}", r.stderr.join("\n"));
    assert_eq!(r.resumed_from.as_ref().map(|x| x.1), Some(4));
    let (a, _) = bits(&out.join("prefix.safetensors"));
    let (b, _) = bits(&out.join("checkpoint/prefix.safetensors"));
    assert!(a == b, "the final prefix is not the last checkpoint's");
    let steps: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert!(out.join("loss.svg").is_file());
    // Now it is finished: a further resume is refused.
    let r = run_with(&resume, &Plan::Finish);
    assert!(!r.success && r.stderr.iter().any(|l| l.contains("complete")));
}
