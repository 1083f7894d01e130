//! The simulated cuBLAS (the calls prefix-tune makes): handles bound to a stream, `cublasGemmEx`
//! with cuBLAS's column-major semantics and argument validation (`lda < max(1, rows of A)` and
//! the like are `CUBLAS_STATUS_INVALID_VALUE`), fp16 / bf16 / fp32 operands with fp32
//! accumulation, run in the handle's stream order. The functions are exported as `ptsim_cublas_*`
//! and `libcublas.so` (sim/cublas) forwards the real names to them, so both libraries share this
//! driver's memory and streams.

#![allow(clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;

use half::{bf16, f16};

use crate::counters::Counters;
use crate::driver::{self, Sim};

pub const SUCCESS: c_int = 0;
pub const NOT_INITIALIZED: c_int = 1;
pub const INVALID_VALUE: c_int = 7;
pub const EXECUTION_FAILED: c_int = 13;
pub const NOT_SUPPORTED: c_int = 15;

const R_32F: c_int = 0;
const R_16F: c_int = 2;
const R_16BF: c_int = 14;

struct Handle {
    stream: usize,
    device_pointers: bool,
}

static HANDLES: Mutex<Option<(u64, HashMap<u64, Handle>)>> = Mutex::new(None);

fn with_handles<T>(f: impl FnOnce(&mut u64, &mut HashMap<u64, Handle>) -> T) -> T {
    let mut g = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    let (next, map) = g.get_or_insert_with(|| (0, HashMap::new()));
    f(next, map)
}

fn blas_error(what: &str, msg: String) {
    // Recorded where the driver keeps its last error (ptsim_last_error).
    let _ = driver::entry(what, || {
        driver::fail(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE, msg)
    });
}

fn sim() -> Option<&'static Sim> {
    driver::sim()
}

#[no_mangle]
pub unsafe extern "C" fn ptsim_cublas_create(h: *mut *mut c_void) -> c_int {
    if sim().is_none() || h.is_null() {
        blas_error(
            "cublasCreate_v2",
            "the driver is not initialised (cuInit) or handle is null".into(),
        );
        return NOT_INITIALIZED;
    }
    let id = with_handles(|next, map| {
        *next += 1;
        map.insert(
            *next,
            Handle {
                stream: 0,
                device_pointers: false,
            },
        );
        *next
    });
    *h = (id * 16) as usize as *mut c_void;
    SUCCESS
}

fn id(h: *mut c_void) -> u64 {
    h as usize as u64 / 16
}

#[no_mangle]
pub extern "C" fn ptsim_cublas_destroy(h: *mut c_void) -> c_int {
    if with_handles(|_, map| map.remove(&id(h)).is_some()) {
        SUCCESS
    } else {
        blas_error(
            "cublasDestroy_v2",
            format!("handle {h:p} is not a live cuBLAS handle"),
        );
        NOT_INITIALIZED
    }
}

#[no_mangle]
pub extern "C" fn ptsim_cublas_set_stream(h: *mut c_void, stream: *mut c_void) -> c_int {
    let Some(s) = sim() else {
        return NOT_INITIALIZED;
    };
    if driver::stream(s, stream.cast()).is_err() {
        blas_error(
            "cublasSetStream_v2",
            format!("stream {stream:p} is not a live stream"),
        );
        return INVALID_VALUE;
    }
    with_handles(|_, map| match map.get_mut(&id(h)) {
        Some(x) => {
            x.stream = stream as usize;
            SUCCESS
        }
        None => NOT_INITIALIZED,
    })
}

#[no_mangle]
pub unsafe extern "C" fn ptsim_cublas_get_stream(
    h: *mut c_void,
    stream: *mut *mut c_void,
) -> c_int {
    with_handles(|_, map| match (map.get(&id(h)), stream.as_mut()) {
        (Some(x), Some(out)) => {
            *out = x.stream as *mut c_void;
            SUCCESS
        }
        (None, _) => NOT_INITIALIZED,
        _ => INVALID_VALUE,
    })
}

