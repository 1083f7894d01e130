//! Loading frozen models and tokenizers: HF directories (config.json + safetensors) and GGUF.
pub mod bytes;
pub mod config;
pub mod gguf;
pub mod load;
pub mod safetensors;
pub mod tokenizer;

pub use config::{Arch, LayerWeights, ModelConfig, ModelWeights};
pub use load::{load_model, LoadedModel};
pub use tokenizer::Tokenizer;
