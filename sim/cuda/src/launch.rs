//! `cuLaunchKernel`: the checks a real driver makes (block and grid limits, dynamic shared memory
//! against the function's `MAX_DYNAMIC_SHARED_SIZE_BYTES`, registers per block), then the
//! parameters read from `kernelParams` by the parameter list of the loaded image (offset and size
//! of each, as the driver copies them at launch time) and compared with the host build's
//! declaration; pointer parameters must point into live device memory (memcheck). The launch then
//! runs on the stream's worker: the engine executes the kernel's host build, a fault becomes the
//! context's sticky error with a report naming the kernel, the thread and the memory.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use cudarc::driver::sys::{CUresult, CUstream};

use crate::counters::Counters;
use crate::driver::{fail, stream, Fail, Function, Sim, R};
use crate::ffi::{self, Fault, Launch, Options, PARAM_POINTER};
use crate::module::Entry;

use CUresult::*;

/// Reads `len` bytes at `addr` of this process without faulting (an unreadable address is an
/// error): kernelParams and the parameters it points to come from the caller and may be wrong.
fn safe_read(addr: usize, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Some(buf);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: len,
    };
    // SAFETY: process_vm_readv on our own pid reads into `buf` and reports bad addresses as an
    // error instead of a fault.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == len as isize).then_some(buf)
}

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return "?".into();
    }
    // SAFETY: static strings of the kernel tables.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The parameter `i`'s name in the kernel's source, for messages.
fn param_name(f: &Function, i: usize) -> String {
    let d = f.desc;
    if (i as u32) < d.n_params {
        // SAFETY: `names` has n_params entries.
        let n = cstr(unsafe { *d.names.add(i) });
        format!("parameter {i} (`{n}`)")
    } else {
        format!("parameter {i}")
    }
}

/// Blocks of `e` with `threads` threads and `smem` bytes that fit on one SM of the device.
pub fn occupancy(s: &Sim, e: &Entry, threads: usize, smem: usize) -> usize {
    let l = &s.cfg.limits;
    let warps = threads.div_ceil(32);
    let by_threads = l.threads_per_sm / (warps * 32).max(1);
    let by_regs = if e.registers > 0 {
        let per_warp = (e.registers * 32).div_ceil(256) * 256;
        l.regs_per_sm / (per_warp * warps).max(1)
    } else {
        usize::MAX
    };
    let per_block_smem = smem + e.static_smem + 1024; // 1 KB reserved per block
    let by_smem = l.smem_per_sm / per_block_smem.max(1);
    by_threads.min(by_regs).min(by_smem).min(l.blocks_per_sm)
}

