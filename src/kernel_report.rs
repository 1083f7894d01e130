//! The static kernel report: what a kernel costs, read from its compiled code (no GPU needed).
//!
//! For every attention kernel configuration the crate ships (and, through
//! `examples/kernel_report.rs`, for any other cubin such as FlashAttention-2's) it gives
//! - registers, stack and shared memory per CTA, and the theoretical occupancy (CTAs and warps
//!   per SM) on sm_80 (A100) and sm_90 (H100/H200), from the limits in [`Arch`];
//! - the SASS of the kernel's **main loop** (disassembled with NVIDIA's `nvdisasm`): issue slots
//!   per HMMA, shared-memory bytes read and written per HMMA, barriers per tile, and a breakdown
//!   of the instructions by kind.
//!
//! Definitions (the same for our kernels and for the anchors they are compared with):
//! - a *loop* is the static instruction range from a branch target to a backward branch to it;
//!   instructions are counted once each (an inner loop that was not unrolled counts once);
//! - the *main loop* is the loop with the most HMMA instructions, the cheapest (fewest issue
//!   slots) of those on a tie: the steady-state tile loop of a kernel whose masked tiles have
//!   a loop of their own;
//! - *issue slots* are the loop's instructions other than ptxas' padding (NOP, and `@!PT`
//!   instructions, which never execute), one issue slot each;
//! - *smem read bytes* are what the warp's LDSM (128 B per 8×8 matrix) and LDS (32 lanes ×
//!   width) instructions read; *smem write bytes* what STS, STSM and LDGSTS (cp.async, 32 lanes
//!   × width) write; both per HMMA of the loop (an m16n8k16 HMMA is 4096 FLOPs);
//! - *barriers per tile* are the loop's BAR instructions times (HMMA per tile / HMMA in the
//!   loop), with the HMMA per tile of the configuration (what one K/V or query tile costs a warp).
//!
//! sm_90 figures come from the sm_90 cubin embedded in the binary; sm_80 figures from the
//! embedded compute_80 PTX compiled by `ptxas -arch=sm_80` (what the driver's JIT does on an
//! A100, up to the driver's ptxas version).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

// ---------------------------------------------------------------------------------------------
// SASS (nvdisasm output).

/// One SASS instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instr {
    /// Byte offset in the function.
    pub addr: u32,
    /// The guard predicate (`P0`, `!P1`), if any.
    pub pred: Option<String>,
    /// The opcode with its modifiers, e.g. `HMMA.16816.F32`.
    pub op: String,
    /// The operands as written.
    pub operands: String,
}

impl Instr {
    /// The opcode without modifiers, e.g. `HMMA`.
    pub fn base(&self) -> &str {
        self.op.split('.').next().unwrap_or("")
    }
    fn has_mod(&self, m: &str) -> bool {
        self.op.split('.').skip(1).any(|x| x == m)
    }
    /// The label a branch jumps to.
    pub fn branch_target(&self) -> Option<&str> {
        if !matches!(self.base(), "BRA" | "BRX" | "JMP") {
            return None;
        }
        let start = self.operands.find("`(")? + 2;
        let end = start + self.operands[start..].find(')')?;
        Some(&self.operands[start..end])
    }
}

/// The SASS of one function.
#[derive(Clone, Debug, Default)]
pub struct SassFunction {
    pub name: String,
    pub instrs: Vec<Instr>,
    /// Label → index of the instruction it marks.
    pub labels: BTreeMap<String, usize>,
}

