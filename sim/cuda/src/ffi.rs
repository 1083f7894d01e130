//! The C interface of the launch engine and the kernel tables (`kernels/host/sim_abi.h`), as Rust
//! declarations.

use std::ffi::{c_char, c_void};

pub const PARAM_POINTER: u8 = 1;

#[repr(C)]
pub struct KernelDesc {
    pub name: *const c_char,
    pub family: *const c_char,
    pub tramp: unsafe extern "C" fn(*const *mut c_void),
    pub n_params: u32,
    pub sizes: *const u32,
    pub aligns: *const u32,
    pub kinds: *const u8,
    pub names: *const *const c_char,
}

// The tables are static data of the C++ side, never written.
unsafe impl Sync for KernelDesc {}
unsafe impl Send for KernelDesc {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub hazards: u32,
    pub slots: u32,
    pub jitter: u32,
    pub seed: u64,
    pub shuffle: u32,
    pub hang_seconds: u32,
}

#[repr(C)]
pub struct Launch {
    pub kernel: *const KernelDesc,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem_bytes: u64,
    pub args: *const *mut c_void,
    pub options: Options,
}

#[repr(C)]
pub struct Fault {
    pub kind: i32,
    pub address: u64,
    pub is_write: i32,
    pub block: [u32; 3],
    pub thread: [u32; 3],
    pub message: [c_char; 4096],
}

pub const FAULT_ILLEGAL_ADDRESS: i32 = 1;
pub const FAULT_MISALIGNED: i32 = 2;
pub const FAULT_SYNC: i32 = 3;
pub const FAULT_HAZARD: i32 = 4;
pub const FAULT_HANG: i32 = 5;
pub const FAULT_TRAP: i32 = 6;

extern "C" {
    pub fn ptsim_run(launch: *const Launch, fault: *mut Fault) -> i32;
    pub fn ptsim_set_mutations(skip_barrier: *const c_char, wait_group: *const c_char);
    pub fn ptsim_ldmatrix_bank_conflicts() -> u64;
    pub fn ptsim_kernels(count: *mut u32) -> *const KernelDesc;
}
