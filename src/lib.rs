//! prefix-tune: prefix tuning of frozen language models.
//!
//! Layers, each using only those below it:
//! - [`reference`]: the math in plain Rust (attention, layers, model forward/backward): the
//!   specification and the test oracle, and a CPU fallback;
//! - [`prefix`]: prefix parameters (bank, PEFT layout, reparameterization, initialization);
//! - [`optim`]: AdamW/SGD, schedules and clipping on fp32 master weights;
//! - [`model`]: configs, weights and tokenizers from HF directories and GGUF files;
//! - [`cuda`]: the GPU side (kernels compiled by build.rs, launched through cudarc).
pub mod assets;
pub mod bench;
pub mod cli;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod emu;
pub mod emu_backend;
pub mod emu_ops;
pub mod engine;
pub mod generate;
pub mod model;
pub mod optim;
pub mod plot;
pub mod prefix;
pub mod reference;
pub mod train;