/// Parses `nvdisasm -c` output: one [`SassFunction`] per `.text.<name>` section.
pub fn parse_nvdisasm(text: &str) -> Vec<SassFunction> {
    let mut out: Vec<SassFunction> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".section") {
            let rest = rest.trim();
            if let Some(name) = rest.strip_prefix(".text.") {
                let name = name.split(',').next().unwrap_or("").trim();
                out.push(SassFunction {
                    name: name.to_string(),
                    ..Default::default()
                });
            }
            continue;
        }
        let Some(f) = out.last_mut() else { continue };
        if let Some(label) = t.strip_suffix(':') {
            if label.starts_with(".L") {
                f.labels.insert(label.to_string(), f.instrs.len());
            }
            continue;
        }
        // `/*0190*/  @!P0 BRA `(.L_x_1) ;`
        let Some(rest) = t.strip_prefix("/*") else {
            continue;
        };
        let Some(close) = rest.find("*/") else {
            continue;
        };
        let Ok(addr) = u32::from_str_radix(rest[..close].trim(), 16) else {
            continue;
        };
        let body = rest[close + 2..].trim();
        let body = body.split(';').next().unwrap_or("").trim();
        if body.is_empty() {
            continue;
        }
        let mut words = body.splitn(2, char::is_whitespace);
        let mut first = words.next().unwrap_or("");
        let mut rest = words.next().unwrap_or("").trim();
        let mut pred = None;
        if let Some(p) = first.strip_prefix('@') {
            pred = Some(p.to_string());
            let mut w = rest.splitn(2, char::is_whitespace);
            first = w.next().unwrap_or("");
            rest = w.next().unwrap_or("").trim();
        }
        f.instrs.push(Instr {
            addr,
            pred,
            op: first.to_string(),
            operands: rest.to_string(),
        });
    }
    out
}

/// Instruction counts and shared-memory traffic of a range of SASS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Mix {
    /// Instructions other than NOP.
    pub issue_slots: u32,
    pub hmma: u32,
    /// LDSM instructions and the bytes they read (per warp).
    pub ldsm: u32,
    pub ldsm_bytes: u32,
    /// LDS instructions and bytes.
    pub lds: u32,
    pub lds_bytes: u32,
    /// STS / STSM instructions and bytes.
    pub sts: u32,
    pub sts_bytes: u32,
    /// LDGSTS (cp.async) instructions and the shared-memory bytes they write.
    pub ldgsts: u32,
    pub ldgsts_bytes: u32,
    /// Local-memory loads and stores (register spills).
    pub local: u32,
    /// Global loads / stores / reductions (atomics).
    pub ldg: u32,
    pub stg: u32,
    pub red: u32,
    pub bar: u32,
    /// MUFU.EX2 (the exponential).
    pub ex2: u32,
    /// Other MUFU (RCP, LG2, ...).
    pub mufu_other: u32,
    pub shfl: u32,
    /// FFMA, FMUL, FADD, FMNMX, FSEL, FSETP, F2FP, HADD2, HMUL2 ...
    pub fp: u32,
    /// IMAD, IADD3, LEA, SHF, LOP3, ISETP, MOV, SEL, ...
    pub int: u32,
    /// Branches, barriers' companions (DEPBAR), everything else.
    pub other: u32,
}

/// Per-lane access width in bytes from an LD/ST opcode's modifiers (32-bit by default).
fn access_width(i: &Instr) -> u32 {
    for (m, w) in [
        ("128", 16),
        ("64", 8),
        ("U16", 2),
        ("S16", 2),
        ("U8", 1),
        ("S8", 1),
    ] {
        if i.has_mod(m) {
            return w;
        }
    }
    4
}

/// Matrices moved by an LDSM/STSM (`.4` → 4, `.2` → 2, else 1).
fn matrices(i: &Instr) -> u32 {
    if i.has_mod("4") {
        4
    } else if i.has_mod("2") {
        2
    } else {
        1
    }
}

