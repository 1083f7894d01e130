//! Loading frozen models and tokenizers: HF directories (config.json + safetensors) and GGUF.
pub mod config;

pub use config::{Arch, LayerWeights, ModelConfig, ModelWeights};
