// The CUDA simulator's host shim: lets the kernel sources compile with a C++20 host compiler and
// run under the simulated driver's launch engine (kernels/host/sim_runtime.cpp, linked into
// sim/cuda). Built with -DPT_HOST_EMULATION -DPT_SIM.
//
// Execution model. Every CUDA thread of a block is a fiber (a user-level thread with its own
// stack); the fibers of one block run on one OS thread, switching only where CUDA threads meet:
// at __syncthreads (pt::sync_block), at the warp collectives of sim_warp_ops.h (mma, ldmatrix,
// shuffles: the lanes exchange through per-warp storage), and, in the scheduling mode, at random
// extra points. The blocks of a launch run on one or more *slots* (OS threads, each resident block
// with its own shared memory), so several blocks run at once with real concurrency between them.
// threadIdx/blockIdx/blockDim/gridDim and self() (the CUDA thread's state) follow the fiber.
// Because a fiber runs until it reaches a meeting point, a thread that reads shared memory another
// thread writes without a barrier in between sees the other thread's write only if the scheduler
// happened to run that thread first: a missing barrier shows up as poison or stale data, and the
// scheduling mode's random order makes both outcomes happen.
//
// Checks (compute-sanitizer's tools, see sim/cuda/src/config.rs for how they are selected):
//   - synccheck: a thread that returns while others wait at a barrier (or before the others reach
//     one), threads of a block waiting at different barriers, lanes of a warp at different
//     collectives or with other member masks, and a block in which no thread can make progress:
//     reported with the call sites, never a hang;
//   - memcheck: shared-memory operands of ldmatrix/cp.async inside the block's allocation and
//     16-byte aligned; plain accesses past the end of shared memory hit a guard page;
//   - initcheck: shared memory is poisoned (0xff: fp16/fp32 NaN) for every block;
//   - hazards (racecheck for the operations that go through the wrappers): cp.async is modelled as
//     asynchronous (its data lands at the cp.async.wait_group that retires its group; until then the
//     destination is poisoned and marked in flight), with shadow state per 16-byte chunk of shared
//     memory: ldmatrix of data still in flight, ldmatrix of data landed in the same barrier interval
//     (read-after-write without a barrier), and a cp.async refill of data read in the same interval
//     (write-after-read) are reported with the kernel, the call sites and the threads. Plain
//     shared-memory loads and stores are left to the ThreadSanitizer build (racecheck flavour), in
//     which __syncthreads orders memory and warp collectives do not (as on the GPU).
// A check that fails aborts the launch: the thread records the fault (first one wins) and unwinds;
// the block's other threads unwind when they next run.
#pragma once

#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <source_location>
#include <string>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif

