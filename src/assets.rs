//! Where fetched assets live: the cache directory and the paths of the models inside it.
//!
//! The cache is `$PREFIX_TUNE_CACHE` when set, else `${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune`.

use std::path::PathBuf;

/// File name of the real test model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub const SMOLLM2_GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory for fetched assets (not created here).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PREFIX_TUNE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| ".".into());
            PathBuf::from(home).join(".cache")
        }
    };
    base.join("prefix-tune")
}

/// `<cache>/models`.
pub fn models_dir() -> PathBuf {
    cache_dir().join("models")
}

/// `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn smollm2_gguf_path() -> PathBuf {
    models_dir().join(SMOLLM2_GGUF_FILE)
}