impl Mix {
    pub fn of(instrs: &[Instr]) -> Mix {
        let mut m = Mix::default();
        for i in instrs {
            let base = i.base();
            // NOP and never-executed `@!PT` instructions are ptxas' alignment padding.
            if base == "NOP" || i.pred.as_deref() == Some("!PT") {
                continue;
            }
            m.issue_slots += 1;
            match base {
                "HMMA" => m.hmma += 1,
                "LDSM" => {
                    m.ldsm += 1;
                    m.ldsm_bytes += 128 * matrices(i);
                }
                "LDS" => {
                    m.lds += 1;
                    m.lds_bytes += 32 * access_width(i);
                }
                "STS" => {
                    m.sts += 1;
                    m.sts_bytes += 32 * access_width(i);
                }
                "STSM" => {
                    m.sts += 1;
                    m.sts_bytes += 128 * matrices(i);
                }
                "LDGSTS" => {
                    m.ldgsts += 1;
                    m.ldgsts_bytes += 32 * access_width(i);
                }
                "LDL" | "STL" => m.local += 1,
                "LDG" | "LD" => m.ldg += 1,
                "STG" | "ST" => m.stg += 1,
                "RED" | "REDG" | "ATOM" | "ATOMG" | "ATOMS" | "REDAS" => m.red += 1,
                "BAR" => m.bar += 1,
                "MUFU" if i.has_mod("EX2") => m.ex2 += 1,
                "MUFU" => m.mufu_other += 1,
                "SHFL" => m.shfl += 1,
                "FFMA" | "FMUL" | "FADD" | "FMNMX" | "FSEL" | "FSETP" | "FSET" | "F2FP" | "F2F"
                | "FCHK" | "FRND" | "HADD2" | "HMUL2" | "HFMA2" | "HMNMX2" | "HSETP2"
                | "FSWZADD" => m.fp += 1,
                "IMAD" | "IADD3" | "IADD" | "LEA" | "SHF" | "SHL" | "SHR" | "LOP3" | "ISETP"
                | "MOV" | "SEL" | "IABS" | "IMNMX" | "VIMNMX" | "VIADD" | "VIADDMNMX"
                | "VIMNMX3" | "PRMT" | "I2F" | "F2I" | "S2R" | "CS2R" | "S2UR" | "UIADD3"
                | "UMOV" | "ULDC" | "ULEA" | "USHF" | "ULOP3" | "UIMAD" | "UISETP" | "USEL"
                | "R2UR" | "PLOP3" | "P2R" | "R2P" | "IMNMX2" | "POPC" | "FLO" | "BREV" | "IDP"
                | "I2FP" | "F2IP" | "UPRMT" | "USETMAXREG" => m.int += 1,
                _ => m.other += 1,
            }
        }
        m
    }

    fn per_hmma(&self, x: u32) -> Option<f64> {
        (self.hmma > 0).then(|| x as f64 / self.hmma as f64)
    }
    /// Issue slots per HMMA.
    pub fn slots_per_hmma(&self) -> Option<f64> {
        self.per_hmma(self.issue_slots)
    }
    /// Shared-memory bytes read (LDSM + LDS) per HMMA.
    pub fn smem_read_per_hmma(&self) -> Option<f64> {
        self.per_hmma(self.ldsm_bytes + self.lds_bytes)
    }
    /// Shared-memory bytes written (STS/STSM + LDGSTS) per HMMA.
    pub fn smem_write_per_hmma(&self) -> Option<f64> {
        self.per_hmma(self.sts_bytes + self.ldgsts_bytes)
    }
}

/// One loop of a function: instruction indices `start..=end` (`end` the backward branch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Loop {
    pub start: usize,
    pub end: usize,
    pub mix: Mix,
}

/// Every loop of `f` (a label with a backward branch to it; the last such branch closes it).
/// Single-instruction loops (the `BRA` to itself after `EXIT`) are left out.
pub fn loops(f: &SassFunction) -> Vec<Loop> {
    let mut close: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, ins) in f.instrs.iter().enumerate() {
        if let Some(&t) = ins.branch_target().and_then(|l| f.labels.get(l)) {
            if t < i {
                let e = close.entry(t).or_insert(i);
                *e = (*e).max(i);
            }
        }
    }
    close
        .into_iter()
        .map(|(start, end)| Loop {
            start,
            end,
            mix: Mix::of(&f.instrs[start..=end]),
        })
        .collect()
}

/// The main loop: the most HMMA, the fewest issue slots on a tie; `None` without HMMA loops.
pub fn main_loop(f: &SassFunction) -> Option<Loop> {
    loops(f)
        .into_iter()
        .filter(|l| l.mix.hmma > 0)
        .min_by_key(|l| (std::cmp::Reverse(l.mix.hmma), l.mix.issue_slots))
}

// ---------------------------------------------------------------------------------------------
// Resources and occupancy.

/// `cuobjdump -res-usage` of one function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub registers: u32,
    pub stack: u32,
    /// Static shared memory as the cubin declares it (on sm_90 this includes the 1 KB the
    /// runtime reserves per CTA).
    pub shared: u32,
    pub local: u32,
}