#ifdef PTSIM_TSAN
extern "C" {
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
// The simulator's own bookkeeping (barrier counters, exchange slots, shadow state) is not the
// kernel's memory: its functions are not instrumented, so only the kernels' accesses are checked.
#define PTSIM_NO_TSAN __attribute__((no_sanitize_thread, noinline))
#define PTSIM_TSAN_ACQUIRE(p) __tsan_acquire(p)
#define PTSIM_TSAN_RELEASE(p) __tsan_release(p)
#define PTSIM_TSAN_IGNORE_BEGIN() __tsan_ignore_thread_begin()
#define PTSIM_TSAN_IGNORE_END() __tsan_ignore_thread_end()
#else
#define PTSIM_NO_TSAN
#define PTSIM_TSAN_ACQUIRE(p) ((void)0)
#define PTSIM_TSAN_RELEASE(p) ((void)0)
#define PTSIM_TSAN_IGNORE_BEGIN() ((void)0)
#define PTSIM_TSAN_IGNORE_END() ((void)0)
#endif

namespace ptsim {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

using Site = std::source_location;

// What went wrong in a launch (mapped to a CUresult by the driver).
enum FaultKind : int {
    FAULT_NONE = 0,
    FAULT_ILLEGAL_ADDRESS = 1, // CUDA_ERROR_ILLEGAL_ADDRESS
    FAULT_MISALIGNED = 2,      // CUDA_ERROR_MISALIGNED_ADDRESS
    FAULT_SYNC = 3,            // barrier / collective misuse (CUDA_ERROR_LAUNCH_FAILED)
    FAULT_HAZARD = 4,          // shared-memory hazard (CUDA_ERROR_LAUNCH_FAILED)
    FAULT_HANG = 5,            // no progress (CUDA_ERROR_LAUNCH_TIMEOUT)
    FAULT_TRAP = 6,            // illegal instruction / trap (CUDA_ERROR_ILLEGAL_INSTRUCTION)
    FAULT_INTERNAL = 7,        // the engine itself (CUDA_ERROR_UNKNOWN)
};

// A barrier of `n` threads of one block (all its fibers run on one OS thread: plain fields).
struct Barrier {
    int n = 0;
    int count = 0;
    uint32_t gen = 0;
    const char *file = nullptr; // where the waiting threads are
    unsigned line = 0;
};

// One warp's exchange storage: two slots (alternating per collective, so one barrier per
// operation suffices) of 8 words, one address and one member mask per lane, plus the call site of
// each lane's collective for the divergence check.
struct Warp {
    Barrier bar;
    unsigned lanes = 32; // lanes that exist (a partial last warp has fewer)
    int exited = 0;      // lanes that returned from the kernel
    uint32_t words[2][32][8];
    const void *addrs[2][32];
    uint32_t masks[2][32];
    const char *site_file[2][32];
    unsigned site_line[2][32];
    const char *op[2][32];
};

// Shadow state of one 16-byte chunk of shared memory (see the header).
struct Chunk {
    uint32_t landed_epoch = UINT32_MAX; // barrier interval in which cp.async data landed here
    int32_t writer = -1;                // thread whose cp.async landed here
    const char *landed_file = nullptr;
    uint32_t landed_line = 0;
    int32_t inflight_owner = -1; // thread whose cp.async here is not retired
    const char *inflight_file = nullptr;
    uint32_t inflight_line = 0;
    uint32_t read_epoch = UINT32_MAX; // interval of the last ldmatrix read
    int32_t reader = -1;              // a thread of the warp that read it
    const char *read_file = nullptr;
    uint32_t read_line = 0;
};

struct Block {
    unsigned threads = 0;
    Barrier bar;
    std::unique_ptr<Warp[]> warps;
    unsigned n_warps = 0;
    unsigned char *smem = nullptr;
    size_t smem_bytes = 0;
    int exited = 0;
    uint32_t epoch = 0; // completed block barriers: the current barrier interval
    std::unique_ptr<Chunk[]> shadow; // one per 16 bytes of shared memory
    size_t shadow_len = 0;
    // Call sites of the arrivals at the current barrier generation (one per thread).
    std::unique_ptr<const char *[]> arrival_file;
    std::unique_ptr<unsigned[]> arrival_line;
    uint64_t progress = 0; // barriers and collectives passed, threads ended (deadlock detection)
};

// One cp.async not yet retired by a wait_group: its data (read from global memory at issue time)
// lands in `dst` when its group is retired.
struct Pending {
    unsigned char *dst;
    unsigned char data[16];
    uint64_t group;
    const char *file;
    unsigned line;
};

// The state of one CUDA thread (one fiber).
struct ThreadState {
    Block *block = nullptr;
    Warp *warp = nullptr;
    unsigned tid = 0, lane = 0, warp_index = 0;
    unsigned phase = 0;     // which exchange slot the next warp operation uses
    bool in_kernel = false; // a fault signal now belongs to the simulated kernel
    sigjmp_buf *unwind = nullptr;
    std::vector<Pending> pending;
    uint64_t open_group = 0; // cp.async group the next cp.async joins (committed groups < it)
    Dim3 thread_idx;
};

// The CUDA thread running on this OS thread now (set by the engine at every fiber switch).
inline thread_local ThreadState *g_self = nullptr;
inline ThreadState &self() { return *g_self; }

// Defined by the engine (sim_runtime.cpp).
// Records a fault of the current launch (the first one wins) and unwinds this thread to the
// engine; never returns.
[[noreturn]] void raise_fault(FaultKind kind, const std::string &message);
// Unwinds this thread because the launch was aborted by another thread's fault.
[[noreturn]] void unwind_aborted();
// True once any thread of the launch faulted.
bool launch_aborted();
// Lets the other CUDA threads of the block run (this one stays runnable).
void yield_fiber();
// In the scheduling mode, sometimes lets other threads run first (at barriers and collectives).
void jitter();
// Whether the hazard checks (shadow state) are on.
bool hazards_enabled();
// A barrier the mutation tests disable (PTSIM_SKIP_BARRIER=file:line): true to skip it.
bool barrier_skipped(const Site &s);
// wait_group count adjustment for a mutated call site (PTSIM_WAIT_GROUP=file:line:delta).
int wait_group_delta(const Site &s);

std::string where(const Site &s);
// A kernel source path from kernels/ on.
std::string short_file(const char *file);
std::string thread_name(int tid);

// Lets the others run until `bar` completes its generation `seen`; unwinds if the launch aborts.
PTSIM_NO_TSAN inline void wait_generation(Barrier &bar, uint32_t seen) {
    while (bar.gen == seen) {
        if (launch_aborted()) unwind_aborted();
        yield_fiber();
    }
    if (launch_aborted()) unwind_aborted();
}

// __syncthreads: every thread of the block, at the same barrier.
PTSIM_NO_TSAN inline void block_barrier(const Site &s) {
    ThreadState &me = self();
    Block &b = *me.block;
    if (barrier_skipped(s)) return;
    jitter();
    if (launch_aborted()) unwind_aborted();
    b.arrival_file[me.tid] = s.file_name();
    b.arrival_line[me.tid] = s.line();
    b.bar.file = s.file_name();
    b.bar.line = s.line();
    if (b.exited > 0) {
        raise_fault(FAULT_SYNC, "barrier at " + where(s) + ": " + std::to_string(b.exited) +
                                    " thread(s) of the block already returned from the kernel and will never reach it (" +
                                    thread_name(static_cast<int>(me.tid)) + " waits there)");
    }
    PTSIM_TSAN_RELEASE(&b.bar);
    const uint32_t seen = b.bar.gen;
    ++b.progress;
    if (++b.bar.count == b.bar.n) {
        // The last one: every arrival must be at the same call site.
        for (unsigned t = 0; t < b.threads; ++t) {
            if (b.arrival_line[t] != s.line() || std::strcmp(b.arrival_file[t], s.file_name()) != 0) {
                raise_fault(FAULT_SYNC, "divergent barriers: " + thread_name(static_cast<int>(t)) + " waits at " +
                                            short_file(b.arrival_file[t]) + ":" + std::to_string(b.arrival_line[t]) +
                                            ", " + thread_name(static_cast<int>(me.tid)) + " at " + where(s));
            }
        }
        b.bar.count = 0;
        ++b.epoch;
        ++b.bar.gen;
        ++b.progress;
    } else {
        wait_generation(b.bar, seen);
    }
    PTSIM_TSAN_ACQUIRE(&b.bar);
}

// Called when a thread returns from the kernel: if others wait at a barrier, that is a fault.
PTSIM_NO_TSAN inline void thread_exited() {
    ThreadState &me = self();
    Block &b = *me.block;
    ++b.exited;
    ++b.progress;
    if (b.bar.count > 0) {
        raise_fault(FAULT_SYNC, thread_name(static_cast<int>(me.tid)) + " returned from the kernel while " +
                                    std::to_string(b.bar.count) + " thread(s) wait at the barrier at " +
                                    short_file(b.bar.file) + ":" + std::to_string(b.bar.line));
    }
    Warp &w = *me.warp;
    ++w.exited;
    if (w.bar.count > 0) {
        raise_fault(FAULT_SYNC, thread_name(static_cast<int>(me.tid)) +
                                    " returned from the kernel while other lanes of its warp wait at a warp collective (" +
                                    short_file(w.bar.file) + ":" + std::to_string(w.bar.line) + ")");
    }
}

} // namespace ptsim

inline thread_local ptsim::Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define PT_DYNAMIC_SMEM(name) unsigned char *name = ptsim::self().block->smem

// Atomics the kernels use (relaxed, as on the GPU: blocks of other slots run concurrently).
inline float atomicAdd(float *addr, float v) {
    return std::atomic_ref<float>(*addr).fetch_add(v, std::memory_order_relaxed);
}
inline int atomicAdd(int *addr, int v) {
    return std::atomic_ref<int>(*addr).fetch_add(v, std::memory_order_relaxed);
}
inline unsigned atomicAdd(unsigned *addr, unsigned v) {
    return std::atomic_ref<unsigned>(*addr).fetch_add(v, std::memory_order_relaxed);
}