#[allow(clippy::too_many_arguments)]
pub fn launch(
    s: &'static Sim,
    f: &Arc<Function>,
    grid: [u32; 3],
    block: [u32; 3],
    smem: usize,
    h: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> R {
    let e = &f.entry;
    let name = &e.name;
    let threads = block.iter().map(|&x| x as usize).product::<usize>();
    if grid.contains(&0) || block.contains(&0) {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "launch of {name}: a grid or block dimension is 0 (grid {grid:?}, block {block:?})"
            ),
        );
    }
    if block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > 1024 {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("launch of {name}: block {block:?} ({threads} threads) is over the limits (1024 threads, 1024 x 1024 x 64)"),
        );
    }
    if grid[1] > 65535 || grid[2] > 65535 || grid[0] > i32::MAX as u32 {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("launch of {name}: grid {grid:?} is over the limits (2^31-1 x 65535 x 65535)"),
        );
    }
    if e.max_threads > 0 && threads > e.max_threads {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "launch of {name}: {threads} threads per block, its __launch_bounds__ allow {}",
                e.max_threads
            ),
        );
    }
    let max_dynamic = *f.max_dynamic_smem.lock().unwrap();
    if smem > max_dynamic {
        let l = &s.cfg.limits;
        let how = if smem + e.static_smem <= l.smem_optin {
            format!(
                "; set cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) first (up to {})",
                l.smem_optin - e.static_smem
            )
        } else {
            format!(
                "; sm_{}{} has at most {} bytes per block",
                l.major, l.minor, l.smem_optin
            )
        };
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("launch of {name} with {smem} bytes of dynamic shared memory: the function allows {max_dynamic}{how}"),
        );
    }
    if e.registers > 0 {
        let l = &s.cfg.limits;
        let per_warp = (e.registers * 32).div_ceil(256) * 256;
        let need = per_warp * threads.div_ceil(32);
        if need > l.regs_per_block || e.registers > l.max_regs_per_thread {
            return fail(
                CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                format!("launch of {name}: {threads} threads x {} registers need {need} registers, a block has {}", e.registers, l.regs_per_block),
            );
        }
    }

    // The parameters, as the image lays them out.
    let d = f.desc;
    if e.params.len() != d.n_params as usize {
        return fail(
            CUDA_ERROR_INVALID_IMAGE,
            format!(
                "{name}: the loaded image declares {} parameters, the simulator's host build {} (the module and sim/cuda were built from different sources)",
                e.params.len(),
                d.n_params
            ),
        );
    }
    let mut values: Vec<Vec<u8>> = Vec::with_capacity(e.params.len());
    if params.is_null() {
        let buf = read_extra(name, extra)?;
        for (i, p) in e.params.iter().enumerate() {
            let v = buf.get(p.offset..p.offset + p.size).ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_VALUE,
                msg: format!(
                    "launch of {name}: the `extra` buffer of {} bytes ends before {}",
                    buf.len(),
                    param_name(f, i)
                ),
            })?;
            values.push(v.to_vec());
        }
    } else if !e.params.is_empty() {
        let slots = safe_read(params as usize, 8 * e.params.len()).ok_or_else(|| Fail {
            code: CUDA_ERROR_INVALID_VALUE,
            msg: format!("launch of {name}: kernelParams ({params:p}) is not a readable array of {} pointers", e.params.len()),
        })?;
        for (i, p) in e.params.iter().enumerate() {
            let at = usize::from_le_bytes(slots[8 * i..8 * i + 8].try_into().unwrap());
            let v = safe_read(at, p.size).ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_VALUE,
                msg: format!(
                    "launch of {name}: kernelParams[{i}] = 0x{at:x} is not a readable {}-byte {} (the launch passed fewer arguments than the kernel's {}?)",
                    p.size,
                    param_name(f, i),
                    e.params.len()
                ),
            })?;
            values.push(v);
        }
    }
    let mut pointers = Vec::new();
    for (i, v) in values.iter().enumerate() {
        // SAFETY: i < n_params.
        let (size, kind) = unsafe { (*d.sizes.add(i) as usize, *d.kinds.add(i)) };
        if size != v.len() {
            return fail(
                CUDA_ERROR_INVALID_IMAGE,
                format!(
                    "{name}: {} is {} bytes in the image and {size} in the host build",
                    param_name(f, i),
                    v.len()
                ),
            );
        }
        if kind == PARAM_POINTER {
            let p = usize::from_le_bytes(v[..8].try_into().unwrap());
            if p != 0 {
                if s.cfg.tools.memcheck {
                    let m = s.mem.lock().unwrap();
                    if m.find_pointer(p).is_none() {
                        return fail(
                            CUDA_ERROR_INVALID_VALUE,
                            format!(
                                "launch of {name}: {} = 0x{p:x} is not a device pointer ({}); a wrong or missing argument?",
                                param_name(f, i),
                                m.describe(p)
                            ),
                        );
                    }
                }
                pointers.push(p);
            }
        }
    }
    let st = stream(s, h)?;
    Counters::add(&s.counters.launches, 1);
    if crate::graph::capture_launch(h, f, grid, block, smem, &values) {
        return Ok(());
    }
    let job = kernel_job(s, Arc::clone(f), grid, block, smem, values, pointers);
    st.submit(job);
    Ok(())
}

/// The work of one launch on a stream (also replayed by CUDA graphs).
pub fn kernel_job(
    s: &'static Sim,
    f: Arc<Function>,
    grid: [u32; 3],
    block: [u32; 3],
    smem: usize,
    values: Vec<Vec<u8>>,
    pointers: Vec<usize>,
) -> crate::stream::Job {
    Box::new(move || run(s, &f, grid, block, smem, &values, &pointers))
}

