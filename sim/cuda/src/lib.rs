//! prefix-tune's simulated CUDA device: a shared library named as the CUDA driver is
//! (`libcuda.so`) that cudarc loads instead of the real one when its directory comes first on the
//! library search path (`scripts/sim` arranges it), so the unchanged GPU code of prefix-tune —
//! `GpuContext`, the launch wrappers, cuBLAS, streams, events, copies — runs in CI without a GPU.
//!
//! It behaves as one H100 (or, with `PTSIM_ARCH`, an A100 / sm_86 / sm_89 card): the device
//! attributes and the limits a real driver enforces (48 KB of dynamic shared memory without the
//! opt-in attribute, up to 227 KB with it, 1024 threads per block, the grid limits, registers per
//! block), and the errors it returns. Kernel launches run the kernels' host build
//! (`kernels/host/`, every CUDA thread an OS thread) with parameters read from `kernelParams` by
//! the loaded image's parameter list. Streams run asynchronously (a worker thread each), so a
//! missing synchronisation shows. Checks as compute-sanitizer's tools (memcheck, initcheck,
//! synccheck, racecheck for the wrapped shared-memory operations; the ThreadSanitizer build for
//! plain accesses), selected with `PTSIM_TOOLS`; exact counters for `ptsim_counters`.
//!
//! Modules: [`config`] (what the device is), [`driver`] (the `cu*` entry points and state),
//! [`memory`] (allocations with guard pages and red zones), [`stream`] (streams and events),
//! [`module`] (PTX and cubin images), [`launch`] (`cuLaunchKernel`), [`blas`] (cuBLAS),
//! [`graph`] (CUDA graphs), [`counters`].

pub mod blas;
pub mod config;
pub mod counters;
pub mod driver;
pub mod ffi;
pub mod graph;
pub mod launch;
pub mod memory;
pub mod module;
pub mod stream;

// Every other driver entry point: CUDA_ERROR_NOT_SUPPORTED, naming itself.
mod stubs {
    include!(concat!(env!("OUT_DIR"), "/stubs.rs"));
}
