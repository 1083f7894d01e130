//! prefix-tune: prefix tuning of frozen language models, on the CPU (the reference) or a CUDA GPU.
//!
//! Layers, each using only those below it:
//! - the loops and the CLI: [`cli`] (one file per command), [`train`] (+ [`checkpoint`],
//!   [`plot`]), [`generate`], [`serve`] (the OpenAI-compatible server), [`data`] (datasets and
//!   the sequence convention), [`bench`], [`kernel_report`] (registers, occupancy and main-loop
//!   SASS of the compiled kernels);
//! - [`engine`]: one interface for "run the frozen model with these prefixes" (loss, prefix-only
//!   gradient, decoding), implemented by the CPU reference and by the GPU engine;
//! - [`reference`]: the math in plain Rust (attention, layers, model forward/backward, decoding):
//!   the specification and the test oracle, and a CPU fallback;
//! - [`cuda`]: the GPU side (kernels compiled by build.rs and embedded, launched through cudarc;
//!   cuBLAS; the GPU engine). Without a GPU the same code runs on the simulated CUDA device
//!   (sim/, a `libcuda.so` of this repository; `scripts/sim`);
//! - [`prefix`]: prefix parameters (bank, PEFT layout, reparameterization, initialization, files);
//!   [`optim`]: AdamW/SGD, schedules and clipping on fp32 master weights;
//! - [`model`]: configs, weights and tokenizers from HF directories and GGUF files; [`assets`]:
//!   where fetched files live;
//! - [`fuzzing`]: the fuzz targets' entry points (every parser of untrusted input, from bytes).
pub mod assets;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod devices;
pub mod engine;
pub mod fuzzing;
pub mod generate;
pub mod kernel_report;
pub mod model;
pub mod optim;
pub mod plot;
pub mod prefix;
pub mod real;
pub mod reference;
pub mod serve;
pub mod train;
pub mod types;