/// Parses `cuobjdump -res-usage`: function name → resources.
pub fn parse_res_usage(text: &str) -> BTreeMap<String, Resources> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("Function ") {
            current = Some(name.trim_end_matches(':').to_string());
        } else if let (Some(name), true) = (&current, t.starts_with("REG:")) {
            let field = |key: &str| -> u32 {
                t.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            out.insert(
                name.clone(),
                Resources {
                    registers: field("REG:"),
                    stack: field("STACK:"),
                    shared: field("SHARED:"),
                    local: field("LOCAL:"),
                },
            );
            current = None;
        }
    }
    out
}

/// The GPU generations of the report, with the occupancy limits of NVIDIA's occupancy
/// calculator (CUDA C Programming Guide, "Compute Capabilities").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Arch {
    /// A100.
    Sm80,
    /// H100 / H200.
    Sm90,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "sm_80" | "80" => Ok(Arch::Sm80),
            "sm_90" | "90" => Ok(Arch::Sm90),
            _ => bail!("unknown arch {s:?} (sm_80 or sm_90)"),
        }
    }
    /// Shared memory per SM that CTAs can use, bytes.
    pub fn smem_per_sm(self) -> u32 {
        match self {
            Arch::Sm80 => 167_936, // 164 KB
            Arch::Sm90 => 233_472, // 228 KB
        }
    }
    /// Most dynamic + static shared memory one CTA may opt in to.
    pub fn smem_per_cta_max(self) -> u32 {
        match self {
            Arch::Sm80 => 166_912, // 163 KB
            Arch::Sm90 => 232_448, // 227 KB
        }
    }
    /// Shared memory the runtime reserves per CTA.
    pub const RESERVED_SMEM: u32 = 1024;
    pub const REGS_PER_SM: u32 = 65_536;
    pub const MAX_THREADS_PER_SM: u32 = 2048;
    pub const MAX_CTAS_PER_SM: u32 = 32;
    /// Registers are allocated per warp in units of 256, per SM sub-partition (4 of them).
    pub const REG_ALLOC_UNIT: u32 = 256;
    pub const SUB_PARTITIONS: u32 = 4;
    pub const SMEM_ALLOC_UNIT: u32 = 128;
}

/// Theoretical occupancy of one kernel configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Occupancy {
    pub ctas_per_sm: u32,
    pub warps_per_sm: u32,
    /// What limits it: `registers`, `shared memory`, `threads` or `CTAs`; `does not fit` when a
    /// CTA exceeds a per-CTA limit.
    pub limiter: &'static str,
    /// Shared memory one CTA takes (dynamic + static + reserved, rounded to the allocation unit).
    pub smem_per_cta: u32,
}

