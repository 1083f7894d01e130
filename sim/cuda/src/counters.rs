//! Exact counts of what a program asked the device to do: kernel launches (cuBLAS calls counted
//! apart), host↔device copies (count and bytes), memsets, host synchronisations (explicit stream,
//! context and event waits — a wait on an event never recorded, which returns at once, is not
//! one — and the copies that block the host: synchronous copies and device→pageable-host copies), allocations, peak device memory, shared-memory opt-ins and
//! function lookups. `ptsim_counters` hands them out by name, so a program linked against a real
//! driver (which lacks the symbol) simply has none.

use std::ffi::c_char;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        #[derive(Default)]
        pub struct Counters { $(pub $name: AtomicU64,)* }
        /// The counters' names, in `ptsim_counters` order, comma-separated.
        pub const NAMES: &str = concat!($(stringify!($name), ","),*);
        impl Counters {
            fn values(&self) -> Vec<u64> { vec![$(self.$name.load(Ordering::Relaxed)),*] }
        }
    };
}

counters!(
    launches,
    cublas_calls,
    htod_copies,
    htod_bytes,
    dtoh_copies,
    dtoh_bytes,
    dtod_copies,
    dtod_bytes,
    memsets,
    host_syncs,
    allocations,
    frees,
    bytes_in_use,
    peak_bytes,
    smem_optins,
    function_lookups,
    module_loads,
    graph_launches,
    graph_kernel_nodes,
    ldmatrix_bank_conflicts,
);

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Copies up to `n` counter values (in the order of `ptsim_counter_names`) into `out`; returns how
/// many counters there are.
///
/// # Safety
/// `out` must be valid for `n` writes.
#[no_mangle]
pub unsafe extern "C" fn ptsim_counters(out: *mut u64, n: usize) -> usize {
    let v = match crate::driver::sim() {
        Some(s) => {
            let (in_use, peak) = {
                let m = s.mem.lock().unwrap();
                (m.in_use as u64, m.peak as u64)
            };
            s.counters.bytes_in_use.store(in_use, Ordering::Relaxed);
            s.counters.peak_bytes.store(peak, Ordering::Relaxed);
            // SAFETY: reads an atomic counter of the engine.
            let bank = unsafe { crate::ffi::ptsim_ldmatrix_bank_conflicts() };
            s.counters
                .ldmatrix_bank_conflicts
                .store(bank, Ordering::Relaxed);
            s.counters.values()
        }
        None => vec![0; NAMES.split(',').filter(|x| !x.is_empty()).count()],
    };
    if !out.is_null() {
        for (i, x) in v.iter().take(n).enumerate() {
            *out.add(i) = *x;
        }
    }
    v.len()
}

/// The counters' names, comma-separated (a static NUL-terminated string).
#[no_mangle]
pub extern "C" fn ptsim_counter_names() -> *const c_char {
    static NAMES_C: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();
    NAMES_C
        .get_or_init(|| std::ffi::CString::new(NAMES.trim_end_matches(',')).unwrap())
        .as_ptr()
}

/// Resets the peak of device memory in use to what is in use now.
#[no_mangle]
pub extern "C" fn ptsim_reset_peak() {
    if let Some(s) = crate::driver::sim() {
        let mut m = s.mem.lock().unwrap();
        m.peak = m.in_use;
    }
}