#[no_mangle]
pub extern "C" fn ptsim_cublas_set_pointer_mode(h: *mut c_void, mode: c_int) -> c_int {
    with_handles(|_, map| match map.get_mut(&id(h)) {
        Some(x) if mode == 0 || mode == 1 => {
            x.device_pointers = mode == 1;
            SUCCESS
        }
        Some(_) => INVALID_VALUE,
        None => NOT_INITIALIZED,
    })
}

#[no_mangle]
pub extern "C" fn ptsim_cublas_set_math_mode(h: *mut c_void, _mode: c_int) -> c_int {
    with_handles(|_, map| {
        if map.contains_key(&id(h)) {
            SUCCESS
        } else {
            NOT_INITIALIZED
        }
    })
}

fn elem_size(t: c_int) -> Option<usize> {
    match t {
        R_32F => Some(4),
        R_16F | R_16BF => Some(2),
        _ => None,
    }
}

/// Reads element `i` of a matrix of type `t` as f32.
unsafe fn load(p: usize, t: c_int, i: usize) -> f32 {
    match t {
        R_32F => *(p as *const f32).add(i),
        R_16F => (*(p as *const f16).add(i)).to_f32(),
        _ => (*(p as *const bf16).add(i)).to_f32(),
    }
}

unsafe fn store(p: usize, t: c_int, i: usize, v: f32) {
    match t {
        R_32F => *(p as *mut f32).add(i) = v,
        R_16F => *(p as *mut f16).add(i) = f16::from_f32(v),
        _ => *(p as *mut bf16).add(i) = bf16::from_f32(v),
    }
}

