//! Contexts opened and closed on several threads at once, as the test harness does when the GPU
//! tests of one binary run in parallel: each test opens the primary context (cudarc retains it)
//! and releases it when done, and the last release resets it. Memory allocated under a context
//! that is retained must stay valid whatever other threads retain and release meanwhile — on a
//! GPU the driver serialises retain, release and reset, and a context's reset waits for the work
//! its streams still have queued. The simulated device once let that work (the asynchronous frees
//! of a just-destroyed stream) run after the reset, on the next context's allocations at reused
//! addresses ("double free", "not a device pointer" in CI), which this test catches: it failed 7
//! runs in 8 on the simulator before the fix.
//!
//! Needs a CUDA device (a GPU, or the simulated one under `scripts/sim`): skipped visibly
//! without one, failing instead under `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use std::sync::{Arc, Barrier};

use cudarc::driver::CudaContext;
use prefix_tune::cuda::context::simulator_detail;

/// The simulator's account of the last error (empty on a GPU).
fn detail() -> String {
    simulator_detail()
        .map(|d| format!("({d})"))
        .unwrap_or_default()
}

const THREADS: usize = 4;
const ROUNDS: usize = 300;
const BALLAST: usize = 64;

#[test]
fn retained_contexts_keep_their_memory_while_others_release() {
    // SAFETY: only tries to load the driver library.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present || !matches!(CudaContext::device_count(), Ok(n) if n > 0) {
        common::skip(
            "PREFIX_TUNE_REQUIRE_GPU",
            "retained_contexts_keep_their_memory_while_others_release",
            "no CUDA driver or no device",
        );
        return;
    }
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let start = start.clone();
            std::thread::spawn(move || -> Result<(), String> {
                start.wait();
                for round in 0..ROUNDS {
                    let ctx = CudaContext::new(0).map_err(|e| format!("retain: {e:?}"))?;
                    let s = ctx.new_stream().map_err(|e| format!("stream: {e:?}"))?;
                    // Many live allocations make a reset (which unmaps them all) take a while.
                    let ballast: Vec<_> = (0..BALLAST)
                        .map(|_| s.alloc_zeros::<u8>(4096))
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            format!("thread {t} round {round}: ballast: {e:?} {}", detail())
                        })?;
                    // A pattern no other thread or round writes.
                    let n = 64 + (t * 131 + round * 17) % 700;
                    let want: Vec<u32> = (0..n)
                        .map(|i| ((t as u32) << 24) ^ ((round as u32) << 12) ^ i as u32)
                        .collect();
                    let what = |e| format!("thread {t} round {round}: {e:?} {}", detail());
                    let a = s.clone_htod(&want).map_err(what)?;
                    let b = s.clone_htod(&want).map_err(what)?;
                    std::thread::yield_now();
                    let mut c = s.alloc_zeros::<u32>(n).map_err(what)?;
                    s.memcpy_dtod(&a, &mut c).map_err(what)?;
                    drop(a);
                    let got_b = s.clone_dtoh(&b).map_err(what)?;
                    let got_c = s.clone_dtoh(&c).map_err(what)?;
                    if got_b != want || got_c != want {
                        return Err(format!(
                            "thread {t} round {round}: a buffer of a retained context changed"
                        ));
                    }
                    drop((b, c, ballast, s, ctx));
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = workers
        .into_iter()
        .filter_map(|w| w.join().expect("a worker panicked").err())
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