/// Occupancy from the registers per thread, the shared memory (dynamic + user static) and the
/// threads of one CTA.
pub fn occupancy(arch: Arch, registers: u32, smem: u32, threads: u32) -> Occupancy {
    let warps = threads.div_ceil(32).max(1);
    let smem_per_cta =
        (smem + Arch::RESERVED_SMEM).div_ceil(Arch::SMEM_ALLOC_UNIT) * Arch::SMEM_ALLOC_UNIT;
    let regs_per_warp =
        (registers.max(1) * 32).div_ceil(Arch::REG_ALLOC_UNIT) * Arch::REG_ALLOC_UNIT;
    let per_partition = Arch::REGS_PER_SM / Arch::SUB_PARTITIONS;
    let warps_by_regs = (per_partition / regs_per_warp) * Arch::SUB_PARTITIONS;
    let limits = [
        ("registers", warps_by_regs / warps),
        ("shared memory", arch.smem_per_sm() / smem_per_cta),
        ("threads", Arch::MAX_THREADS_PER_SM / (warps * 32)),
        ("CTAs", Arch::MAX_CTAS_PER_SM),
    ];
    let (mut limiter, mut ctas) = limits
        .into_iter()
        .min_by_key(|&(_, n)| n)
        .expect("non-empty");
    if smem > arch.smem_per_cta_max() || registers > 255 || threads > 1024 {
        (limiter, ctas) = ("does not fit", 0);
    }
    Occupancy {
        ctas_per_sm: ctas,
        warps_per_sm: ctas * warps,
        limiter,
        smem_per_cta,
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel configurations and rows.

pub use crate::cuda::modules::KernelConfig;

/// The report's row for one kernel on one architecture.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub label: String,
    pub arch: Arch,
    pub symbol: String,
    pub threads: u32,
    pub resources: Resources,
    pub dynamic_smem: u32,
    pub occupancy: Occupancy,
    pub main_loop: Option<Mix>,
    pub tile_hmma: Option<u32>,
    /// The other loops with HMMA: (HMMA, issue slots).
    pub other_hmma_loops: Vec<(u32, u32)>,
}

impl KernelRow {
    /// Barriers per tile of the main loop.
    pub fn barriers_per_tile(&self) -> Option<f64> {
        let m = self.main_loop?;
        let tile = self.tile_hmma?;
        (m.hmma > 0).then(|| m.bar as f64 * tile as f64 / m.hmma as f64)
    }
}

/// Builds the rows of `configs` from one cubin's SASS and resource usage.
pub fn rows_from_text(
    arch: Arch,
    sass: &str,
    res_usage: &str,
    configs: &[KernelConfig],
) -> Result<Vec<KernelRow>> {
    let funcs = parse_nvdisasm(sass);
    let res = parse_res_usage(res_usage);
    let mut rows = Vec::new();
    for c in configs {
        let matches: Vec<&SassFunction> = funcs
            .iter()
            .filter(|f| f.name == c.symbol || f.name.contains(&c.symbol))
            .collect();
        let f = match matches.as_slice() {
            [f] => *f,
            [] => bail!(
                "{}: no function matching {:?} in the cubin",
                c.label,
                c.symbol
            ),
            many => match many.iter().find(|f| f.name == c.symbol) {
                Some(f) => *f,
                None => bail!(
                    "{}: {} functions match {:?}; give a unique symbol",
                    c.label,
                    many.len(),
                    c.symbol
                ),
            },
        };
        let r = *res
            .get(&f.name)
            .ok_or_else(|| anyhow!("{}: no resource usage for {}", c.label, f.name))?;
        let user_static = match arch {
            Arch::Sm90 => r.shared.saturating_sub(Arch::RESERVED_SMEM),
            Arch::Sm80 => r.shared,
        };
        let occ = occupancy(arch, r.registers, c.dynamic_smem + user_static, c.threads);
        let main = main_loop(f);
        let other = loops(f)
            .into_iter()
            .filter(|l| l.mix.hmma > 0 && Some(l.mix) != main.map(|m| m.mix))
            .map(|l| (l.mix.hmma, l.mix.issue_slots))
            .collect();
        rows.push(KernelRow {
            label: c.label.clone(),
            arch,
            symbol: f.name.clone(),
            threads: c.threads,
            resources: r,
            dynamic_smem: c.dynamic_smem,
            occupancy: occ,
            main_loop: main.map(|l| l.mix),
            tile_hmma: c.tile_hmma,
            other_hmma_loops: other,
        });
    }
    Ok(rows)
}

fn fmt_opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "—".to_string(), |v| format!("{v:.prec$}"))
}

