//! The GPU context: finds a usable device (driver present, sm_80 or newer), creates the cudarc
//! context and stream, and loads every embedded kernel module (the sm_90 cubin on a 9.0 device,
//! the PTX elsewhere; on a driver older than CUDA 13.0, PTX compiled at run time by the machine's
//! NVRTC: [`super::rtc`]). Every failure is an `Err` that says why, never a panic, so callers can fall
//! back to the CPU or report it (`prefix-tune info`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::modules::{KernelModule, MODULES};
use super::rtc::{KernelSource, Nvrtc};

/// What to do when the crate was built without kernels.
const NO_KERNELS: &str = "this build has no CUDA kernels (nvcc was not found when it was built): \
run `bash scripts/setup` (installs the CUDA 13.0 compiler), `source <cache>/env.sh`, and rebuild";

/// The oldest driver the embedded kernels load on, as the CUDA version it supports: the
/// modules are CUDA 13.0 output (PTX ISA 9.0 and an sm_90 cubin), which drivers before R580 refuse.
pub const MIN_DRIVER_CUDA_VERSION: i32 = 13000;

/// The oldest driver the NVRTC fallback is meant for (CUDA 12.2, R535), with an NVRTC no newer
/// than the driver. Tested on the simulated device with NVRTC 12.8 at CUDA 12.8 only.
pub const MIN_DRIVER_CUDA_VERSION_NVRTC: i32 = 12020;

/// The CUDA version the loaded driver supports (`cuDriverGetVersion`: 13000 for 13.0), or `None`
/// without a driver.
pub fn driver_cuda_version() -> Option<i32> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    guarded("reading the driver version", || {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: the driver writes one int.
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(v)
        } else {
            Err(anyhow!("cuDriverGetVersion: {r:?}"))
        }
    })
    .ok()
}

/// `13000` as `13.0`.
pub fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// (module, kernel) → the function and the dynamic shared memory it is opted in to.
type FunctionCache = HashMap<(&'static str, &'static str), (CudaFunction, u32)>;

/// Dynamic shared memory per block that every GPU allows without the opt-in attribute.
pub const SMEM_WITHOUT_OPT_IN: u32 = 48 * 1024;

/// A CUDA device with the project's kernels loaded, and the stream everything runs on.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Functions resolved once (module, name): the function and the dynamic shared memory it
    /// has been opted in to (`cuFuncSetAttribute` runs only when a launch asks for more).
    functions: Mutex<FunctionCache>,
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
    guarded_lib("CUDA driver", what, f)
}

