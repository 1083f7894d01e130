//! Device memory is host memory: every allocation is its own mapping, laid out so that its end
//! (rounded up to 256 bytes, cudaMalloc's alignment) touches 64 KB of guard pages, with a guard
//! page before it. Bytes between the allocation's exact end and the guard (and before its start) are red
//! zones filled with a canary that the driver checks after every launch that could reach the
//! allocation, and when it is freed; any access past the red zones faults on a guard page, which
//! the launch engine reports. New allocations are poisoned (0xff bytes: fp16/fp32 NaN; only a
//! memset zeroes memory, as on a GPU). Freed allocations stay mapped without access for a while
//! (quarantine), so a use after free faults and is named.

use std::collections::{BTreeMap, VecDeque};

pub const PAGE: usize = 4096;
/// Inaccessible bytes after every allocation (before it: one page).
const TAIL_GUARD: usize = 16 * PAGE;
const ALIGN: usize = 256;
const CANARY: u8 = 0xa5;
const POISON: u8 = 0xff;
/// Freed allocations kept inaccessible (their address ranges not reused) before being unmapped.
const QUARANTINE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `cuMemAlloc` / `cuMemAllocAsync`.
    Device,
    /// `cuMemHostAlloc` / `cuMemAllocHost` (pinned host memory: asynchronous copies really are).
    Pinned,
}

#[derive(Debug)]
pub struct Allocation {
    pub id: u64,
    pub base: usize,
    pub size: usize,
    pub kind: Kind,
    map: usize,
    map_len: usize,
    data_start: usize,
    data_end: usize,
}

impl Allocation {
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.base
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.base + self.size)
    }

    pub fn describe(&self) -> String {
        format!(
            "allocation #{} ({} bytes at 0x{:x}, {})",
            self.id,
            self.size,
            self.base,
            match self.kind {
                Kind::Device => "device memory",
                Kind::Pinned => "pinned host memory",
            }
        )
    }

    /// The first red-zone byte that is not the canary: (offset from the base, negative before it).
    fn damaged_red_zone(&self) -> Option<isize> {
        // SAFETY: the red zones lie inside this allocation's mapping, which is readable and
        // writable while the allocation is live.
        unsafe {
            let front = std::slice::from_raw_parts(
                self.data_start as *const u8,
                self.base - self.data_start,
            );
            if let Some(i) = front.iter().position(|&b| b != CANARY) {
                return Some(i as isize - (self.base - self.data_start) as isize);
            }
            let tail_start = self.base + self.size;
            let tail =
                std::slice::from_raw_parts(tail_start as *const u8, self.data_end - tail_start);
            tail.iter()
                .position(|&b| b != CANARY)
                .map(|i| (self.size + i) as isize)
        }
    }
}

/// All allocations of the device (and the pinned host memory of the context).
#[derive(Default)]
pub struct Memory {
    live: BTreeMap<usize, Allocation>,
    freed: VecDeque<Allocation>,
    next_id: u64,
    pub in_use: usize,
    pub peak: usize,
    pub limit: usize,
}

/// Why a memory operation failed.
pub enum MemError {
    OutOfMemory(String),
    Invalid(String),
}

impl Memory {
    pub fn new(limit: usize) -> Self {
        Memory {
            limit,
            next_id: 1,
            ..Default::default()
        }
    }