/// The rows as two markdown tables: resources and the main loop's per-HMMA figures, then the
/// main loop's instruction mix.
pub fn markdown(rows: &[KernelRow]) -> String {
    let mut s = String::new();
    s.push_str(
        "| kernel | arch | threads | regs | stack | smem/CTA (B) | CTAs/SM (limit) | warps/SM | \
         loop HMMA | issue slots/HMMA | smem rd B/HMMA | smem wr B/HMMA | BAR/tile |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let m = r.main_loop;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.arch.name(),
            r.threads,
            r.resources.registers,
            r.resources.stack,
            r.occupancy.smem_per_cta,
            r.occupancy.ctas_per_sm,
            r.occupancy.limiter,
            r.occupancy.warps_per_sm,
            m.map_or("—".into(), |m| m.hmma.to_string()),
            fmt_opt(m.and_then(|m| m.slots_per_hmma()), 2),
            fmt_opt(m.and_then(|m| m.smem_read_per_hmma()), 0),
            fmt_opt(m.and_then(|m| m.smem_write_per_hmma()), 0),
            fmt_opt(r.barriers_per_tile(), 2),
        );
    }
    s.push_str(
        "\nMain-loop instruction mix (static counts per loop iteration):\n\n\
         | kernel | arch | slots | HMMA | LDSM | LDS | STS | LDGSTS | LDG | STG | RED | LDL/STL | \
         BAR | EX2 | MUFU other | SHFL | FP | INT | other | other HMMA loops (HMMA/slots) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let Some(m) = r.main_loop else { continue };
        let others: Vec<String> = r
            .other_hmma_loops
            .iter()
            .map(|(h, sl)| format!("{h}/{sl}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.arch.name(),
            m.issue_slots,
            m.hmma,
            m.ldsm,
            m.lds,
            m.sts,
            m.ldgsts,
            m.ldg,
            m.stg,
            m.red,
            m.local,
            m.bar,
            m.ex2,
            m.mufu_other,
            m.shfl,
            m.fp,
            m.int,
            m.other,
            if others.is_empty() {
                "—".to_string()
            } else {
                others.join(", ")
            }
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Tools.

/// Version of NVIDIA's `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels installed into
/// the cache when no cuobjdump/nvdisasm is found (no 13.0 wheel of them exists; 13.2 reads the
/// sm_80/sm_90 cubins of nvcc 13.0).
pub const TOOLS_VERSION: &str = "13.2.78";

/// The binutils the report runs.
#[derive(Clone, Debug)]
pub struct Tools {
    pub cuobjdump: PathBuf,
    pub nvdisasm: PathBuf,
    /// For the sm_80 compile of the embedded PTX.
    pub ptxas: Option<PathBuf>,
}

fn runs(p: &Path) -> bool {
    p.is_file()
        && Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// `<cache>/cuda-tools-<TOOLS_VERSION>`, where [`Tools::find_or_install`] installs the wheels.
pub fn tools_dir() -> PathBuf {
    crate::assets::cache_dir().join(format!("cuda-tools-{TOOLS_VERSION}"))
}

/// ptxas next to `$NVCC`, under `$CUDA_HOME`/`$CUDA_PATH`, or in the toolchain scripts/setup
/// installs (`<cache>/cuda-13.0.88`).
pub fn find_ptxas() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(n) = std::env::var_os("NVCC").filter(|v| !v.is_empty()) {
        c.push(PathBuf::from(n).with_file_name("ptxas"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            c.push(PathBuf::from(r).join("bin/ptxas"));
        }
    }
    c.push(crate::assets::cache_dir().join("cuda-13.0.88/nvidia/cu13/bin/ptxas"));
    c.into_iter().find(|p| runs(p))
}

impl Tools {
    /// cuobjdump and nvdisasm from `$PREFIX_TUNE_CUDA_TOOLS` (a `bin` directory), the cache
    /// ([`tools_dir`]), next to ptxas, or `PATH`; when none is found and `install`, the pinned
    /// wheels are installed into the cache with `python3 -m pip install --target`.
    pub fn find_or_install(install: bool) -> Result<Tools> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(d) = std::env::var_os("PREFIX_TUNE_CUDA_TOOLS").filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(d));
        }
        dirs.push(tools_dir().join("nvidia/cu13/bin"));
        let ptxas = find_ptxas();
        if let Some(p) = ptxas.as_ref().and_then(|p| p.parent()) {
            dirs.push(p.to_path_buf());
        }
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        let found = |dirs: &[PathBuf]| {
            dirs.iter().find_map(|d| {
                let (c, n) = (d.join("cuobjdump"), d.join("nvdisasm"));
                (runs(&c) && runs(&n)).then_some((c, n))
            })
        };
        if let Some((cuobjdump, nvdisasm)) = found(&dirs) {
            return Ok(Tools {
                cuobjdump,
                nvdisasm,
                ptxas,
            });
        }
        if !install {
            bail!("cuobjdump/nvdisasm not found (looked in {dirs:?})");
        }
        let target = tools_dir();
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "-q",
                "--no-deps",
                "--upgrade",
                "--target",
            ])
            .arg(&target)
            .arg(format!("nvidia-cuda-cuobjdump=={TOOLS_VERSION}"))
            .arg(format!("nvidia-cuda-nvdisasm=={TOOLS_VERSION}"))
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .output()
            .with_context(|| format!("running {python} -m pip"))?;
        if !out.status.success() {
            bail!(
                "installing the cuobjdump/nvdisasm wheels into {} failed: {}",
                target.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bin = target.join("nvidia/cu13/bin");
        for t in ["cuobjdump", "nvdisasm"] {
            set_executable(&bin.join(t))?;
        }
        let (cuobjdump, nvdisasm) = found(&[bin]).ok_or_else(|| {
            anyhow!(
                "the wheels installed into {} but their tools do not run",
                target.display()
            )
        })?;
        Ok(Tools {
            cuobjdump,
            nvdisasm,
            ptxas,
        })
    }

    fn run(&self, exe: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
        let out = Command::new(exe)
            .args(args)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{} {:?} failed: {}",
                exe.display(),
                args,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The rows of `configs` from the cubin at `cubin` (compiled for `arch`).
    pub fn rows(
        &self,
        cubin: &Path,
        arch: Arch,
        configs: &[KernelConfig],
    ) -> Result<Vec<KernelRow>> {
        let c = cubin.as_os_str();
        let sass = self.run(&self.nvdisasm, &["-c".as_ref(), c])?;
        let res = self.run(&self.cuobjdump, &["-res-usage".as_ref(), c])?;
        rows_from_text(arch, &sass, &res, configs)
            .with_context(|| format!("reading {}", cubin.display()))
    }

    /// Compiles PTX to a cubin for `arch` with ptxas (`-O3`, as the driver's JIT does).
    pub fn ptxas(&self, ptx: &Path, arch: Arch, out: &Path) -> Result<()> {
        let ptxas = self
            .ptxas
            .as_ref()
            .ok_or_else(|| anyhow!("ptxas not found (run scripts/setup, or set NVCC)"))?;
        self.run(
            ptxas,
            &[
                "-O3".as_ref(),
                format!("-arch={}", arch.name()).as_ref(),
                ptx.as_os_str(),
                "-o".as_ref(),
                out.as_os_str(),
            ],
        )
        .map(|_| ())
    }
}

#[cfg(unix)]
fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if p.is_file() {
        let mut perm = std::fs::metadata(p)?.permissions();
        perm.set_mode(perm.mode() | 0o755);
        std::fs::set_permissions(p, perm)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_executable(_: &Path) -> Result<()> {
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The embedded kernels.

/// Every attention kernel configuration the crate launches, with the threads and dynamic shared
/// memory of its launch wrapper (`crate::cuda::attention`, `crate::cuda::decode`), grouped by
/// embedded module.
pub fn embedded_configs() -> Vec<(&'static str, Vec<KernelConfig>)> {
    crate::cuda::attention::report_configs()
        .into_iter()
        .chain(crate::cuda::decode::report_configs())
        .collect()
}

/// The report of every embedded attention kernel on sm_80 and sm_90. Temporary files go to a
/// fresh directory under the system's temp dir, removed afterwards.
pub fn embedded_report(tools: &Tools) -> Result<Vec<KernelRow>> {
    use crate::cuda::modules;
    if !modules::KERNELS_BUILT {
        bail!("this build has no embedded kernels (built without nvcc)");
    }
    let dir =
        std::env::temp_dir().join(format!("prefix-tune-kernel-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let mut rows = Vec::new();
        for (module, configs) in embedded_configs() {
            let m =
                modules::module(module).ok_or_else(|| anyhow!("no embedded module {module}"))?;
            let sm90 = dir.join(format!("{module}.sm_90.cubin"));
            std::fs::write(&sm90, m.cubin_sm90)?;
            let ptx = dir.join(format!("{module}.ptx"));
            std::fs::write(&ptx, m.ptx)?;
            let sm80 = dir.join(format!("{module}.sm_80.cubin"));
            tools.ptxas(&ptx, Arch::Sm80, &sm80)?;
            rows.extend(tools.rows(&sm80, Arch::Sm80, &configs)?);
            rows.extend(tools.rows(&sm90, Arch::Sm90, &configs)?);
        }
        rows.sort_by(|a, b| (a.label.as_str(), a.arch).cmp(&(b.label.as_str(), b.arch)));
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SASS: &str = "\t.section\t.text.k,\"ax\",@progbits\n\
.text.k:\n\
        /*0000*/                   MOV R1, c[0x0][0x28] ;\n\
.L_x_0:\n\
        /*0010*/                   LDSM.16.M88.4 R4, [R2] ;\n\
        /*0020*/                   LDSM.16.MT88.2 R8, [R2+0x100] ;\n\
        /*0030*/                   HMMA.16816.F32 R12, R4, R8, R12 ;\n\
        /*0040*/                   HMMA.16816.F32 R16, R4, R10, R16 ;\n\
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R20.64] ;\n\
        /*0060*/                   MUFU.EX2 R5, R5 ;\n\
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n\
        /*0080*/                   NOP ;\n\
        /*0088*/                 @!PT LDS RZ, [RZ] ;\n\
        /*0090*/               @P0 BRA `(.L_x_0) ;\n\
.L_x_1:\n\
        /*00a0*/                   HMMA.16816.F32 R12, R4, R8, R12 ;\n\
        /*00b0*/                   LDS.64 R6, [R2] ;\n\
        /*00c0*/              @!P1 BRA `(.L_x_1) ;\n\
        /*00d0*/                   EXIT ;\n\
.L_x_2:\n\
        /*00e0*/                   BRA `(.L_x_2);\n";

    #[test]
    fn loops_and_their_mix_from_sass() {
        let f = &parse_nvdisasm(SASS)[0];
        assert_eq!(f.name, "k");
        assert_eq!(f.instrs.len(), 16);
        assert_eq!(f.instrs[10].pred.as_deref(), Some("P0"));
        let ls = loops(f);
        assert_eq!(ls.len(), 2, "{ls:?}");
        let m = main_loop(f).unwrap().mix;
        assert_eq!((m.hmma, m.issue_slots), (2, 8), "padding not counted");
        assert_eq!(m.ldsm_bytes, 512 + 256);
        assert_eq!(m.ldgsts_bytes, 512);
        assert_eq!((m.bar, m.ex2), (1, 1));
        assert_eq!(m.slots_per_hmma(), Some(4.0));
        assert_eq!(m.smem_read_per_hmma(), Some(384.0));
        let small = ls.iter().find(|l| l.mix.hmma == 1).unwrap().mix;
        assert_eq!(small.lds_bytes, 256);
    }

    #[test]
    fn res_usage_and_occupancy() {
        let text = " Function prefix_attn_fwd_d64:\n  REG:128 STACK:0 SHARED:1024 LOCAL:0 \
                    CONSTANT[0]:640 TEXTURE:0\n Function other:\n  REG:40 STACK:8 SHARED:0 LOCAL:0\n";
        let r = parse_res_usage(text);
        assert_eq!(r["prefix_attn_fwd_d64"].registers, 128);
        assert_eq!(r["other"].stack, 8);
        // 128 regs x 128 threads: 4 CTAs by registers; 46080 B + 1 KB: 4 by smem on sm_90.
        let o = occupancy(Arch::Sm90, 128, 46_080, 128);
        assert_eq!((o.ctas_per_sm, o.warps_per_sm), (4, 16));
        // 167 regs round to 168 x 32 = 5376 per warp: 3 warps per sub-partition.
        assert_eq!(occupancy(Arch::Sm90, 167, 0, 128).ctas_per_sm, 3);
        let big = occupancy(Arch::Sm80, 167, 87_040, 128);
        assert_eq!((big.ctas_per_sm, big.limiter), (1, "shared memory"));
        assert_eq!(occupancy(Arch::Sm90, 16, 0, 1024).limiter, "threads");
        assert_eq!(
            occupancy(Arch::Sm80, 64, 200_000, 128).limiter,
            "does not fit"
        );
    }
}