/// [`guarded`] for any library cudarc loads at run time (`lib` names it in the error).
pub(super) fn guarded_lib<T>(lib: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(anyhow!("{what}: the {lib} library failed: {msg}"))
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
        let nvrtc = Self::nvrtc_if_needed(KernelSource::from_env()?)?;
        let count = guarded("counting devices", || {
            CudaContext::device_count().map_err(|e| anyhow!("CUDA driver error: {e:?}"))
        })?;
        if count <= 0 {
            bail!("the CUDA driver reports no devices");
        }
        if ordinal >= count as usize {
            bail!("CUDA device {ordinal} requested but only {count} device(s) exist");
        }
        guarded("creating the CUDA context", || {
            Self::open(ordinal, nvrtc.as_ref())
        })
    }

    /// The NVRTC to compile the kernels with, when `source` asks for it or the driver is older
    /// than the embedded images (`None`: load those). The errors name the driver, the minimum,
    /// and why the fallback is unavailable.
    fn nvrtc_if_needed(source: KernelSource) -> Result<Option<Nvrtc>> {
        let driver = driver_cuda_version();
        let old = driver.filter(|&v| v < MIN_DRIVER_CUDA_VERSION);
        let refused = |v: i32| {
            format!(
                "the NVIDIA driver supports CUDA {}, but prefix-tune's kernels are CUDA {} images \
                 (PTX ISA 9.0, an sm_90 cubin) and need a driver for CUDA {} or newer (R580 or \
                 later): update the driver, or use --device cpu",
                cuda_version_string(v),
                cuda_version_string(MIN_DRIVER_CUDA_VERSION),
                cuda_version_string(MIN_DRIVER_CUDA_VERSION)
            )
        };
        match (source, old) {
            (KernelSource::Embedded, Some(v)) => {
                bail!(
                    "{} (PREFIX_TUNE_KERNELS=embedded: no NVRTC fallback)",
                    refused(v)
                )
            }
            (KernelSource::Embedded, None) | (KernelSource::Auto, None) => return Ok(None),
            (KernelSource::Auto, Some(_)) | (KernelSource::Nvrtc, _) => {}
        }
        let nvrtc = Nvrtc::find().map_err(|e| match old {
            Some(v) => anyhow!(
                "{}; the fallback, compiling the kernels with the machine's NVRTC, is not \
                 available either: {e:#}",
                refused(v)
            ),
            None => e.context("PREFIX_TUNE_KERNELS=nvrtc"),
        })?;
        let why_not = |msg: String| match old {
            Some(v) => anyhow!("{}; the NVRTC fallback cannot help: {msg}", refused(v)),
            None => anyhow!("PREFIX_TUNE_KERNELS=nvrtc: {msg}"),
        };
        let floor = cuda_version_string(MIN_DRIVER_CUDA_VERSION_NVRTC);
        if let Some(v) = driver.filter(|&v| v < MIN_DRIVER_CUDA_VERSION_NVRTC) {
            return Err(why_not(format!(
                "it needs a driver for CUDA {floor} or newer (R535+), this one is CUDA {}",
                cuda_version_string(v)
            )));
        }
        if nvrtc.cuda_version() < MIN_DRIVER_CUDA_VERSION_NVRTC {
            return Err(why_not(format!(
                "the NVRTC on the library path is {}.{}; the kernels need NVRTC {floor} or newer",
                nvrtc.version.0, nvrtc.version.1
            )));
        }
        if let Some(v) = driver.filter(|&v| v < nvrtc.cuda_version()) {
            let wheel = if v >= 13000 {
                "nvidia-cuda-nvrtc"
            } else {
                "nvidia-cuda-nvrtc-cu12"
            };
            return Err(why_not(format!(
                "NVRTC {}.{} is newer than the driver (CUDA {}): the driver would refuse its \
                 PTX; use an NVRTC no newer than CUDA {} (e.g. `pip install {wheel}=={}.*`, its \
                 lib directory on LD_LIBRARY_PATH; the loader tries libnvrtc.so and .so.13 \
                 before .so.12, so a newer NVRTC anywhere on the search path hides an older one)",
                nvrtc.version.0,
                nvrtc.version.1,
                cuda_version_string(v),
                cuda_version_string(v),
                cuda_version_string(v)
            )));
        }
        Ok(Some(nvrtc))
    }

    fn open(ordinal: usize, nvrtc: Option<&Nvrtc>) -> Result<Self> {
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
        let use_cubin = (major, minor) == (9, 0) && nvrtc.is_none();
        let mut modules = HashMap::new();
        let mut from_cache = 0;
        for m in MODULES {
            let module = match nvrtc {
                None => load(&ctx, m, use_cubin)?,
                Some(n) => {
                    let (ptx, cached) = n.ptx(m)?;
                    from_cache += cached as usize;
                    match load_compiled(&ctx, m, ptx, n) {
                        Ok(module) => module,
                        // A cache entry that looked whole but does not load (truncated, or
                        // from another NVRTC build): compile it again, once.
                        Err(e) if cached => {
                            from_cache -= 1;
                            let fresh = n.compile_and_cache(m).with_context(|| {
                                format!(
                                    "recompiling after the cached {} failed to load ({e:#})",
                                    n.cache_path(m).display()
                                )
                            })?;
                            load_compiled(&ctx, m, fresh, n)?
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            modules.insert(m.name, module);
        }
        let from = match nvrtc {
            None if use_cubin => "sm_90 cubins".to_string(),
            None => "compute_80 PTX".to_string(),
            Some(n) => format!(
                "compute_80 PTX compiled at run time by NVRTC {}.{} ({from_cache} from the cache in {})",
                n.version.0,
                n.version.1,
                n.cache.display()
            ),
        };
        let stream = ctx.default_stream();
        let description = format!(
            "{name} (sm_{major}{minor}, {} SMs, {:.1} GiB), {} kernel modules loaded from {}",
            sm_count,
            total_mem as f64 / (1u64 << 30) as f64,
            modules.len(),
            from
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
    pub fn function(&self, module: &str, name: &'static str) -> Result<CudaFunction> {
        self.function_with_smem(module, name, 0)
    }

    /// [`function`](Self::function), opted in to `smem` bytes of dynamic shared memory when that
    /// is above the 48 KB every GPU allows without it (once per function: a later launch asking
    /// for no more than the recorded amount costs no driver call).
    pub fn function_with_smem(
        &self,
        module: &str,
        name: &'static str,
        smem: u32,
    ) -> Result<CudaFunction> {
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
        let entry = match cache.entry((key, name)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let f = m
                    .load_function(name)
                    .map_err(|e| anyhow!("kernel {module}::{name} not found: {e:?}"))?;
                e.insert((f, SMEM_WITHOUT_OPT_IN))
            }
        };
        if smem > entry.1 {
            entry
                .0
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(|e| {
                    anyhow!(
                        "{name} needs {smem} B of shared memory per block, which this GPU refuses: \
                         {e:?}"
                    )
                })?;
            entry.1 = smem;
        }
        Ok(entry.0.clone())
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

/// Loads module `m` from the PTX NVRTC compiled.
fn load_compiled(
    ctx: &Arc<CudaContext>,
    m: &KernelModule,
    ptx: String,
    nvrtc: &Nvrtc,
) -> Result<Arc<CudaModule>> {
    ctx.load_module(Ptx::from_src(ptx))
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| {
            format!(
                "loading kernel module {:?} (PTX from NVRTC {}.{})",
                m.name, nvrtc.version.0, nvrtc.version.1
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

/// Whether the loaded CUDA driver is prefix-tune's simulator (sim/cuda), not a GPU's. False when
/// no driver loads.
pub fn simulated() -> bool {
    // SAFETY: looks a symbol up in the driver library cudarc loaded; the simulator exports it as
    // `extern "C" fn() -> c_int`.
    unsafe {
        if !sys::is_culib_present() {
            return false;
        }
        sys::culib()
            .get::<unsafe extern "C" fn() -> std::ffi::c_int>(b"ptsim_is_simulator\0")
            .map(|f| f() == 1)
            .unwrap_or(false)
    }
}

/// The simulator's account of the last failed driver call (which argument, which kernel, what
/// memory), when the driver is the simulator and has one.
pub fn simulator_detail() -> Option<String> {
    if !simulated() {
        return None;
    }
    // SAFETY: the simulator exports `ptsim_last_error(buf, len) -> len`, writing a NUL-terminated
    // string of at most len - 1 bytes.
    unsafe {
        let f = sys::culib()
            .get::<unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> usize>(
                b"ptsim_last_error\0",
            )
            .ok()?;
        let mut buf = vec![0u8; 4096];
        f(buf.as_mut_ptr().cast(), buf.len());
        let s = std::ffi::CStr::from_bytes_until_nul(&buf)
            .ok()?
            .to_string_lossy()
            .into_owned();
        (!s.is_empty()).then_some(s)
    }
}

/// A driver error with the simulator's detail appended when there is one.
pub fn driver_error(what: &str, e: cudarc::driver::DriverError) -> anyhow::Error {
    match simulator_detail() {
        Some(d) => anyhow!("{what}: {e:?} (simulator: {d})"),
        None => anyhow!("{what}: {e:?}"),
    }
}

/// A launch's result as this crate's error, naming the kernel (and with the simulator's detail).
pub fn launched<T>(kernel: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| driver_error(&format!("launching {kernel}"), e))
}

/// The simulated device's counters by name (launches, copies and bytes, host synchronisations,
/// peak memory, ...; see sim/cuda/src/counters.rs), or `None` when the driver is not the
/// simulator.
pub fn simulator_counters() -> Option<Vec<(String, u64)>> {
    if !simulated() {
        return None;
    }
    // SAFETY: the simulator exports `ptsim_counter_names() -> *const c_char` (a static string) and
    // `ptsim_counters(out, n) -> count`, writing at most n values.
    unsafe {
        let lib = sys::culib();
        let names = lib
            .get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"ptsim_counter_names\0")
            .ok()?;
        let values = lib
            .get::<unsafe extern "C" fn(*mut u64, usize) -> usize>(b"ptsim_counters\0")
            .ok()?;
        let names = std::ffi::CStr::from_ptr(names())
            .to_string_lossy()
            .into_owned();
        let n = values(std::ptr::null_mut(), 0);
        let mut v = vec![0u64; n];
        values(v.as_mut_ptr(), n);
        Some(names.split(',').map(str::to_string).zip(v).collect())
    }
}

/// One counter of [`simulator_counters`].
pub fn simulator_counter(name: &str) -> Option<u64> {
    simulator_counters()?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// A snapshot of the simulated device's counters, for the counts of one piece of work: take one
/// before, one after, and [`SimCounts::since`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimCounts(pub Vec<(String, u64)>);

impl SimCounts {
    /// Now, or `None` when the driver is not the simulator.
    pub fn now() -> Option<SimCounts> {
        simulator_counters().map(SimCounts)
    }

    /// What happened since `earlier` (counters as differences; `bytes_in_use` and `peak_bytes`
    /// as they are now).
    pub fn since(&self, earlier: &SimCounts) -> SimCounts {
        SimCounts(
            self.0
                .iter()
                .map(|(n, v)| {
                    let before = earlier.get(n);
                    let keep = n == "bytes_in_use" || n == "peak_bytes";
                    (n.clone(), if keep { *v } else { v.saturating_sub(before) })
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }

    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(n, v)| (n.clone(), (*v).into()))
                .collect(),
        )
    }

    /// One line: launches, copies and bytes, host syncs, peak memory (counts divided by `per`).
    pub fn summary(&self, per: u64) -> String {
        let per = per.max(1);
        let g = |n: &str| self.get(n) as f64 / per as f64;
        let mib = |b: f64| b / (1u64 << 20) as f64;
        format!(
            "{:.0} kernel launches + {:.0} cuBLAS calls, {:.0} host->device copies ({:.2} MiB), {:.0} device->host ({:.3} MiB), \
             {:.0} device->device, {:.0} memsets, {:.0} host syncs, {:.0} allocations, \
             {:.0} function lookups, {:.0} smem opt-ins; peak {:.0} MiB",
            g("launches"),
            g("cublas_calls"),
            g("htod_copies"),
            mib(g("htod_bytes")),
            g("dtoh_copies"),
            mib(g("dtoh_bytes")),
            g("dtod_copies"),
            g("memsets"),
            g("host_syncs"),
            g("allocations"),
            g("function_lookups"),
            g("smem_optins"),
            mib(self.get("peak_bytes") as f64)
        )
    }
}

/// Whether the simulated device runs the kernels (`PTSIM_EXECUTE=0` makes it count only; the
/// simulator reads the same variable in this process).
pub fn simulator_execute() -> bool {
    std::env::var("PTSIM_EXECUTE").map_or(true, |v| v != "0")
}

/// Starts a new peak of device memory in use (the simulator's `peak_bytes` counter).
pub fn reset_simulator_peak() {
    if !simulated() {
        return;
    }
    // SAFETY: the simulator exports `ptsim_reset_peak()`.
    unsafe {
        if let Ok(f) = sys::culib().get::<unsafe extern "C" fn()>(b"ptsim_reset_peak\0") {
            f();
        }
    }
}
