//! Opens the engine for a [`Device`]: the CPU reference ([`CpuEngine`]) or the GPU engine
//! (`cuda::engine::CudaEngine` with the optimizer step on the device), or, for `auto`, the GPU
//! engine when it can run. The one module that knows both implementations, so that neither
//! `engine` nor `cuda` imports the other's side (`tests/layering.rs`).

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::engine::{CpuEngine, Device, Engine, EngineOptions};
use crate::model::config::ModelWeights;

/// [`open_engine_with`] with the default options.
pub fn open_engine(weights: Arc<ModelWeights<f32>>, device: Device) -> Result<Box<dyn Engine>> {
    open_engine_with(weights, device, &EngineOptions::default())
}

/// The engine for `device`: `cpu` the CPU reference; `cuda` the GPU engine
/// ([`crate::cuda::engine::CudaEngine`]) or an error saying why it cannot run; `auto` the GPU
/// engine when a usable GPU is present and the model fits its kernels, else the CPU (with a note
/// on stderr when a GPU was there but could not be used). `opts` apply to the GPU engine; on the
/// CPU engine `recompute` has no effect and a note on stderr says so.
pub fn open_engine_with(
    weights: Arc<ModelWeights<f32>>,
    device: Device,
    opts: &EngineOptions,
) -> Result<Box<dyn Engine>> {
    use crate::cuda::engine::CudaEngine;
    let cpu = |weights| -> Box<dyn Engine> {
        if opts.recompute {
            eprintln!(
                "note: --recompute has no effect on the CPU engine (it applies to --device cuda)"
            );
        }
        Box::new(CpuEngine::new(weights))
    };
    // The GPU engine with the optimizer step on the device too.
    let gpu = |mut e: CudaEngine| -> Box<dyn Engine> {
        if opts.recompute {
            e.set_recompute(true);
        }
        Box::new(crate::cuda::device_optim::DeviceOptimEngine::new(e))
    };
    match device {
        Device::Cpu => Ok(cpu(weights)),
        Device::Cuda => match CudaEngine::new(weights) {
            Ok(e) => Ok(gpu(e)),
            Err(e) => bail!("--device cuda: {e:#}"),
        },
        Device::Auto => match CudaEngine::new(weights.clone()) {
            Ok(e) => Ok(gpu(e)),
            Err(e) => {
                if crate::cuda::gpu_available().is_ok() {
                    eprintln!("note: a GPU is present but the GPU engine cannot run: {e:#}; using the CPU");
                }
                Ok(cpu(weights))
            }
        },
    }
}
