// Shared by every fuzz target (included with `#[path]`): an allocator that aborts on any single
// allocation over 1 GiB or more than 2 GiB live, so a huge allocation is a finding even without a
// sanitizer's malloc hooks (`-malloc_limit_mb` needs them; these targets build with `-s none`).
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

const MAX_ONE: usize = 1 << 30;
const MAX_LIVE: usize = 2 << 30;

pub struct Limited;
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over(size: usize) -> ! {
    // No allocation here: write a fixed message and abort (libFuzzer reports the crash).
    let msg = b"==fuzz== allocation limit exceeded (over 1 GiB at once or 2 GiB live)\n";
    unsafe { libc_write(2, msg.as_ptr(), msg.len()) };
    let _ = size;
    std::process::abort()
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, n: usize) -> isize;
}

unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ONE || LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size() > MAX_LIVE {
            over(l.size());
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ONE || LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size() > MAX_LIVE {
            over(l.size());
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            let grow = new - l.size();
            if new > MAX_ONE || LIVE.fetch_add(grow, Ordering::Relaxed) + grow > MAX_LIVE {
                over(new);
            }
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Limited = Limited;
