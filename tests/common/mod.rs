//! What several integration tests share: skipping visibly (or failing when the environment
//! requires the missing thing), the GPU / host-emulation / SmolLM2 gates.
#![allow(dead_code)]

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

/// Whether the host emulation of the kernels was built; a visible skip otherwise (a failure under
/// `PREFIX_TUNE_REQUIRE_KERNELS=1`).
pub fn emulation_or_skip(test: &str) -> bool {
    if prefix_tune::emu::available() {
        return true;
    }
    skip(
        "PREFIX_TUNE_REQUIRE_KERNELS",
        test,
        "no host emulation in this build (CUDA headers not found; run scripts/setup)",
    );
    false
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
