//! What several integration tests share: skipping visibly (or failing when the environment
//! requires the missing thing), the GPU / SmolLM2 gates.
#![allow(dead_code)]

pub mod tiny;

use std::io::Write;
use std::sync::OnceLock;

use prefix_tune::model::{load_model, LoadedModel};

/// Whether the environment variable is set to `1`.
pub fn env_is_1(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Reports that `test` cannot run because of `why`: panics when `require_var=1`, else prints a
/// `SKIPPED` line that stays visible (written to the stderr handle: libtest captures only the
/// print macros, so an `eprintln!` of a passing test would never be seen).
pub fn skip(require_var: &str, test: &str, why: &str) {
    if env_is_1(require_var) {
        panic!("{test}: {require_var}=1 but {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Whether the loaded CUDA driver is prefix-tune's simulator; a visible skip otherwise (a failure
/// under `PREFIX_TUNE_REQUIRE_SIM=1`).
pub fn simulator_or_skip(test: &str) -> bool {
    if prefix_tune::cuda::context::simulated() {
        return true;
    }
    skip(
        "PREFIX_TUNE_REQUIRE_SIM",
        test,
        "the loaded CUDA driver is not prefix-tune's simulator (run under scripts/sim)",
    );
    false
}

/// The GPU, or `None` after a visible skip (a failure under `PREFIX_TUNE_REQUIRE_GPU=1`).
pub fn gpu_or_skip(test: &str) -> Option<prefix_tune::cuda::GpuContext> {
    match prefix_tune::cuda::GpuContext::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            skip(
                "PREFIX_TUNE_REQUIRE_GPU",
                test,
                &format!("no usable GPU ({e:#})"),
            );
            None
        }
    }
}

/// Whether the shared device of `prefix_tune::cuda::host` (GPU 0: a real card, or the simulated
/// device of `scripts/sim`) is usable; a visible skip otherwise (a failure under
/// `PREFIX_TUNE_REQUIRE_GPU=1`).
pub fn host_gpu_or_skip(test: &str) -> bool {
    match prefix_tune::cuda::host::device() {
        Ok(_) => true,
        Err(e) => {
            skip(
                "PREFIX_TUNE_REQUIRE_GPU",
                test,
                &format!("no usable GPU ({e:#}); run under scripts/sim for the simulated device"),
            );
            false
        }
    }
}

/// The real SmolLM2-135M-Instruct GGUF, loaded once per test binary; `None` after a visible skip
/// when the file is absent (a failure under `PREFIX_TUNE_REQUIRE_ASSETS=1`).
pub fn smollm2(test: &str) -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    let path = prefix_tune::assets::smollm2_gguf_path();
    let model = MODEL.get_or_init(|| {
        if !path.is_file() {
            return None;
        }
        Some(load_model(&path).unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display())))
    });
    if model.is_none() {
        let why = format!("{} not found (run scripts/setup)", path.display());
        skip("PREFIX_TUNE_REQUIRE_ASSETS", test, &why);
    }
    model.as_ref()
}

/// A bank of one prefix per token list, each initialized from the model's keys/values of those
/// real words (`reference::init::init_from_text`), cut to the shortest and rounded to fp16 (so
/// fp16 and f32 engines see the same numbers).
pub fn real_word_bank(
    w: &prefix_tune::model::config::ModelWeights<f32>,
    tokens: &[Vec<u32>],
) -> prefix_tune::prefix::PrefixBank<f32> {
    use prefix_tune::reference::init::init_from_text;
    let banks: Vec<_> = tokens
        .iter()
        .map(|t| init_from_text(w, t).expect("prefix from real words"))
        .collect();
    let p = banks
        .iter()
        .map(|b| b.len)
        .min()
        .expect("at least one prefix");
    let (hd, kv) = (banks[0].head_dim, banks[0].kv_heads);
    // Each bank's first p positions of every kv head, the banks one after the other.
    let cut = |len: usize, x: &[f32]| -> Vec<f32> {
        (0..kv)
            .flat_map(|h| x[h * len * hd..(h * len + p) * hd].iter().copied())
            .collect()
    };
    let mut bank = banks[0].clone();
    bank.n_prefixes = banks.len();
    bank.len = p;
    for l in 0..bank.n_layers {
        bank.k[l] = banks.iter().flat_map(|b| cut(b.len, &b.k[l])).collect();
        bank.v[l] = banks.iter().flat_map(|b| cut(b.len, &b.v[l])).collect();
    }
    for v in bank.k.iter_mut().chain(bank.v.iter_mut()) {
        v.iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
    }
    bank
}
