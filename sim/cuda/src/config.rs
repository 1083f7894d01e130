//! What the simulated device is and which checks run, from the environment (read once, when the
//! driver is first used):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PTSIM_ARCH` | `sm_90` | `sm_80` (A100), `sm_86`, `sm_89` or `sm_90` (H100): attributes and limits |
//! | `PTSIM_MEMORY_MIB` | 81559 | device memory (total and the allocation limit) |
//! | `PTSIM_SM_COUNT` | the architecture's | multiprocessors reported (a small count makes grid-stride launches small, so their stride loops run) |
//! | `PTSIM_DRIVER_VERSION` | 13000 | the driver's CUDA version (`12080` refuses CUDA 13 images) |
//! | `PTSIM_TOOLS` | `memcheck,initcheck,synccheck,hazards` | checks (`none` for none); memcheck = bounds, red zones, pointer parameters; initcheck = poisoned memory; synccheck/hazards see `kernels/host/sim_shim.h` |
//! | `PTSIM_SCHEDULE` | `slots=1` | `slots=N` blocks at once, `jitter=P` (per mille of barriers that yield), `shuffle` (random block order), `seed=S` |
//! | `PTSIM_SKIP_BARRIER`, `PTSIM_WAIT_GROUP` | | mutation tests: `file:line` of a `__syncthreads` to skip; `file:line:delta` of a `cp.async.wait_group` |
//! | `PTSIM_QUIET` | | `1`: do not print kernel faults to stderr |
//! | `PTSIM_PROFILE` | | `1`: print the host time spent per kernel at exit |
//! | `PTSIM_EXECUTE` | `1` | `0`: count only — launches and cuBLAS calls are checked and counted but not run (memory stays zero), so the exact counts of a full-size workload come in seconds |

use std::env;

/// The architectures the simulator can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Sm80,
    Sm86,
    Sm89,
    Sm90,
}

/// One architecture's figures (the attributes the driver reports and the limits it enforces).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub name: &'static str,
    pub major: i32,
    pub minor: i32,
    pub sm_count: i32,
    /// Dynamic + static shared memory per block without the opt-in attribute.
    pub smem_default: usize,
    /// The most a block may opt in to (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    pub smem_optin: usize,
    pub smem_per_sm: usize,
    pub regs_per_sm: usize,
    pub regs_per_block: usize,
    pub max_regs_per_thread: usize,
    pub threads_per_sm: usize,
    pub blocks_per_sm: usize,
    pub l2_bytes: usize,
    pub clock_khz: i32,
    pub memory_clock_khz: i32,
    pub bus_width: i32,
}

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        match s.trim().trim_start_matches("sm_").trim_start_matches("sm") {
            "80" => Some(Arch::Sm80),
            "86" => Some(Arch::Sm86),
            "89" => Some(Arch::Sm89),
            "90" | "90a" => Some(Arch::Sm90),
            _ => None,
        }
    }

    pub fn limits(self) -> Limits {
        match self {
            Arch::Sm80 => Limits {
                name: "NVIDIA A100-SXM4-80GB (prefix-tune simulator)",
                major: 8,
                minor: 0,
                sm_count: 108,
                smem_default: 48 * 1024,
                smem_optin: 166_912,
                smem_per_sm: 167_936,
                regs_per_sm: 65_536,
                regs_per_block: 65_536,
                max_regs_per_thread: 255,
                threads_per_sm: 2048,
                blocks_per_sm: 32,
                l2_bytes: 40 << 20,
                clock_khz: 1_410_000,
                memory_clock_khz: 1_593_000,
                bus_width: 5120,
            },
            Arch::Sm86 => Limits {
                name: "NVIDIA RTX A6000 (prefix-tune simulator)",
                major: 8,
                minor: 6,
                sm_count: 84,
                smem_default: 48 * 1024,
                smem_optin: 101_376,
                smem_per_sm: 102_400,
                regs_per_sm: 65_536,
                regs_per_block: 65_536,
                max_regs_per_thread: 255,
                threads_per_sm: 1536,
                blocks_per_sm: 16,
                l2_bytes: 6 << 20,
                clock_khz: 1_800_000,
                memory_clock_khz: 8_001_000,
                bus_width: 384,
            },
            Arch::Sm89 => Limits {
                name: "NVIDIA L40S (prefix-tune simulator)",
                major: 8,
                minor: 9,
                sm_count: 142,
                smem_default: 48 * 1024,
                smem_optin: 101_376,
                smem_per_sm: 102_400,
                regs_per_sm: 65_536,
                regs_per_block: 65_536,
                max_regs_per_thread: 255,
                threads_per_sm: 1536,
                blocks_per_sm: 24,
                l2_bytes: 96 << 20,
                clock_khz: 2_520_000,
                memory_clock_khz: 9_001_000,
                bus_width: 384,
            },
            Arch::Sm90 => Limits {
                name: "NVIDIA H100 80GB HBM3 (prefix-tune simulator)",
                major: 9,
                minor: 0,
                sm_count: 132,
                smem_default: 48 * 1024,
                smem_optin: 232_448,
                smem_per_sm: 233_472,
                regs_per_sm: 65_536,
                regs_per_block: 65_536,
                max_regs_per_thread: 255,
                threads_per_sm: 2048,
                blocks_per_sm: 32,
                l2_bytes: 50 << 20,
                clock_khz: 1_980_000,
                memory_clock_khz: 2_619_000,
                bus_width: 5120,
            },
        }
    }
}

