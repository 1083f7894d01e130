//! The GPU context: finds a usable device (driver present, sm_80 or newer), creates the cudarc
//! context and stream, and loads every embedded kernel module (the sm_90 cubin on a 9.0 device,
//! the PTX elsewhere). Every failure is an `Err` that says why, never a panic, so callers can fall
//! back to the CPU or report it (`prefix-tune info`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::modules::{KernelModule, MODULES};

/// What to do when the crate was built without kernels.
const NO_KERNELS: &str = "this build has no CUDA kernels (nvcc was not found when it was built): \
run `bash scripts/setup` (installs the CUDA 13.0 compiler), `source <cache>/env.sh`, and rebuild";

/// A CUDA device with the project's kernels loaded, and the stream everything runs on.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    compute_capability: (i32, i32),
    sm_count: u32,
    description: String,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Runs a driver call, turning cudarc's panics (a driver library missing symbols) into errors.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(anyhow!("{what}: the CUDA driver library failed: {msg}"))
        }
    }
}

impl GpuContext {
    /// Opens device `ordinal` and loads the kernels.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine)"
            );
        }
        let count = guarded("counting devices", || {
            CudaContext::device_count().map_err(|e| anyhow!("CUDA driver error: {e:?}"))
        })?;
        if count <= 0 {
            bail!("the CUDA driver reports no devices");
        }
        if ordinal >= count as usize {
            bail!("CUDA device {ordinal} requested but only {count} device(s) exist");
        }
        guarded("creating the CUDA context", || Self::open(ordinal))
    }

    fn open(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("creating a context on device {ordinal}: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("reading the compute capability: {e:?}"))?;
        if major < 8 {
            bail!("{name} is sm_{major}{minor}; prefix-tune's kernels need sm_80 or newer");
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("reading the SM count: {e:?}"))?
            .max(1) as u32;
        let total_mem = ctx.total_mem().unwrap_or(0);
        if MODULES.is_empty() {
            bail!("found {name} (sm_{major}{minor}), but {NO_KERNELS}");
        }
        let use_cubin = (major, minor) == (9, 0);
        let mut modules = HashMap::new();
        for m in MODULES {
            let module = load(&ctx, m, use_cubin)?;
            modules.insert(m.name, module);
        }
        let stream = ctx.default_stream();
        let description = format!(
            "{name} (sm_{major}{minor}, {} SMs, {:.1} GiB), {} kernel modules loaded from {}",
            sm_count,
            total_mem as f64 / (1u64 << 30) as f64,
            modules.len(),
            if use_cubin {
                "sm_90 cubins"
            } else {
                "compute_80 PTX"
            }
        );
        Ok(GpuContext {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            compute_capability: (major, minor),
            sm_count,
            description,
        })
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors (sizes grid-stride launches).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Device name, capability, memory and where the kernels came from.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Kernel `name` of module `module` (loaded once, then cached).
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let (&key, m) = self
            .modules
            .get_key_value(module)
            .ok_or_else(|| anyhow!("no kernel module named {module:?} in this build"))?;
        // The caller may be on another thread than the one that opened the context: make it
        // current, so that cuModuleGetFunction here and cuFuncSetAttribute in the callers
        // (neither of which cudarc binds itself) run against this device.
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("making the CUDA context current: {e:?}"))?;
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&(key, name.to_string())) {
            return Ok(f.clone());
        }
        let f = m
            .load_function(name)
            .map_err(|e| anyhow!("kernel {module}::{name} not found: {e:?}"))?;
        cache.insert((key, name.to_string()), f.clone());
        Ok(f)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA stream synchronize: {e:?}"))
    }
}

fn load(ctx: &Arc<CudaContext>, m: &KernelModule, use_cubin: bool) -> Result<Arc<CudaModule>> {
    let image = if use_cubin {
        Ptx::from_binary(m.cubin_sm90.to_vec())
    } else {
        Ptx::from_src(m.ptx)
    };
    ctx.load_module(image)
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| {
            format!(
                "loading kernel module {:?} ({}); the PTX needs a driver for CUDA 13.0 or newer",
                m.name,
                if use_cubin { "sm_90 cubin" } else { "PTX" }
            )
        })
}

/// A one-line description of GPU 0, or why it cannot be used (for `prefix-tune info`).
pub fn gpu_available() -> Result<String, String> {
    GpuContext::new(0)
        .map(|g| g.description().to_string())
        .map_err(|e| format!("{e:#}"))
}

/// True when this build embeds the kernels (built with nvcc).
pub fn kernels_built() -> bool {
    !MODULES.is_empty()
}
