//! Run-time compilation of the kernels with NVRTC: the fallback for drivers that refuse the
//! embedded images. Those are CUDA 13.0 output (PTX ISA 9.0 and a 13.0 cubin), which only R580+
//! drivers load, while many H100/H200 hosts run R535–R570 (CUDA 12.2–12.8). There, the embedded
//! sources (`kernels/*.cu` and [`KERNEL_HEADERS`]) are compiled by the machine's NVRTC into
//! compute_80 PTX of NVRTC's own ISA version, which any driver at least as new as that NVRTC
//! loads. The PTX is cached on disk (`<cache>/kernels/nvrtc-<version>/`), keyed by every source
//! byte, the options, the NVRTC version and the CUDA headers, so it is compiled once per machine
//! and build.
//!
//! NVRTC does not build in `cuda_fp16.h`: it comes from the CUDA toolkit's headers
//! ([`find_cuda_include`]); the two C library headers the kernels include come from
//! `kernels/rtc/` (NVRTC has none). `PREFIX_TUNE_KERNELS` chooses ([`KernelSource`]).

use std::ffi::{c_char, c_int, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result, sys};

use super::context::guarded_lib as guarded;
use super::modules::{KernelModule, KERNEL_HEADERS};

/// The virtual architecture of the PTX NVRTC writes (as the embedded PTX: sm_80 and newer).
pub const ARCH: &str = "compute_80";

/// How the kernels' images are chosen (`PREFIX_TUNE_KERNELS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// `auto` (the default): the embedded images when the driver supports CUDA 13.0, else NVRTC.
    Auto,
    /// `embedded`: the embedded images only.
    Embedded,
    /// `nvrtc`: always compile with NVRTC (e.g. to check the fallback on a new driver).
    Nvrtc,
}

impl KernelSource {
    /// From `PREFIX_TUNE_KERNELS` (unset or empty: [`KernelSource::Auto`]).
    pub fn from_env() -> Result<Self> {
        match std::env::var("PREFIX_TUNE_KERNELS").ok().as_deref() {
            None | Some("") | Some("auto") => Ok(Self::Auto),
            Some("embedded") => Ok(Self::Embedded),
            Some("nvrtc") => Ok(Self::Nvrtc),
            Some(v) => bail!("PREFIX_TUNE_KERNELS={v:?}: expected auto, embedded or nvrtc"),
        }
    }
}

/// The machine's NVRTC with the CUDA headers it compiles the kernels against.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    /// (major, minor), e.g. (12, 8).
    pub version: (i32, i32),
    /// The directory holding `cuda_fp16.h`.
    pub include: PathBuf,
    /// Where compiled PTX is cached.
    pub cache: PathBuf,
    /// The part of every cache key that all modules share (see [`Nvrtc::key`]), hashed once.
    shared_key: u64,
}