/// Which of compute-sanitizer's tools run.
#[derive(Clone, Copy, Debug)]
pub struct Tools {
    pub memcheck: bool,
    pub initcheck: bool,
    pub synccheck: bool,
    pub hazards: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub limits: Limits,
    pub memory_bytes: usize,
    pub driver_version: i32,
    pub tools: Tools,
    pub slots: u32,
    pub jitter: u32,
    pub shuffle: bool,
    pub seed: u64,
    pub skip_barrier: String,
    pub wait_group: String,
    pub quiet: bool,
    pub profile: bool,
    pub execute: bool,
}

/// A configuration value that cannot be read is an error the user must see: the driver refuses to
/// initialise (`cuInit` fails) and says why.
pub fn from_env() -> Result<Config, String> {
    let arch = match env::var("PTSIM_ARCH") {
        Ok(v) if !v.is_empty() => Arch::parse(&v)
            .ok_or_else(|| format!("PTSIM_ARCH={v:?}: expected sm_80, sm_86, sm_89 or sm_90"))?,
        _ => Arch::Sm90,
    };
    let memory_mib: usize = match env::var("PTSIM_MEMORY_MIB") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| format!("PTSIM_MEMORY_MIB={v:?}: expected a number of MiB"))?,
        _ => 81_559,
    };
    let mut limits = arch.limits();
    if let Ok(v) = env::var("PTSIM_SM_COUNT") {
        if !v.is_empty() {
            limits.sm_count = v
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("PTSIM_SM_COUNT={v:?}: expected a positive number"))?;
        }
    }
    let driver_version: i32 = match env::var("PTSIM_DRIVER_VERSION") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| format!("PTSIM_DRIVER_VERSION={v:?}: expected e.g. 12080 or 13000"))?,
        _ => 13000,
    };
    let mut tools = Tools {
        memcheck: true,
        initcheck: true,
        synccheck: true,
        hazards: true,
    };
    if let Ok(v) = env::var("PTSIM_TOOLS") {
        if !v.is_empty() {
            tools = Tools {
                memcheck: false,
                initcheck: false,
                synccheck: false,
                hazards: false,
            };
            for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match t {
                    "memcheck" => tools.memcheck = true,
                    "initcheck" => tools.initcheck = true,
                    "synccheck" => tools.synccheck = true,
                    "hazards" | "racecheck" => tools.hazards = true,
                    "none" => {}
                    other => {
                        return Err(format!(
                            "PTSIM_TOOLS: unknown tool {other:?} (memcheck, initcheck, synccheck, hazards, none)"
                        ))
                    }
                }
            }
        }
    }
    let (mut slots, mut jitter, mut shuffle, mut seed) = (1u32, 0u32, false, 0u64);
    if let Ok(v) = env::var("PTSIM_SCHEDULE") {
        for item in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, val) = item.split_once('=').unwrap_or((item, ""));
            let num = |what: &str| -> Result<u64, String> {
                val.parse()
                    .map_err(|_| format!("PTSIM_SCHEDULE: {what}={val:?} is not a number"))
            };
            match k {
                "slots" => slots = num("slots")?.clamp(1, 64) as u32,
                "jitter" => jitter = num("jitter")?.min(1000) as u32,
                "shuffle" => shuffle = val.is_empty() || val == "1",
                "seed" => seed = num("seed")?,
                other => {
                    return Err(format!(
                    "PTSIM_SCHEDULE: unknown item {other:?} (slots=N, jitter=P, shuffle, seed=S)"
                ))
                }
            }
        }
    }
    Ok(Config {
        arch,
        limits,
        memory_bytes: memory_mib << 20,
        driver_version,
        tools,
        slots,
        jitter,
        shuffle,
        seed,
        skip_barrier: env::var("PTSIM_SKIP_BARRIER").unwrap_or_default(),
        wait_group: env::var("PTSIM_WAIT_GROUP").unwrap_or_default(),
        quiet: env::var("PTSIM_QUIET").is_ok_and(|v| v == "1"),
        profile: env::var("PTSIM_PROFILE").is_ok_and(|v| v == "1"),
        execute: !env::var("PTSIM_EXECUTE").is_ok_and(|v| v == "0"),
    })
}
