//! The driver's state and its entry points (the `cu*` symbols cudarc resolves by name). One device
//! with one primary context; objects (streams, events, modules, functions) are handles into
//! tables, so a stale or invented handle is `CUDA_ERROR_INVALID_HANDLE`, not a crash. Every entry
//! point catches panics (they become `CUDA_ERROR_UNKNOWN`), records a message for
//! `ptsim_last_error`, and after a kernel fault returns the context's sticky error, as a real
//! driver does until the context is reset.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub use cudarc::driver::sys::CUresult;
use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute as A, CUdeviceptr, CUevent, CUfunction,
    CUfunction_attribute as FA, CUmodule, CUstream,
};

use crate::config::{self, Config};
use crate::counters::Counters;
use crate::ffi::KernelDesc;
use crate::memory::{Kind, MemError, Memory};
use crate::module::{self, Entry, Format, Image};
use crate::stream::{Event, EventState, Stream};

use CUresult::*;

/// A failed call: the code and what to say about it.
pub struct Fail {
    pub code: CUresult,
    pub msg: String,
}

pub fn fail<T>(code: CUresult, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail {
        code,
        msg: msg.into(),
    })
}

pub type R = Result<(), Fail>;

pub struct Module {
    pub id: u64,
    pub image: Image,
}

pub struct Function {
    pub id: u64,
    pub module: u64,
    pub entry: Entry,
    pub desc: &'static KernelDesc,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub max_dynamic_smem: Mutex<usize>,
}

#[derive(Default)]
pub struct Objects {
    next: u64,
    pub streams: HashMap<u64, Arc<Stream>>,
    /// Destroyed streams whose queued work may still be running (it runs to the end, as on a
    /// GPU): a context synchronisation and a reset wait for it too, so that a free queued before
    /// the destroy can never land after a reset, on an allocation of the next context.
    pub retiring: Vec<Arc<Stream>>,
    pub events: HashMap<u64, Arc<Event>>,
    pub modules: HashMap<u64, Arc<Module>>,
    pub functions: HashMap<u64, Arc<Function>>,
}

impl Objects {
    pub fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

pub struct Sim {
    pub cfg: Config,
    pub kernels: HashMap<String, &'static KernelDesc>,
    pub mem: Mutex<Memory>,
    pub objects: Mutex<Objects>,
    /// The context's error after a kernel fault (every later call returns it).
    pub sticky: Mutex<Option<(CUresult, String)>>,
    pub ctx_refs: Mutex<usize>,
    /// Held across each retain, release and reset of the primary context, so that a release that
    /// resets it finishes before another thread's retain returns (as the driver serialises them):
    /// otherwise a thread that retains while another thread's last release is resetting would
    /// see its new modules and allocations wiped by that reset.
    pub lifecycle: Mutex<()>,
    pub counters: Counters,
    pub started: Instant,
}

static SIM: OnceLock<Result<Sim, String>> = OnceLock::new();
static INITIALISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The handle of the one (primary) context.
const CONTEXT: usize = 0xc0de_0000;

fn build() -> Result<Sim, String> {
    let cfg = config::from_env()?;
    let mut count = 0u32;
    // SAFETY: the table is static data of the C++ side with `count` entries.
    let table = unsafe {
        let p = crate::ffi::ptsim_kernels(&mut count);
        std::slice::from_raw_parts(p, count as usize)
    };
    let mut kernels = HashMap::new();
    for k in table {
        // SAFETY: names are static NUL-terminated strings.
        let name = unsafe { CStr::from_ptr(k.name) }
            .to_string_lossy()
            .into_owned();
        kernels.insert(name, k);
    }
    let skip = std::ffi::CString::new(cfg.skip_barrier.clone()).unwrap_or_default();
    let wait = std::ffi::CString::new(cfg.wait_group.clone()).unwrap_or_default();
    // SAFETY: NUL-terminated strings; the engine copies them.
    unsafe { crate::ffi::ptsim_set_mutations(skip.as_ptr(), wait.as_ptr()) };
    Ok(Sim {
        mem: Mutex::new(Memory::new(cfg.memory_bytes)),
        cfg,
        kernels,
        objects: Mutex::new(Objects::default()),
        sticky: Mutex::new(None),
        ctx_refs: Mutex::new(0),
        lifecycle: Mutex::new(()),
        counters: Counters::default(),
        started: Instant::now(),
    })
}

/// The simulator once `cuInit` succeeded.
pub fn sim() -> Option<&'static Sim> {
    SIM.get().and_then(|r| r.as_ref().ok())
}

fn initialised() -> Result<&'static Sim, Fail> {
    if !INITIALISED.load(std::sync::atomic::Ordering::Acquire) {
        return fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
    }
    match SIM.get() {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => fail(CUDA_ERROR_NOT_INITIALIZED, e.clone()),
        None => fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called"),
    }
}

/// The simulator with a current, healthy context (the state most calls need).
fn ctx() -> Result<&'static Sim, Fail> {
    let s = initialised()?;
    if CURRENT.with(Cell::get) != CONTEXT || *s.ctx_refs.lock().unwrap() == 0 {
        return fail(
            CUDA_ERROR_INVALID_CONTEXT,
            "no current context on this thread (cuCtxSetCurrent)",
        );
    }
    if let Some((code, msg)) = s.sticky.lock().unwrap().clone() {
        return fail(
            code,
            format!("the context is unusable after an earlier error: {msg}"),
        );
    }
    Ok(s)
}

fn set_last_error(what: &str, msg: &str) {
    let mut e = LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner());
    *e = format!("{what}: {msg}");
}

/// The ThreadSanitizer flavour checks the kernels' memory accesses only: what the driver itself
/// does on the caller's and the streams' threads (copies, memsets, poisoning, cuBLAS) is ignored.
pub struct TsanIgnore;

impl TsanIgnore {
    pub fn begin() -> TsanIgnore {
        #[cfg(feature = "racecheck")]
        // SAFETY: the TSan runtime is preloaded in the racecheck flavour (scripts/sim).
        unsafe {
            extern "C" {
                fn __tsan_ignore_thread_begin();
            }
            __tsan_ignore_thread_begin();
        }
        TsanIgnore
    }
}