impl Nvrtc {
    /// Loads NVRTC (`libnvrtc.so`, `.so.13`, `.so.12`, … on the library path) and finds the CUDA
    /// headers. The error says what is missing and how to provide it.
    pub fn find() -> Result<Self> {
        // SAFETY: only tries to dlopen the NVRTC library.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "no NVRTC library (libnvrtc.so, .so.13, .so.12, ...) on the library path: install \
                 the CUDA toolkit's NVRTC no newer than the driver (e.g. `pip install \
                 nvidia-cuda-nvrtc-cu12==12.8.*` for a CUDA 12.8 driver) and put its lib \
                 directory on LD_LIBRARY_PATH"
            );
        }
        let version = guarded("NVRTC", "reading the NVRTC version", || {
            let (mut major, mut minor): (c_int, c_int) = (0, 0);
            // SAFETY: NVRTC writes two ints.
            unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
                .result()
                .map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
            Ok((major, minor))
        })?;
        let include = find_cuda_include()?;
        let cache = crate::assets::cache_dir()
            .join("kernels")
            .join(format!("nvrtc-{}.{}", version.0, version.1));
        let mut nvrtc = Nvrtc {
            version,
            include,
            cache,
            shared_key: 0,
        };
        nvrtc.shared_key = nvrtc.shared_key();
        Ok(nvrtc)
    }

    /// The CUDA version of this NVRTC as the driver reports its own (12080 for 12.8): a driver
    /// loads its PTX only when it is at least this.
    pub fn cuda_version(&self) -> i32 {
        self.version.0 * 1000 + self.version.1 * 10
    }

    /// The options every module is compiled with (nvcc's in build/nvcc.rs: C++17, line info;
    /// NVRTC optimises by default). `-default-device`: the sources' unannotated `constexpr`
    /// helpers are device functions (nvcc allows them through its relaxed rules).
    fn options(&self) -> Vec<String> {
        vec![
            format!("--gpu-architecture={ARCH}"),
            "--std=c++17".into(),
            "-default-device".into(),
            "-lineinfo".into(),
            format!("--include-path={}", self.include.display()),
        ]
    }

    /// The PTX of module `m`: from the cache when a valid entry is there, else compiled now (and
    /// cached; a cache that cannot be written is only a lost speed-up). Returns the PTX and
    /// whether it came from the cache.
    pub fn ptx(&self, m: &KernelModule) -> Result<(String, bool)> {
        if let Ok(text) = std::fs::read_to_string(self.cache_path(m)) {
            if check_ptx(m, &text).is_ok() {
                return Ok((text, true));
            }
        }
        Ok((self.compile_and_cache(m)?, false))
    }

    /// Where module `m`'s PTX is cached.
    pub fn cache_path(&self, m: &KernelModule) -> PathBuf {
        self.cache
            .join(format!("{}-{:016x}.ptx", m.name, self.key(m)))
    }

    /// Compiles module `m` now and replaces its cache entry (also used when a cached entry that
    /// looked whole failed to load).
    pub fn compile_and_cache(&self, m: &KernelModule) -> Result<String> {
        let ptx = self.compile(m)?;
        check_ptx(m, &ptx).with_context(|| format!("NVRTC's PTX for kernels/{}.cu", m.name))?;
        if let Err(e) = write_atomically(&self.cache_path(m), &ptx) {
            eprintln!(
                "warning: could not cache the NVRTC-compiled kernels in {}: {e:#}",
                self.cache.display()
            );
        }
        Ok(ptx)
    }

    /// What every module's PTX depends on: the NVRTC version, the options, the toolkit's fp16
    /// headers and the embedded headers. (`DefaultHasher` may change between Rust releases; that
    /// only costs one recompilation.)
    fn shared_key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.version.hash(&mut h);
        self.options().hash(&mut h);
        for header in ["cuda_fp16.h", "cuda_fp16.hpp"] {
            std::fs::read(self.include.join(header))
                .unwrap_or_default()
                .hash(&mut h);
        }
        KERNEL_HEADERS.hash(&mut h);
        h.finish()
    }

    /// The cache key of module `m`: the shared part and the module's own source.
    fn key(&self, m: &KernelModule) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.shared_key.hash(&mut h);
        m.name.hash(&mut h);
        m.source.hash(&mut h);
        h.finish()
    }

    /// Compiles `kernels/<m.name>.cu` with the embedded headers (passed to NVRTC in memory, by
    /// the names the sources include them by).
    fn compile(&self, m: &KernelModule) -> Result<String> {
        let what = format!(
            "compiling kernels/{}.cu with NVRTC {}.{}",
            m.name, self.version.0, self.version.1
        );
        guarded("NVRTC", &what, || {
            let cstr = |s: &str| CString::new(s).map_err(|_| anyhow!("a NUL byte in {s:.40?}"));
            let src = cstr(m.source)?;
            let name = cstr(&format!("{}.cu", m.name))?;
            let texts = KERNEL_HEADERS
                .iter()
                .map(|(_, t)| cstr(t))
                .collect::<Result<Vec<_>>>()?;
            let names = KERNEL_HEADERS
                .iter()
                .map(|(n, _)| cstr(n))
                .collect::<Result<Vec<_>>>()?;
            let text_ptrs: Vec<*const c_char> = texts.iter().map(|c| c.as_ptr()).collect();
            let name_ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
            let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
            // SAFETY: every pointer is a NUL-terminated string that outlives the program (NVRTC
            // copies them); the two arrays have KERNEL_HEADERS.len() entries.
            unsafe {
                sys::nvrtcCreateProgram(
                    &mut prog,
                    src.as_ptr(),
                    name.as_ptr(),
                    KERNEL_HEADERS.len() as c_int,
                    text_ptrs.as_ptr(),
                    name_ptrs.as_ptr(),
                )
            }
            .result()
            .map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
            // SAFETY: `prog` was created above and is destroyed once, below.
            let compiled = unsafe { result::compile_program(prog, &self.options()) };
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            let ptx = compiled.and_then(|()| unsafe { result::get_ptx(prog) });
            unsafe { result::destroy_program(prog) }.ok();
            match ptx {
                Ok(p) => Ok(c_chars_to_string(&p)),
                Err(e) => {
                    let head: Vec<&str> = log.lines().take(30).collect();
                    bail!(
                        "{e:?} (headers from {}):\n{}",
                        self.include.display(),
                        head.join("\n")
                    )
                }
            }
        })
    }
}