    /// A new allocation of exactly `size` bytes (at least 1), poisoned when `poison`.
    pub fn alloc(&mut self, size: usize, kind: Kind, poison: bool) -> Result<usize, MemError> {
        if size == 0 {
            return Err(MemError::Invalid("allocation of 0 bytes".into()));
        }
        if kind == Kind::Device && self.in_use + size > self.limit {
            return Err(MemError::OutOfMemory(format!(
                "allocating {size} bytes: {} of {} bytes of device memory in use (PTSIM_MEMORY_MIB)",
                self.in_use, self.limit
            )));
        }
        let rounded = size.div_ceil(ALIGN) * ALIGN;
        let data_pages = rounded.div_ceil(PAGE);
        let map_len = PAGE + data_pages * PAGE + TAIL_GUARD;
        // SAFETY: an anonymous private mapping; the pointer is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(MemError::OutOfMemory(format!(
                "allocating {size} bytes: the host could not map {map_len} bytes"
            )));
        }
        let map = map as usize;
        let data_start = map + PAGE;
        let data_end = data_start + data_pages * PAGE;
        // SAFETY: the data pages of the mapping just made.
        let ok = unsafe {
            libc::mprotect(
                data_start as *mut libc::c_void,
                data_pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if ok != 0 {
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(map as *mut libc::c_void, map_len) };
            return Err(MemError::OutOfMemory(format!(
                "allocating {size} bytes: the host refused {} bytes",
                data_pages * PAGE
            )));
        }
        let base = data_end - rounded;
        // SAFETY: inside the readable, writable data pages.
        unsafe {
            std::ptr::write_bytes(data_start as *mut u8, CANARY, base - data_start);
            std::ptr::write_bytes(base as *mut u8, if poison { POISON } else { 0 }, size);
            std::ptr::write_bytes((base + size) as *mut u8, CANARY, data_end - base - size);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(
            base,
            Allocation {
                id,
                base,
                size,
                kind,
                map,
                map_len,
                data_start,
                data_end,
            },
        );
        if kind == Kind::Device {
            self.in_use += size;
            self.peak = self.peak.max(self.in_use);
        }
        Ok(base)
    }

    /// Frees the allocation that starts at `ptr`; its range stays inaccessible for a while.
    /// Returns a red-zone report when something wrote outside it.
    pub fn free(&mut self, ptr: usize, kind: Kind) -> Result<Option<String>, MemError> {
        let Some(a) = self.live.remove(&ptr) else {
            return Err(MemError::Invalid(match self.find_freed(ptr) {
                Some(f) if f.base == ptr => format!(
                    "0x{ptr:x} was already freed (double free of {})",
                    f.describe()
                ),
                _ => match self.find(ptr, 1) {
                    Some(l) => format!("0x{ptr:x} is inside {}, not its start", l.describe()),
                    None => format!("0x{ptr:x} is not an allocation of this context"),
                },
            }));
        };
        if a.kind != kind {
            let msg = format!("0x{ptr:x} is {}, freed with the wrong call", a.describe());
            self.live.insert(ptr, a);
            return Err(MemError::Invalid(msg));
        }
        let report = a.damaged_red_zone().map(|off| red_zone_text(&a, off));
        if a.kind == Kind::Device {
            self.in_use -= a.size;
        }
        // SAFETY: the allocation's own data pages.
        unsafe {
            libc::mprotect(
                a.data_start as *mut libc::c_void,
                a.data_end - a.data_start,
                libc::PROT_NONE,
            )
        };
        self.freed.push_back(a);
        while self.freed.len() > QUARANTINE {
            let old = self.freed.pop_front().unwrap();
            // SAFETY: the whole mapping of an allocation no longer in use.
            unsafe { libc::munmap(old.map as *mut libc::c_void, old.map_len) };
        }
        Ok(report)
    }

    /// The live allocation holding `[addr, addr + len)`.
    pub fn find(&self, addr: usize, len: usize) -> Option<&Allocation> {
        let (_, a) = self.live.range(..=addr).next_back()?;
        a.contains(addr, len).then_some(a)
    }

    /// A live allocation that `addr` points into or one past the end of (a valid pointer value).
    pub fn find_pointer(&self, addr: usize) -> Option<&Allocation> {
        let (_, a) = self.live.range(..=addr).next_back()?;
        (addr <= a.base + a.size).then_some(a)
    }

    fn find_freed(&self, addr: usize) -> Option<&Allocation> {
        self.freed
            .iter()
            .rev()
            .find(|a| addr >= a.base && addr <= a.base + a.size)
    }

    /// What `addr` is, for error messages.
    pub fn describe(&self, addr: usize) -> String {
        if let Some(a) = self.find_pointer(addr) {
            return format!("offset {} of {}", addr - a.base, a.describe());
        }
        if let Some(a) = self
            .freed
            .iter()
            .rev()
            .find(|a| addr >= a.data_start && addr < a.data_end)
        {
            return format!("inside {}, which was freed (use after free)", a.describe());
        }
        // The nearest allocation below.
        if let Some((_, a)) = self.live.range(..=addr).next_back() {
            if addr < a.data_end + TAIL_GUARD {
                return format!(
                    "{} bytes past the end of {}",
                    addr - (a.base + a.size),
                    a.describe()
                );
            }
        }
        if let Some((_, a)) = self.live.range(addr..).next() {
            if a.map <= addr {
                return format!(
                    "{} bytes before the start of {}",
                    a.base - addr,
                    a.describe()
                );
            }
        }
        "not in any allocation".into()
    }

    /// The red-zone damage of the live allocations reachable from `pointers` (a launch's pointer
    /// arguments), as messages.
    pub fn check_red_zones(&self, pointers: &[usize]) -> Vec<String> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for &p in pointers {
            if let Some(a) = self.find_pointer(p) {
                if seen.contains(&a.id) {
                    continue;
                }
                seen.push(a.id);
                if let Some(off) = a.damaged_red_zone() {
                    out.push(red_zone_text(a, off));
                }
            }
        }
        out
    }

    /// Unmaps everything (the context was reset).
    pub fn clear(&mut self) {
        for (_, a) in std::mem::take(&mut self.live) {
            // SAFETY: whole mappings of allocations dropped with the context.
            unsafe { libc::munmap(a.map as *mut libc::c_void, a.map_len) };
        }
        for a in std::mem::take(&mut self.freed) {
            // SAFETY: as above.
            unsafe { libc::munmap(a.map as *mut libc::c_void, a.map_len) };
        }
        self.in_use = 0;
    }
}

fn red_zone_text(a: &Allocation, off: isize) -> String {
    if off < 0 {
        format!(
            "{} bytes before the start of {} were written (out of bounds)",
            -off,
            a.describe()
        )
    } else {
        format!(
            "byte {} of {} was written ({} past its end; out of bounds)",
            off,
            a.describe(),
            off as usize - a.size
        )
    }
}
