//! prefix-tune: prefix tuning of frozen language models, on the CPU (the reference) or a CUDA GPU.
//!
//! Layers, each using only those below it:
//! - the loops and the CLI: [`cli`] (one file per command), [`train`] (+ [`checkpoint`],
//!   [`plot`]), [`generate`], [`data`] (datasets and the sequence convention), [`bench`];
//! - [`engine`]: one interface for "run the frozen model with these prefixes" (loss, prefix-only
//!   gradient, decoding), implemented by the CPU reference and by the GPU engine;
//! - [`reference`]: the math in plain Rust (attention, layers, model forward/backward, decoding):
//!   the specification and the test oracle, and a CPU fallback;
//! - [`cuda`]: the GPU side (kernels compiled by build.rs and embedded, launched through cudarc;
//!   cuBLAS; the GPU engine, written over a backend that [`emu::backend`] also implements);
//! - [`emu`]: the same CUDA kernels executed on the CPU by the host emulation (kernels/host/), so
//!   tests can run them, and the GPU engine, without a GPU;
//! - [`prefix`]: prefix parameters (bank, PEFT layout, reparameterization, initialization, files);
//!   [`optim`]: AdamW/SGD, schedules and clipping on fp32 master weights;
//! - [`model`]: configs, weights and tokenizers from HF directories and GGUF files; [`assets`]:
//!   where fetched files live.
pub mod assets;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod emu;
pub mod engine;
pub mod generate;
pub mod model;
pub mod optim;
pub mod plot;
pub mod prefix;
pub mod reference;
pub mod train;