/// A NUL-terminated buffer from NVRTC as text.
fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// PTX that declares its ISA version and every kernel the build found in the module.
pub fn check_ptx(m: &KernelModule, ptx: &str) -> Result<()> {
    if !ptx.lines().any(|l| l.trim_start().starts_with(".version ")) {
        bail!("not PTX (no .version directive)");
    }
    for e in m.entries {
        if !ptx.contains(&format!(".entry {e}(")) {
            bail!("kernel {e} is missing");
        }
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename (the
/// temporary name unique to this process and call, so concurrent writers never share one; the
/// last rename wins with a whole file).
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().context("cache path without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("ptx.tmp.{}.{serial}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The directory with the CUDA toolkit's `cuda_fp16.h` for NVRTC: `PREFIX_TUNE_CUDA_INCLUDE`
/// (which must hold it), else the first of `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`, `/usr/local/cuda-*/include` (newest first), `/opt/cuda/include`
/// and `/usr/include` that holds it.
pub fn find_cuda_include() -> Result<PathBuf> {
    let has = |d: &Path| d.join("cuda_fp16.h").is_file();
    if let Some(d) = std::env::var_os("PREFIX_TUNE_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        let d = PathBuf::from(d);
        if has(&d) {
            return Ok(d);
        }
        bail!(
            "PREFIX_TUNE_CUDA_INCLUDE={} has no cuda_fp16.h (it should name the CUDA toolkit's \
             include directory)",
            d.display()
        );
    }
    let mut candidates = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(d).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/local")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("cuda-"))
                })
                .map(|p| p.join("include"))
                .collect()
        })
        .unwrap_or_default();
    versioned.sort();
    candidates.extend(versioned.into_iter().rev());
    candidates.push("/opt/cuda/include".into());
    candidates.push("/usr/include".into());
    candidates.into_iter().find(|d| has(d)).ok_or_else(|| {
        anyhow!(
            "NVRTC needs the CUDA headers (cuda_fp16.h), found in none of $CUDA_HOME/include, \
             $CUDA_PATH/include, /usr/local/cuda*/include, /opt/cuda/include, /usr/include: \
             install them (e.g. `pip install nvidia-cuda-runtime-cu12==12.8.*`, matching the \
             NVRTC) and set PREFIX_TUNE_CUDA_INCLUDE to the directory holding cuda_fp16.h"
        )
    })
}