fn run(
    s: &Sim,
    f: &Function,
    grid: [u32; 3],
    block: [u32; 3],
    smem: usize,
    values: &[Vec<u8>],
    pointers: &[usize],
) -> Result<(), (CUresult, String)> {
    if !s.cfg.execute {
        return Ok(());
    }
    // Each parameter in storage of its own, 16-byte aligned, as the trampoline reads it.
    let mut storage: Vec<Vec<u128>> = values
        .iter()
        .map(|v| {
            let mut b = vec![0u128; v.len().div_ceil(16).max(1)];
            // SAFETY: the buffer holds at least v.len() bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), b.as_mut_ptr().cast::<u8>(), v.len())
            };
            b
        })
        .collect();
    let args: Vec<*mut c_void> = storage.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
    let cfg = &s.cfg;
    let launch = Launch {
        kernel: f.desc,
        grid,
        block,
        smem_bytes: smem as u64,
        args: args.as_ptr(),
        options: Options {
            hazards: cfg.tools.hazards as u32,
            slots: cfg.slots,
            jitter: cfg.jitter,
            seed: cfg.seed,
            shuffle: cfg.shuffle as u32,
            hang_seconds: 0,
        },
    };
    // SAFETY: a zeroed fault is a valid value of the C struct.
    let mut fault: Fault = unsafe { std::mem::zeroed() };
    let t0 = std::time::Instant::now();
    // SAFETY: the launch points at live parameter storage and a kernel of the static table.
    let rc = unsafe { ffi::ptsim_run(&launch, &mut fault) };
    if cfg.profile {
        profile(&f.entry.name, t0.elapsed().as_secs_f64());
    }
    if rc != 0 {
        let mut msg = unsafe { CStr::from_ptr(fault.message.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        if fault.address != 0 {
            let m = s.mem.lock().unwrap();
            msg.push_str(&format!(
                " (0x{:x} is {})",
                fault.address,
                m.describe(fault.address as usize)
            ));
        }
        let code = match fault.kind {
            ffi::FAULT_ILLEGAL_ADDRESS => CUDA_ERROR_ILLEGAL_ADDRESS,
            ffi::FAULT_MISALIGNED => CUDA_ERROR_MISALIGNED_ADDRESS,
            ffi::FAULT_SYNC | ffi::FAULT_HAZARD => CUDA_ERROR_LAUNCH_FAILED,
            ffi::FAULT_HANG => CUDA_ERROR_LAUNCH_TIMEOUT,
            ffi::FAULT_TRAP => CUDA_ERROR_ILLEGAL_INSTRUCTION,
            _ => CUDA_ERROR_UNKNOWN,
        };
        let kind = match fault.kind {
            ffi::FAULT_SYNC => "synccheck",
            ffi::FAULT_HAZARD => "racecheck",
            ffi::FAULT_ILLEGAL_ADDRESS | ffi::FAULT_MISALIGNED => "memcheck",
            _ => "error",
        };
        return Err((code, format!("{kind}: {msg}")));
    }
    if cfg.tools.memcheck {
        let damage = s.mem.lock().unwrap().check_red_zones(pointers);
        if let Some(d) = damage.first() {
            return Err((
                CUDA_ERROR_ILLEGAL_ADDRESS,
                format!("memcheck: kernel {}: {d}", f.entry.name),
            ));
        }
    }
    Ok(())
}

/// The packed parameter buffer of `extra` (`CU_LAUNCH_PARAM_BUFFER_POINTER`, `..._SIZE`, `..._END`).
fn read_extra(name: &str, extra: *mut *mut c_void) -> Result<Vec<u8>, Fail> {
    if extra.is_null() {
        return Ok(Vec::new());
    }
    let (mut buf, mut size) = (0usize, None::<usize>);
    let word = |i: usize| -> Result<usize, Fail> {
        safe_read(extra as usize + 8 * i, 8)
            .map(|w| usize::from_le_bytes(w.try_into().unwrap()))
            .ok_or_else(|| Fail {
                code: CUDA_ERROR_INVALID_VALUE,
                msg: format!("launch of {name}: `extra` is not readable"),
            })
    };
    // (key, value) pairs up to CU_LAUNCH_PARAM_END (0): 1 = buffer pointer, 2 = pointer to size.
    let mut i = 0;
    while i < 32 {
        let key = word(i)?;
        if key == 0 {
            break;
        }
        let v = word(i + 1)?;
        match key {
            1 => buf = v,
            2 => size = safe_read(v, 8).map(|b| usize::from_le_bytes(b.try_into().unwrap())),
            _ => {}
        }
        i += 2;
    }
    let size = size.ok_or_else(|| Fail {
        code: CUDA_ERROR_INVALID_VALUE,
        msg: format!("launch of {name}: `extra` has no CU_LAUNCH_PARAM_BUFFER_SIZE"),
    })?;
    safe_read(buf, size).ok_or_else(|| Fail {
        code: CUDA_ERROR_INVALID_VALUE,
        msg: format!("launch of {name}: the `extra` parameter buffer is not readable"),
    })
}

/// `PTSIM_PROFILE=1`: host time per kernel, printed when the process exits.
static PROFILE: std::sync::Mutex<Vec<(String, u64, f64)>> = std::sync::Mutex::new(Vec::new());

fn profile(name: &str, secs: f64) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        extern "C" fn report() {
            let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner()).clone();
            p.sort_by(|a, b| b.2.total_cmp(&a.2));
            let total: f64 = p.iter().map(|x| x.2).sum();
            eprintln!("prefix-tune simulator profile: {total:.2} s in kernels (host time)");
            for (name, n, t) in p.iter().take(25) {
                eprintln!(
                    "  {t:9.3} s {:5.1}% {n:8} launches  {name}",
                    100.0 * t / total.max(1e-12)
                );
            }
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(report) };
    });
    let mut p = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
    match p.iter_mut().find(|x| x.0 == name) {
        Some(x) => {
            x.1 += 1;
            x.2 += secs;
        }
        None => p.push((name.to_string(), 1, secs)),
    }
}