impl Drop for TsanIgnore {
    fn drop(&mut self) {
        #[cfg(feature = "racecheck")]
        // SAFETY: as in begin.
        unsafe {
            extern "C" {
                fn __tsan_ignore_thread_end();
            }
            __tsan_ignore_thread_end();
        }
    }
}

/// Runs an entry point: panics become `CUDA_ERROR_UNKNOWN`; failures are recorded.
pub fn entry(what: &str, f: impl FnOnce() -> R) -> CUresult {
    let _ignore = TsanIgnore::begin();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CUDA_SUCCESS,
        Ok(Err(e)) => {
            set_last_error(what, &e.msg);
            e.code
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            set_last_error(what, &format!("internal error of the simulator: {msg}"));
            CUDA_ERROR_UNKNOWN
        }
    }
}

/// What the generated stubs return: the entry point is not simulated.
pub fn not_supported(name: &str) -> CUresult {
    set_last_error(
        name,
        "this driver entry point is not simulated (prefix-tune's CUDA simulator)",
    );
    if sim().is_none_or(|s| !s.cfg.quiet) {
        eprintln!(
            "prefix-tune simulator: {name} is not simulated: returning CUDA_ERROR_NOT_SUPPORTED"
        );
    }
    CUDA_ERROR_NOT_SUPPORTED
}

/// Makes a fault of the device sticky and reports it (as compute-sanitizer prints its reports).
pub fn device_fault(s: &Sim, code: CUresult, msg: String) {
    if !s.cfg.quiet {
        eprintln!("========= prefix-tune simulator: {msg} ({code:?})");
    }
    set_last_error("device fault", &msg);
    let mut st = s.sticky.lock().unwrap();
    if st.is_none() {
        *st = Some((code, msg));
    }
}

unsafe fn out<T>(p: *mut T, what: &str) -> Result<&'static mut T, Fail> {
    p.as_mut().ok_or_else(|| Fail {
        code: CUDA_ERROR_INVALID_VALUE,
        msg: format!("{what} is a null pointer"),
    })
}

// ------------------------------------------------------------------- handles

fn handle_id<T>(h: *mut T) -> u64 {
    h as usize as u64 / 16
}

fn make_handle<T>(id: u64) -> *mut T {
    (id * 16) as usize as *mut T
}

pub fn new_stream(s: &'static Sim, id: u64) -> Arc<Stream> {
    Stream::new(
        id,
        Arc::new(move |code, msg| device_fault(s, code, msg)),
        Arc::new(move || s.sticky.lock().unwrap().is_some()),
    )
}

/// The stream of a handle (null and the legacy / per-thread handles are the default stream).
pub fn stream(s: &'static Sim, h: CUstream) -> Result<Arc<Stream>, Fail> {
    let raw = h as usize;
    let mut o = s.objects.lock().unwrap();
    if raw == 0 || raw == 1 || raw == 2 {
        if let Some(st) = o.streams.get(&0) {
            return Ok(Arc::clone(st));
        }
        let st = new_stream(s, 0);
        o.streams.insert(0, Arc::clone(&st));
        return Ok(st);
    }
    o.streams.get(&handle_id(h)).cloned().ok_or_else(|| Fail {
        code: CUDA_ERROR_INVALID_HANDLE,
        msg: format!("stream handle {h:p} is not a live stream"),
    })
}

fn event(s: &Sim, h: CUevent) -> Result<Arc<Event>, Fail> {
    s.objects
        .lock()
        .unwrap()
        .events
        .get(&handle_id(h))
        .cloned()
        .ok_or_else(|| Fail {
            code: CUDA_ERROR_INVALID_HANDLE,
            msg: format!("event handle {h:p} is not a live event"),
        })
}

pub fn function(s: &Sim, h: CUfunction) -> Result<Arc<Function>, Fail> {
    s.objects
        .lock()
        .unwrap()
        .functions
        .get(&handle_id(h))
        .cloned()
        .ok_or_else(|| Fail {
            code: CUDA_ERROR_INVALID_HANDLE,
            msg: format!("function handle {h:p} is not a loaded kernel"),
        })
}

/// Waits for every stream (context synchronisation).
fn sync_all(s: &Sim) {
    let streams: Vec<Arc<Stream>> = {
        let o = s.objects.lock().unwrap();
        o.streams.values().chain(&o.retiring).cloned().collect()
    };
    for st in streams {
        st.wait_all();
    }
}

fn mem_err(e: MemError) -> Fail {
    match e {
        MemError::OutOfMemory(m) => Fail {
            code: CUDA_ERROR_OUT_OF_MEMORY,
            msg: m,
        },
        MemError::Invalid(m) => Fail {
            code: CUDA_ERROR_INVALID_VALUE,
            msg: m,
        },
    }
}

/// Resets the context: every object and allocation is gone, the sticky error cleared.
fn reset(s: &Sim) {
    let streams: Vec<Arc<Stream>> = {
        let mut o = s.objects.lock().unwrap();
        let mut v: Vec<Arc<Stream>> = o.streams.drain().map(|(_, st)| st).collect();
        v.append(&mut o.retiring);
        o.events.clear();
        o.modules.clear();
        o.functions.clear();
        v
    };
    for st in streams {
        st.wait_all();
        st.shutdown();
    }
    s.mem.lock().unwrap().clear();
    *s.sticky.lock().unwrap() = None;
}

