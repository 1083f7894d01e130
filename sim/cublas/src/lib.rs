//! The simulated cuBLAS (`libcublas.so`) of prefix-tune's CUDA simulator: the cuBLAS entry points
//! cudarc resolves by name, forwarded to the `ptsim_cublas_*` functions of the simulated driver
//! (`libcuda.so`, sim/cuda), which already is loaded in the process (cudarc opens the driver before
//! cuBLAS). The implementation lives there, beside the driver's memory and streams; this library
//! only finds it. Every other cuBLAS entry point returns `CUBLAS_STATUS_NOT_SUPPORTED`.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

const NOT_INITIALIZED: c_int = 1;
const NOT_SUPPORTED: c_int = 15;

/// The simulated driver's handle: the `libcuda` already loaded (never a second copy).
fn driver() -> Option<usize> {
    static LIB: OnceLock<Option<usize>> = OnceLock::new();
    *LIB.get_or_init(|| {
        for name in [c"libcuda.so", c"libcuda.so.1"] {
            // SAFETY: RTLD_NOLOAD only returns a library that is already loaded.
            let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
            if !h.is_null() {
                return Some(h as usize);
            }
        }
        None
    })
}

fn symbol<T: Copy>(name: &CStr) -> Option<T> {
    let h = driver()?;
    // SAFETY: looking up a symbol of a loaded library; T is the function's type.
    let p = unsafe { libc::dlsym(h as *mut c_void, name.as_ptr()) };
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn missing(what: &str) -> c_int {
    eprintln!(
        "prefix-tune simulated cuBLAS: {what}: the simulated CUDA driver (sim/cuda's libcuda.so) is not loaded; \
         this cuBLAS works only with it"
    );
    NOT_INITIALIZED
}

fn not_supported(name: &str) -> i32 {
    eprintln!("prefix-tune simulated cuBLAS: {name} is not simulated: returning CUBLAS_STATUS_NOT_SUPPORTED");
    NOT_SUPPORTED
}

macro_rules! forward {
    ($name:literal, $sym:literal, fn($($arg:ident: $ty:ty),* $(,)?)) => {{
        type F = unsafe extern "C" fn($($ty),*) -> c_int;
        match symbol::<F>($sym) {
            Some(f) => unsafe { f($($arg),*) },
            None => missing($name),
        }
    }};
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(h: *mut *mut c_void) -> c_int {
    forward!(
        "cublasCreate_v2",
        c"ptsim_cublas_create",
        fn(h: *mut *mut c_void)
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(h: *mut c_void) -> c_int {
    forward!(
        "cublasDestroy_v2",
        c"ptsim_cublas_destroy",
        fn(h: *mut c_void)
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(h: *mut c_void, s: *mut c_void) -> c_int {
    forward!(
        "cublasSetStream_v2",
        c"ptsim_cublas_set_stream",
        fn(h: *mut c_void, s: *mut c_void)
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(h: *mut c_void, s: *mut *mut c_void) -> c_int {
    forward!(
        "cublasGetStream_v2",
        c"ptsim_cublas_get_stream",
        fn(h: *mut c_void, s: *mut *mut c_void)
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetPointerMode_v2(h: *mut c_void, mode: c_int) -> c_int {
    forward!(
        "cublasSetPointerMode_v2",
        c"ptsim_cublas_set_pointer_mode",
        fn(h: *mut c_void, mode: c_int)
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(h: *mut c_void, mode: c_int) -> c_int {
    forward!(
        "cublasSetMathMode",
        c"ptsim_cublas_set_math_mode",
        fn(h: *mut c_void, mode: c_int)
    )
}

#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    h: *mut c_void,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    atype: c_int,
    lda: c_int,
    b: *const c_void,
    btype: c_int,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ctype: c_int,
    ldc: c_int,
    compute: c_int,
    algo: c_int,
) -> c_int {
    forward!(
        "cublasGemmEx",
        c"ptsim_cublas_gemm_ex",
        fn(
            h: *mut c_void,
            transa: c_int,
            transb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: *const c_void,
            a: *const c_void,
            atype: c_int,
            lda: c_int,
            b: *const c_void,
            btype: c_int,
            ldb: c_int,
            beta: *const c_void,
            c: *mut c_void,
            ctype: c_int,
            ldc: c_int,
            compute: c_int,
            algo: c_int,
        )
    )
}

mod stubs {
    include!(concat!(env!("OUT_DIR"), "/stubs.rs"));
}