#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub unsafe extern "C" fn ptsim_cublas_gemm_ex(
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
    _algo: c_int,
) -> c_int {
    const WHAT: &str = "cublasGemmEx";
    let Some(s) = sim() else {
        return NOT_INITIALIZED;
    };
    let Some((stream_h, device_pointers)) =
        with_handles(|_, map| map.get(&id(h)).map(|x| (x.stream, x.device_pointers)))
    else {
        blas_error(WHAT, format!("handle {h:p} is not a live cuBLAS handle"));
        return NOT_INITIALIZED;
    };
    let trans = |t: c_int| matches!(t, 1 | 2);
    if !(0..=2).contains(&transa) || !(0..=2).contains(&transb) {
        blas_error(
            WHAT,
            format!("transa {transa} / transb {transb} is not a cublasOperation_t"),
        );
        return INVALID_VALUE;
    }
    let (rows_a, cols_a) = if trans(transa) { (k, m) } else { (m, k) };
    let (rows_b, cols_b) = if trans(transb) { (n, k) } else { (k, n) };
    let checks = [
        (
            m < 0 || n < 0 || k < 0,
            format!("m = {m}, n = {n}, k = {k}: negative"),
        ),
        (
            lda < rows_a.max(1),
            format!(
                "lda = {lda} < max(1, {rows_a}) (rows of A{})",
                if trans(transa) {
                    " before the transpose"
                } else {
                    ""
                }
            ),
        ),
        (
            ldb < rows_b.max(1),
            format!(
                "ldb = {ldb} < max(1, {rows_b}) (rows of B{})",
                if trans(transb) {
                    " before the transpose"
                } else {
                    ""
                }
            ),
        ),
        (ldc < m.max(1), format!("ldc = {ldc} < max(1, m = {m})")),
    ];
    for (bad, msg) in checks {
        if bad {
            blas_error(WHAT, msg);
            return INVALID_VALUE;
        }
    }
    let (Some(sa), Some(sb), Some(sc)) = (elem_size(atype), elem_size(btype), elem_size(ctype))
    else {
        blas_error(
            WHAT,
            format!(
                "data types A {atype}, B {btype}, C {ctype}: the simulator has 16F, 16BF and 32F"
            ),
        );
        return NOT_SUPPORTED;
    };
    // CUBLAS_COMPUTE_32F and its variants (32F_PEDANTIC, 32F_FAST_16F / 16BF / TF32): fp32
    // accumulation with fp32 alpha and beta.
    if !matches!(compute, 68 | 69 | 74 | 75 | 77) {
        blas_error(WHAT, format!("compute type {compute}: the simulator runs CUBLAS_COMPUTE_32F (and its fast variants)"));
        return NOT_SUPPORTED;
    }
    let Ok(stream) = driver::stream(s, stream_h as *mut _) else {
        blas_error(WHAT, "the handle's stream no longer exists".into());
        return EXECUTION_FAILED;
    };
    if alpha.is_null() || beta.is_null() {
        blas_error(WHAT, "alpha or beta is a null pointer".into());
        return INVALID_VALUE;
    }
    let (host_alpha, host_beta) = if device_pointers {
        (0.0, 0.0)
    } else {
        (*(alpha as *const f32), *(beta as *const f32))
    };
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let (lda, ldb, ldc) = (lda as usize, ldb as usize, ldc as usize);
    let extent = |rows: c_int, cols: c_int, ld: usize| {
        if rows <= 0 || cols <= 0 {
            0
        } else {
            (cols as usize - 1) * ld + rows as usize
        }
    };
    let ext_a = extent(rows_a, cols_a, lda);
    let ext_b = extent(rows_b, cols_b, ldb);
    let ext_c = extent(m as c_int, n as c_int, ldc);
    let (pa, pb, pc) = (a as usize, b as usize, c as usize);
    let (pal, pbe) = (alpha as usize, beta as usize);
    let (ta, tb) = (trans(transa), trans(transb));
    Counters::add(&s.counters.cublas_calls, 1);
    stream.submit(Box::new(move || {
        use cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS;
        {
            let mem = s.mem.lock().unwrap();
            for (name, p, len) in [("A", pa, ext_a * sa), ("B", pb, ext_b * sb), ("C", pc, ext_c * sc)] {
                if len > 0 && mem.find(p, len).is_none() {
                    return Err((
                        CUDA_ERROR_ILLEGAL_ADDRESS,
                        format!("memcheck: cublasGemmEx ({m}x{n}x{k}): operand {name} ({len} bytes at 0x{p:x}) is not inside one allocation (0x{p:x} is {})", mem.describe(p)),
                    ));
                }
            }
        }
        let (al, be) = if device_pointers { (*(pal as *const f32), *(pbe as *const f32)) } else { (host_alpha, host_beta) };
        if m == 0 || n == 0 || !s.cfg.execute {
            return Ok(());
        }
        // op(A)[i, l] and op(B)[l, j] as f32, column-major m x k and k x n.
        let mut fa = vec![0f32; m * k];
        let mut fb = vec![0f32; k * n];
        for l in 0..k {
            for i in 0..m {
                fa[i + l * m] = load(pa, atype, if ta { l + i * lda } else { i + l * lda });
            }
        }
        for j in 0..n {
            for l in 0..k {
                fb[l + j * k] = load(pb, btype, if tb { j + l * ldb } else { l + j * ldb });
            }
        }
        let mut fc = vec![0f32; m * n];
        if be != 0.0 {
            for j in 0..n {
                for i in 0..m {
                    fc[i + j * m] = load(pc, ctype, i + j * ldc);
                }
            }
        }
        if k > 0 {
            // gemm's convention: dst = alpha·dst + beta·lhs·rhs.
            gemm::gemm(
                m,
                n,
                k,
                fc.as_mut_ptr(),
                m as isize,
                1,
                be != 0.0,
                fa.as_ptr(),
                m as isize,
                1,
                fb.as_ptr(),
                k as isize,
                1,
                be,
                al,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        } else {
            for x in &mut fc {
                *x *= be;
            }
        }
        for j in 0..n {
            for i in 0..m {
                store(pc, ctype, i + j * ldc, fc[i + j * m]);
            }
        }
        Ok(())
    }));
    SUCCESS
}