// ------------------------------------------------------------------- initialisation, devices

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    entry("cuInit", || {
        if flags != 0 {
            return fail(CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0");
        }
        match SIM.get_or_init(build) {
            Ok(_) => {
                INITIALISED.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            Err(e) => fail(
                CUDA_ERROR_NOT_INITIALIZED,
                format!("prefix-tune simulator configuration: {e}"),
            ),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    entry("cuDriverGetVersion", || {
        let version = match SIM.get() {
            Some(Ok(s)) => s.cfg.driver_version,
            _ => config::from_env()
                .map(|c| c.driver_version)
                .unwrap_or(13000),
        };
        *out(v, "driverVersion")? = version;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    entry("cuDeviceGetCount", || {
        initialised()?;
        *out(n, "count")? = 1;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut CUdevice, ordinal: c_int) -> CUresult {
    entry("cuDeviceGet", || {
        initialised()?;
        if ordinal != 0 {
            return fail(
                CUDA_ERROR_INVALID_DEVICE,
                format!("device {ordinal}: the simulator has one device (0)"),
            );
        }
        *out(d, "device")? = 0;
        Ok(())
    })
}

fn check_device(d: CUdevice) -> R {
    if d != 0 {
        return fail(
            CUDA_ERROR_INVALID_DEVICE,
            format!("device {d} does not exist"),
        );
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, d: CUdevice) -> CUresult {
    entry("cuDeviceGetName", || {
        let s = initialised()?;
        check_device(d)?;
        if name.is_null() || len <= 0 {
            return fail(CUDA_ERROR_INVALID_VALUE, "name buffer is null or empty");
        }
        let n = s.cfg.limits.name.as_bytes();
        let k = n.len().min(len as usize - 1);
        std::ptr::copy_nonoverlapping(n.as_ptr(), name.cast::<u8>(), k);
        *name.add(k) = 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, d: CUdevice) -> CUresult {
    entry("cuDeviceTotalMem_v2", || {
        let s = initialised()?;
        check_device(d)?;
        *out(bytes, "bytes")? = s.cfg.memory_bytes;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], d: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid", || {
        initialised()?;
        check_device(d)?;
        *out(uuid, "uuid")? = *b"prefix-tune-sim\0";
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], d: CUdevice) -> CUresult {
    cuDeviceGetUuid(uuid, d)
}

fn attribute(s: &Sim, a: i32) -> Option<i32> {
    let l = &s.cfg.limits;
    let v = match a {
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK as i32 => 1024,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X as i32 => 1024,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y as i32 => 1024,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z as i32 => 64,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X as i32 => i32::MAX,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y as i32 => 65535,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z as i32 => 65535,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK as i32 => {
            l.smem_default as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as i32 => {
            l.smem_optin as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR as i32 => {
            l.smem_per_sm as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY as i32 => 65536,
        x if x == A::CU_DEVICE_ATTRIBUTE_WARP_SIZE as i32 => 32,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_PITCH as i32 => i32::MAX,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK as i32 => l.regs_per_block as i32,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR as i32 => {
            l.regs_per_sm as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE as i32 => l.clock_khz,
        x if x == A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE as i32 => l.memory_clock_khz,
        x if x == A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH as i32 => l.bus_width,
        x if x == A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE as i32 => l.l2_bytes as i32,
        x if x == A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as i32 => l.sm_count,
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR as i32 => {
            l.threads_per_sm as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR as i32 => {
            l.blocks_per_sm as i32
        }
        x if x == A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as i32 => l.major,
        x if x == A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as i32 => l.minor,
        x if x == A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT as i32 => 2,
        x if x == A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_INTEGRATED as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_COMPUTE_MODE as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_ECC_ENABLED as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_TCC_DRIVER as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID as i32 => 0x1b,
        x if x == A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH as i32 => 1,
        x if x == A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY as i32 => 0,
        x if x == A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK as i32 => 1024,
        x if x >= 1 && x < A::CU_DEVICE_ATTRIBUTE_MAX as i32 => 0,
        _ => return None,
    };
    Some(v)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    v: *mut c_int,
    attrib: c_int,
    d: CUdevice,
) -> CUresult {
    entry("cuDeviceGetAttribute", || {
        let s = initialised()?;
        check_device(d)?;
        match attribute(s, attrib) {
            Some(x) => {
                *out(v, "value")? = x;
                Ok(())
            }
            None => fail(
                CUDA_ERROR_INVALID_VALUE,
                format!("device attribute {attrib} does not exist"),
            ),
        }
    })
}

// ------------------------------------------------------------------- contexts

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(c: *mut CUcontext, d: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRetain", || {
        let s = initialised()?;
        check_device(d)?;
        let _life = s.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        *s.ctx_refs.lock().unwrap() += 1;
        *out(c, "context")? = CONTEXT as CUcontext;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(d: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRelease_v2", || {
        let s = initialised()?;
        check_device(d)?;
        let _life = s.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let last = {
            let mut r = s.ctx_refs.lock().unwrap();
            if *r == 0 {
                return fail(
                    CUDA_ERROR_INVALID_CONTEXT,
                    "the primary context is not retained",
                );
            }
            *r -= 1;
            *r == 0
        };
        // The last release resets the primary context (what the real driver does).
        if last {
            reset(s);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(d: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxReset_v2", || {
        let s = initialised()?;
        check_device(d)?;
        let _life = s.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        reset(s);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    d: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    entry("cuDevicePrimaryCtxGetState", || {
        let s = initialised()?;
        check_device(d)?;
        *out(flags, "flags")? = 0;
        *out(active, "active")? = (*s.ctx_refs.lock().unwrap() > 0) as c_int;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxSetFlags_v2(d: CUdevice, _flags: c_uint) -> CUresult {
    entry("cuDevicePrimaryCtxSetFlags_v2", || {
        initialised()?;
        check_device(d)
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(c: CUcontext) -> CUresult {
    entry("cuCtxSetCurrent", || {
        initialised()?;
        let raw = c as usize;
        if raw != 0 && raw != CONTEXT {
            return fail(
                CUDA_ERROR_INVALID_CONTEXT,
                format!("context handle {c:p} does not exist"),
            );
        }
        CURRENT.with(|x| x.set(raw));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(c: *mut CUcontext) -> CUresult {
    entry("cuCtxGetCurrent", || {
        initialised()?;
        *out(c, "context")? = CURRENT.with(Cell::get) as CUcontext;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(c: CUcontext) -> CUresult {
    cuCtxSetCurrent(c)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(c: *mut CUcontext) -> CUresult {
    entry("cuCtxPopCurrent_v2", || {
        initialised()?;
        if let Some(p) = c.as_mut() {
            *p = CURRENT.with(Cell::get) as CUcontext;
        }
        CURRENT.with(|x| x.set(0));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut CUdevice) -> CUresult {
    entry("cuCtxGetDevice", || {
        ctx()?;
        *out(d, "device")? = 0;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(_c: CUcontext, v: *mut c_uint) -> CUresult {
    entry("cuCtxGetApiVersion", || {
        let s = initialised()?;
        *out(v, "version")? = s.cfg.driver_version as c_uint;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    entry("cuCtxSynchronize", || {
        let s = initialised()?;
        if CURRENT.with(Cell::get) != CONTEXT {
            return fail(CUDA_ERROR_INVALID_CONTEXT, "no current context");
        }
        Counters::add(&s.counters.host_syncs, 1);
        sync_all(s);
        ctx().map(|_| ())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    entry("cuCtxGetStreamPriorityRange", || {
        ctx()?;
        if let Some(l) = least.as_mut() {
            *l = 0;
        }
        if let Some(g) = greatest.as_mut() {
            *g = -5;
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetLimit(_limit: c_int, _value: usize) -> CUresult {
    entry("cuCtxSetLimit", || ctx().map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(v: *mut usize, _limit: c_int) -> CUresult {
    entry("cuCtxGetLimit", || {
        ctx()?;
        *out(v, "value")? = 0;
        Ok(())
    })
}

// ------------------------------------------------------------------- memory

fn alloc(s: &Sim, bytes: usize, kind: Kind) -> Result<usize, Fail> {
    let p = s
        .mem
        .lock()
        .unwrap()
        .alloc(bytes, kind, s.cfg.tools.initcheck && s.cfg.execute)
        .map_err(mem_err)?;
    Counters::add(&s.counters.allocations, 1);
    Ok(p)
}

fn free(s: &Sim, ptr: usize, kind: Kind) -> R {
    let report = s.mem.lock().unwrap().free(ptr, kind).map_err(mem_err)?;
    Counters::add(&s.counters.frees, 1);
    if let Some(r) = report {
        if s.cfg.tools.memcheck {
            device_fault(
                s,
                CUDA_ERROR_ILLEGAL_ADDRESS,
                format!("found when freeing it: {r}"),
            );
            return fail(CUDA_ERROR_ILLEGAL_ADDRESS, r);
        }
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(p: *mut CUdeviceptr, bytes: usize) -> CUresult {
    entry("cuMemAlloc_v2", || {
        let s = ctx()?;
        let slot = out(p, "dptr")?;
        *slot = alloc(s, bytes, Kind::Device)? as CUdeviceptr;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    p: *mut CUdeviceptr,
    bytes: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemAllocAsync", || {
        let s = ctx()?;
        stream(s, h)?;
        let slot = out(p, "dptr")?;
        // Stream-ordered allocation: the memory exists at once (it is usable by later work).
        *slot = alloc(s, bytes, Kind::Device)? as CUdeviceptr;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: CUdeviceptr) -> CUresult {
    entry("cuMemFree_v2", || {
        let s = ctx()?;
        // cuMemFree synchronises with work that may still use the memory.
        sync_all(s);
        free(s, p as usize, Kind::Device)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(p: CUdeviceptr, h: CUstream) -> CUresult {
    entry("cuMemFreeAsync", || {
        let s = ctx()?;
        let st = stream(s, h)?;
        {
            let m = s.mem.lock().unwrap();
            if m.find(p as usize, 1).is_none_or(|a| a.base != p as usize) {
                drop(m);
                // Let the memory layer say what is wrong (double free, not an allocation, ...).
                return free(s, p as usize, Kind::Device);
            }
        }
        // Freed when the stream reaches this point.
        st.submit(Box::new(move || {
            let report = s.mem.lock().unwrap().free(p as usize, Kind::Device);
            Counters::add(&s.counters.frees, 1);
            match report {
                Ok(Some(r)) if s.cfg.tools.memcheck => Err((
                    CUDA_ERROR_ILLEGAL_ADDRESS,
                    format!("found when freeing it: {r}"),
                )),
                Ok(_) => Ok(()),
                Err(e) => Err((CUDA_ERROR_INVALID_VALUE, mem_err(e).msg)),
            }
        }));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free_: *mut usize, total: *mut usize) -> CUresult {
    entry("cuMemGetInfo_v2", || {
        let s = ctx()?;
        let m = s.mem.lock().unwrap();
        *out(free_, "free")? = m.limit - m.in_use;
        *out(total, "total")? = m.limit;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(p: *mut *mut c_void, bytes: usize) -> CUresult {
    entry("cuMemAllocHost_v2", || {
        let s = ctx()?;
        *out(p, "pp")? = alloc(s, bytes, Kind::Pinned)? as *mut c_void;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    p: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    cuMemAllocHost_v2(p, bytes)
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    entry("cuMemFreeHost", || {
        let s = ctx()?;
        sync_all(s);
        free(s, p as usize, Kind::Pinned)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostGetDevicePointer_v2(
    d: *mut CUdeviceptr,
    p: *mut c_void,
    _flags: c_uint,
) -> CUresult {
    entry("cuMemHostGetDevicePointer_v2", || {
        let s = ctx()?;
        if s.mem
            .lock()
            .unwrap()
            .find(p as usize, 1)
            .is_none_or(|a| a.kind != Kind::Pinned)
        {
            return fail(
                CUDA_ERROR_INVALID_VALUE,
                format!("{p:p} is not pinned host memory"),
            );
        }
        *out(d, "dptr")? = p as CUdeviceptr;
        Ok(())
    })
}

/// A device range `[p, p + n)` inside one live device (or pinned) allocation.
fn device_range(s: &Sim, p: usize, n: usize, what: &str) -> R {
    let m = s.mem.lock().unwrap();
    match m.find(p, n.max(1)) {
        Some(_) => Ok(()),
        None => fail(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "{what}: {n} bytes at 0x{p:x} are not inside one allocation (0x{p:x} is {})",
                m.describe(p)
            ),
        ),
    }
}

fn is_pinned(s: &Sim, p: usize, n: usize) -> bool {
    s.mem
        .lock()
        .unwrap()
        .find(p, n.max(1))
        .is_some_and(|a| a.kind == Kind::Pinned)
}

/// A host address the simulator may write: it is not device memory of this context.
fn host_range(s: &Sim, p: *const c_void, n: usize, what: &str) -> R {
    if p.is_null() && n > 0 {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("{what}: null host pointer"),
        );
    }
    let m = s.mem.lock().unwrap();
    if let Some(a) = m.find_pointer(p as usize) {
        if a.kind == Kind::Device {
            return fail(
                CUDA_ERROR_INVALID_VALUE,
                format!("{what}: {p:p} is device memory, not host memory"),
            );
        }
        if !a.contains(p as usize, n) {
            return fail(
                CUDA_ERROR_INVALID_VALUE,
                format!(
                    "{what}: {n} bytes at {p:p} run past the end of {}",
                    a.describe()
                ),
            );
        }
    }
    Ok(())
}

struct SendPtr(usize);
unsafe impl Send for SendPtr {}

unsafe fn htod(dst: CUdeviceptr, src: *const c_void, n: usize, h: Option<CUstream>) -> R {
    let s = ctx()?;
    device_range(s, dst as usize, n, "host-to-device copy destination")?;
    host_range(s, src, n, "host-to-device copy source")?;
    Counters::add(&s.counters.htod_copies, 1);
    Counters::add(&s.counters.htod_bytes, n as u64);
    match h {
        None => {
            Counters::add(&s.counters.host_syncs, 1);
            sync_all(s);
            std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst as usize as *mut u8, n);
        }
        Some(h) => {
            let st = stream(s, h)?;
            let d = SendPtr(dst as usize);
            if is_pinned(s, src as usize, n) {
                // Read when the copy runs, as the DMA engine would.
                let p = SendPtr(src as usize);
                st.submit(Box::new(move || {
                    std::ptr::copy_nonoverlapping(p.0 as *const u8, d.0 as *mut u8, n);
                    Ok(())
                }));
            } else {
                // Pageable memory is staged at once (the caller may reuse it on return).
                let data = std::slice::from_raw_parts(src.cast::<u8>(), n).to_vec();
                st.submit(Box::new(move || {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), d.0 as *mut u8, n);
                    Ok(())
                }));
            }
        }
    }
    Ok(())
}

unsafe fn dtoh(dst: *mut c_void, src: CUdeviceptr, n: usize, h: Option<CUstream>) -> R {
    let s = ctx()?;
    device_range(s, src as usize, n, "device-to-host copy source")?;
    host_range(s, dst, n, "device-to-host copy destination")?;
    Counters::add(&s.counters.dtoh_copies, 1);
    Counters::add(&s.counters.dtoh_bytes, n as u64);
    let pinned = is_pinned(s, dst as usize, n);
    match h {
        Some(h) if pinned => {
            // Really asynchronous: until the stream gets here the destination holds poison, so a
            // read without synchronising shows.
            let st = stream(s, h)?;
            std::ptr::write_bytes(dst.cast::<u8>(), 0xff, n);
            let d = SendPtr(dst as usize);
            let p = SendPtr(src as usize);
            st.submit(Box::new(move || {
                std::ptr::copy_nonoverlapping(p.0 as *const u8, d.0 as *mut u8, n);
                Ok(())
            }));
        }
        Some(h) => {
            // To pageable memory the driver returns only once the copy is done (a host sync).
            let st = stream(s, h)?;
            Counters::add(&s.counters.host_syncs, 1);
            st.wait_all();
            ctx()?;
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.cast::<u8>(), n);
        }
        None => {
            Counters::add(&s.counters.host_syncs, 1);
            sync_all(s);
            ctx()?;
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.cast::<u8>(), n);
        }
    }
    Ok(())
}

unsafe fn dtod(dst: CUdeviceptr, src: CUdeviceptr, n: usize, h: Option<CUstream>) -> R {
    let s = ctx()?;
    device_range(s, src as usize, n, "device-to-device copy source")?;
    device_range(s, dst as usize, n, "device-to-device copy destination")?;
    Counters::add(&s.counters.dtod_copies, 1);
    Counters::add(&s.counters.dtod_bytes, n as u64);
    let st = stream(s, h.unwrap_or(std::ptr::null_mut()))?;
    let d = SendPtr(dst as usize);
    let p = SendPtr(src as usize);
    st.submit(Box::new(move || {
        std::ptr::copy(p.0 as *const u8, d.0 as *mut u8, n);
        Ok(())
    }));
    if h.is_none() {
        st.wait_all();
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    entry("cuMemcpyHtoD_v2", || htod(dst, src, n, None))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemcpyHtoDAsync_v2", || htod(dst, src, n, Some(h)))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    entry("cuMemcpyDtoH_v2", || dtoh(dst, src, n, None))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoHAsync_v2", || dtoh(dst, src, n, Some(h)))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    entry("cuMemcpyDtoD_v2", || dtod(dst, src, n, None))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoDAsync_v2", || dtod(dst, src, n, Some(h)))
}

unsafe fn memset(
    dst: CUdeviceptr,
    value: u32,
    elem: usize,
    count: usize,
    h: Option<CUstream>,
) -> R {
    let s = ctx()?;
    let n = elem * count;
    device_range(s, dst as usize, n, "memset destination")?;
    if dst as usize % elem != 0 {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("memset of {elem}-byte values at 0x{dst:x}: misaligned"),
        );
    }
    Counters::add(&s.counters.memsets, 1);
    let st = stream(s, h.unwrap_or(std::ptr::null_mut()))?;
    let d = SendPtr(dst as usize);
    st.submit(Box::new(move || {
        match elem {
            1 => std::ptr::write_bytes(d.0 as *mut u8, value as u8, count),
            2 => std::slice::from_raw_parts_mut(d.0 as *mut u16, count).fill(value as u16),
            _ => std::slice::from_raw_parts_mut(d.0 as *mut u32, count).fill(value),
        }
        Ok(())
    }));
    if h.is_none() {
        st.wait_all();
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) -> CUresult {
    entry("cuMemsetD8_v2", || memset(dst, v as u32, 1, n, None))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    v: u8,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemsetD8Async", || memset(dst, v as u32, 1, n, Some(h)))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    v: u16,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemsetD16Async", || memset(dst, v as u32, 2, n, Some(h)))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, v: u32, n: usize) -> CUresult {
    entry("cuMemsetD32_v2", || memset(dst, v, 4, n, None))
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    v: u32,
    n: usize,
    h: CUstream,
) -> CUresult {
    entry("cuMemsetD32Async", || memset(dst, v, 4, n, Some(h)))
}

// ------------------------------------------------------------------- streams and events

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(h: *mut CUstream, _flags: c_uint) -> CUresult {
    entry("cuStreamCreate", || {
        let s = ctx()?;
        let slot = out(h, "stream")?;
        let id = s.objects.lock().unwrap().next_id();
        let st = new_stream(s, id);
        s.objects.lock().unwrap().streams.insert(id, st);
        *slot = make_handle(id);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    h: *mut CUstream,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    cuStreamCreate(h, flags)
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(h: CUstream) -> CUresult {
    entry("cuStreamDestroy_v2", || {
        let s = initialised()?;
        if (h as usize) <= 2 {
            return fail(
                CUDA_ERROR_INVALID_HANDLE,
                "the default stream cannot be destroyed",
            );
        }
        let st = {
            let mut o = s.objects.lock().unwrap();
            let st = o.streams.remove(&handle_id(h)).ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_HANDLE,
                msg: format!("stream handle {h:p} is not a live stream (destroyed twice?)"),
            })?;
            o.retiring.retain(|r| !r.is_done(r.submitted()));
            o.retiring.push(Arc::clone(&st));
            st
        };
        // Work already queued still runs (cuStreamDestroy returns at once on a GPU too).
        std::thread::spawn(move || {
            st.wait_all();
            st.shutdown();
        });
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(h: CUstream) -> CUresult {
    entry("cuStreamSynchronize", || {
        let s = ctx()?;
        let st = stream(s, h)?;
        Counters::add(&s.counters.host_syncs, 1);
        st.wait_all();
        ctx().map(|_| ())
    })
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(h: CUstream) -> CUresult {
    entry("cuStreamQuery", || {
        let s = ctx()?;
        let st = stream(s, h)?;
        if st.is_done(st.submitted()) {
            ctx().map(|_| ())
        } else {
            fail(CUDA_ERROR_NOT_READY, "work is still queued")
        }
    })
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(h: CUstream, e: CUevent, _flags: c_uint) -> CUresult {
    entry("cuStreamWaitEvent", || {
        let s = ctx()?;
        let st = stream(s, h)?;
        let ev = event(s, e)?;
        let (other, seq) = {
            let state = ev.state.lock().unwrap();
            (state.stream.clone(), state.seq)
        };
        if let Some(other) = other {
            if other.id != st.id {
                st.submit(Box::new(move || {
                    other.wait(seq);
                    Ok(())
                }));
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(h: CUstream, status: *mut c_int) -> CUresult {
    entry("cuStreamIsCapturing", || {
        let s = ctx()?;
        stream(s, h)?;
        *out(status, "captureStatus")? = crate::graph::capture_status(h);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut CUevent, flags: c_uint) -> CUresult {
    entry("cuEventCreate", || {
        let s = ctx()?;
        let slot = out(e, "event")?;
        let mut o = s.objects.lock().unwrap();
        let id = o.next_id();
        o.events.insert(
            id,
            Arc::new(Event {
                id,
                no_timing: flags & 0x2 != 0,
                state: Mutex::new(EventState::default()),
            }),
        );
        *slot = make_handle(id);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    entry("cuEventDestroy_v2", || {
        let s = initialised()?;
        s.objects
            .lock()
            .unwrap()
            .events
            .remove(&handle_id(e))
            .map(|_| ())
            .ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_HANDLE,
                msg: format!("event handle {e:p} is not a live event (destroyed twice?)"),
            })
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecord(e: CUevent, h: CUstream) -> CUresult {
    entry("cuEventRecord", || {
        let s = ctx()?;
        let ev = event(s, e)?;
        let st = stream(s, h)?;
        if crate::graph::record_event(h, &ev) {
            return Ok(());
        }
        let mut state = ev.state.lock().unwrap();
        let marker = Arc::clone(&ev);
        let seq = st.submitted() + 1;
        state.stream = Some(Arc::clone(&st));
        state.seq = seq;
        state.time = None;
        drop(state);
        let got = st.submit(Box::new(move || {
            let mut state = marker.state.lock().unwrap();
            if state.seq == seq {
                state.time = Some(Instant::now());
            }
            Ok(())
        }));
        debug_assert_eq!(got, seq);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecordWithFlags(e: CUevent, h: CUstream, _flags: c_uint) -> CUresult {
    cuEventRecord(e, h)
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    entry("cuEventSynchronize", || {
        let s = ctx()?;
        let ev = event(s, e)?;
        // An event never recorded returns at once (the driver's rule): no wait to count.
        // cudarc waits on a pinned buffer's event at every access, recorded or not.
        if ev.state.lock().unwrap().stream.is_some() {
            Counters::add(&s.counters.host_syncs, 1);
        }
        ev.wait();
        ctx().map(|_| ())
    })
}

#[no_mangle]
pub extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    entry("cuEventQuery", || {
        let s = ctx()?;
        if event(s, e)?.is_complete() {
            Ok(())
        } else {
            fail(CUDA_ERROR_NOT_READY, "the event's work has not run yet")
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    entry("cuEventElapsedTime", || {
        let s = ctx()?;
        let (a, b) = (event(s, start)?, event(s, end)?);
        if a.no_timing || b.no_timing {
            return fail(
                CUDA_ERROR_INVALID_HANDLE,
                "an event created with CU_EVENT_DISABLE_TIMING has no time",
            );
        }
        let ta = a.state.lock().unwrap().time;
        let tb = b.state.lock().unwrap().time;
        match (ta, tb) {
            (Some(x), Some(y)) => {
                let d = if y >= x {
                    (y - x).as_secs_f64()
                } else {
                    -(x - y).as_secs_f64()
                };
                *out(ms, "ms")? = (d * 1e3) as f32;
                Ok(())
            }
            _ => fail(
                CUDA_ERROR_NOT_READY,
                "an event was not recorded or has not completed",
            ),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    cuEventElapsedTime(ms, start, end)
}

// ------------------------------------------------------------------- modules and functions

unsafe fn load_module(m: *mut CUmodule, image: *const c_void) -> R {
    let s = ctx()?;
    let slot = out(m, "module")?;
    if image.is_null() {
        return fail(CUDA_ERROR_INVALID_VALUE, "image is a null pointer");
    }
    let len = module::image_len(image.cast());
    let bytes = std::slice::from_raw_parts(image.cast::<u8>(), len);
    let img = module::parse(bytes).map_err(|e| Fail {
        code: CUDA_ERROR_INVALID_IMAGE,
        msg: e,
    })?;
    let l = &s.cfg.limits;
    let arch = (l.major * 10 + l.minor) as u32;
    match img.format {
        Format::Ptx { isa, target } => {
            let need = module::cuda_for_ptx_isa(isa);
            if need > s.cfg.driver_version {
                return fail(
                    CUDA_ERROR_UNSUPPORTED_PTX_VERSION,
                    format!(
                        "PTX ISA {}.{} needs a CUDA {}.{} driver; this one is CUDA {}.{} (PTSIM_DRIVER_VERSION)",
                        isa.0,
                        isa.1,
                        need / 1000,
                        need % 1000 / 10,
                        s.cfg.driver_version / 1000,
                        s.cfg.driver_version % 1000 / 10
                    ),
                );
            }
            if target > arch {
                return fail(
                    CUDA_ERROR_NO_BINARY_FOR_GPU,
                    format!("PTX for sm_{target} cannot run on sm_{arch}"),
                );
            }
        }
        Format::Cubin {
            arch: a,
            api_version,
        } => {
            if a != arch {
                return fail(
                    CUDA_ERROR_NO_BINARY_FOR_GPU,
                    format!("a cubin for sm_{a} cannot run on sm_{arch}"),
                );
            }
            let need = (api_version as i32 / 10) * 1000 + (api_version as i32 % 10) * 10;
            if api_version > 0 && need > s.cfg.driver_version {
                return fail(
                    CUDA_ERROR_NO_BINARY_FOR_GPU,
                    format!(
                        "the cubin was built for CUDA {}.{} and this driver is CUDA {}.{} (PTSIM_DRIVER_VERSION)",
                        need / 1000,
                        need % 1000 / 10,
                        s.cfg.driver_version / 1000,
                        s.cfg.driver_version % 1000 / 10
                    ),
                );
            }
        }
    }
    Counters::add(&s.counters.module_loads, 1);
    let mut o = s.objects.lock().unwrap();
    let id = o.next_id();
    o.modules.insert(id, Arc::new(Module { id, image: img }));
    *slot = make_handle(id);
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut CUmodule, image: *const c_void) -> CUresult {
    entry("cuModuleLoadData", || load_module(m, image))
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    m: *mut CUmodule,
    image: *const c_void,
    _n: c_uint,
    _options: *mut c_int,
    _values: *mut *mut c_void,
) -> CUresult {
    entry("cuModuleLoadDataEx", || load_module(m, image))
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(m: CUmodule) -> CUresult {
    entry("cuModuleUnload", || {
        let s = initialised()?;
        let mut o = s.objects.lock().unwrap();
        let id = handle_id(m);
        o.modules.remove(&id).ok_or_else(|| Fail {
            code: CUDA_ERROR_INVALID_HANDLE,
            msg: format!("module handle {m:p} is not a loaded module"),
        })?;
        o.functions.retain(|_, f| f.module != id);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut CUfunction,
    m: CUmodule,
    name: *const c_char,
) -> CUresult {
    entry("cuModuleGetFunction", || {
        let s = ctx()?;
        let slot = out(f, "function")?;
        if name.is_null() {
            return fail(CUDA_ERROR_INVALID_VALUE, "name is a null pointer");
        }
        let name = CStr::from_ptr(name).to_string_lossy().into_owned();
        Counters::add(&s.counters.function_lookups, 1);
        let module = s
            .objects
            .lock()
            .unwrap()
            .modules
            .get(&handle_id(m))
            .cloned()
            .ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_HANDLE,
                msg: format!("module handle {m:p} is not a loaded module"),
            })?;
        let entry = module
            .image
            .entries
            .get(&name)
            .cloned()
            .ok_or_else(|| Fail {
                code: CUDA_ERROR_NOT_FOUND,
                msg: format!("the module has no kernel named {name:?}"),
            })?;
        let desc = *s.kernels.get(&name).ok_or_else(|| Fail {
            code: CUDA_ERROR_NOT_FOUND,
            msg: format!(
                "kernel {name:?} is in the module but not in the simulator's host build (rebuild sim/cuda)"
            ),
        })?;
        let max_dynamic = s.cfg.limits.smem_default.saturating_sub(entry.static_smem);
        let mut o = s.objects.lock().unwrap();
        let id = o.next_id();
        o.functions.insert(
            id,
            Arc::new(Function {
                id,
                module: module.id,
                entry,
                desc,
                max_dynamic_smem: Mutex::new(max_dynamic),
            }),
        );
        *slot = make_handle(id);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(f: CUfunction, attrib: c_int, value: c_int) -> CUresult {
    entry("cuFuncSetAttribute", || {
        let s = ctx()?;
        let func = function(s, f)?;
        if attrib == FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as i32 {
            let limit = s
                .cfg
                .limits
                .smem_optin
                .saturating_sub(func.entry.static_smem);
            if value < 0 || value as usize > limit {
                return fail(
                    CUDA_ERROR_INVALID_VALUE,
                    format!(
                        "{}: {value} bytes of dynamic shared memory requested, sm_{}{} allows at most {limit}",
                        func.entry.name, s.cfg.limits.major, s.cfg.limits.minor
                    ),
                );
            }
            Counters::add(&s.counters.smem_optins, 1);
            *func.max_dynamic_smem.lock().unwrap() = value as usize;
            Ok(())
        } else if attrib == FA::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as i32 {
            Ok(())
        } else {
            fail(
                CUDA_ERROR_INVALID_VALUE,
                format!("function attribute {attrib} cannot be set"),
            )
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    v: *mut c_int,
    attrib: c_int,
    f: CUfunction,
) -> CUresult {
    entry("cuFuncGetAttribute", || {
        let s = ctx()?;
        let func = function(s, f)?;
        let e = &func.entry;
        let x = match attrib {
            a if a == FA::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK as i32 => {
                if e.max_threads > 0 {
                    e.max_threads as i32
                } else {
                    1024
                }
            }
            a if a == FA::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES as i32 => e.static_smem as i32,
            a if a == FA::CU_FUNC_ATTRIBUTE_NUM_REGS as i32 => e.registers as i32,
            a if a == FA::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as i32 => 0,
            a if a == FA::CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES as i32 => 0,
            a if a == FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as i32 => {
                *func.max_dynamic_smem.lock().unwrap() as i32
            }
            a if a == FA::CU_FUNC_ATTRIBUTE_PTX_VERSION as i32
                || a == FA::CU_FUNC_ATTRIBUTE_BINARY_VERSION as i32 =>
            {
                s.cfg.limits.major * 10 + s.cfg.limits.minor
            }
            _ => {
                return fail(
                    CUDA_ERROR_INVALID_VALUE,
                    format!("function attribute {attrib} is not simulated"),
                )
            }
        };
        *out(v, "value")? = x;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(f: CUfunction, _config: c_int) -> CUresult {
    entry("cuFuncSetCacheConfig", || {
        let s = ctx()?;
        function(s, f).map(|_| ())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    h: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    entry("cuLaunchKernel", || {
        let s = ctx()?;
        let func = function(s, f)?;
        crate::launch::launch(
            s,
            &func,
            [gx, gy, gz],
            [bx, by, bz],
            smem as usize,
            h,
            params,
            extra,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    n: *mut c_int,
    f: CUfunction,
    block: c_int,
    smem: usize,
) -> CUresult {
    entry("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        let s = ctx()?;
        let func = function(s, f)?;
        *out(n, "numBlocks")? =
            crate::launch::occupancy(s, &func.entry, block.max(1) as usize, smem) as c_int;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    n: *mut c_int,
    f: CUfunction,
    block: c_int,
    smem: usize,
    _flags: c_uint,
) -> CUresult {
    cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, smem)
}

// ------------------------------------------------------------------- errors

fn error_text(e: c_int) -> Option<(&'static CStr, &'static CStr)> {
    Some(match e {
        0 => (c"CUDA_SUCCESS", c"no error"),
        1 => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        2 => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        3 => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        4 => (c"CUDA_ERROR_DEINITIALIZED", c"driver shutting down"),
        100 => (
            c"CUDA_ERROR_NO_DEVICE",
            c"no CUDA-capable device is detected",
        ),
        101 => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        200 => (
            c"CUDA_ERROR_INVALID_IMAGE",
            c"device kernel image is invalid",
        ),
        201 => (c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
        209 => (
            c"CUDA_ERROR_NO_BINARY_FOR_GPU",
            c"no kernel image is available for execution on the device",
        ),
        222 => (
            c"CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
            c"the provided PTX was compiled with an unsupported toolchain.",
        ),
        400 => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        500 => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        600 => (c"CUDA_ERROR_NOT_READY", c"device not ready"),
        700 => (
            c"CUDA_ERROR_ILLEGAL_ADDRESS",
            c"an illegal memory access was encountered",
        ),
        701 => (
            c"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
            c"too many resources requested for launch",
        ),
        702 => (
            c"CUDA_ERROR_LAUNCH_TIMEOUT",
            c"the launch timed out and was terminated",
        ),
        715 => (
            c"CUDA_ERROR_ILLEGAL_INSTRUCTION",
            c"an illegal instruction was encountered",
        ),
        716 => (c"CUDA_ERROR_MISALIGNED_ADDRESS", c"misaligned address"),
        719 => (c"CUDA_ERROR_LAUNCH_FAILED", c"unspecified launch failure"),
        801 => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        900 => (
            c"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
            c"operation not permitted when stream is capturing",
        ),
        901 => (
            c"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
            c"operation failed due to a previous error during capture",
        ),
        999 => (c"CUDA_ERROR_UNKNOWN", c"unknown error"),
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: c_int, p: *mut *const c_char) -> CUresult {
    match (error_text(e), p.as_mut()) {
        (Some((_, text)), Some(p)) => {
            *p = text.as_ptr();
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: c_int, p: *mut *const c_char) -> CUresult {
    match (error_text(e), p.as_mut()) {
        (Some((name, _)), Some(p)) => {
            *p = name.as_ptr();
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_VALUE,
    }
}

/// The last failure's message (what a call that did not succeed was refused for, or the last
/// kernel fault), NUL-terminated into `buf`; returns its full length.
#[no_mangle]
pub unsafe extern "C" fn ptsim_last_error(buf: *mut c_char, len: usize) -> usize {
    let e = LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !buf.is_null() && len > 0 {
        let k = e.len().min(len - 1);
        std::ptr::copy_nonoverlapping(e.as_ptr(), buf.cast::<u8>(), k);
        *buf.add(k) = 0;
    }
    e.len()
}

/// 1: this `libcuda` is prefix-tune's simulator.
#[no_mangle]
pub extern "C" fn ptsim_is_simulator() -> c_int {
    1
}
