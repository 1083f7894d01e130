// Host shim: lets the CUDA kernel sources compile with a C++20 host compiler and run on the CPU.
//
// Every thread of a block is a real std::thread running the kernel body concurrently; blocks run
// one after another (so a launch's dynamic shared memory is one buffer). threadIdx, blockIdx,
// blockDim and gridDim are thread-local; __syncthreads (pt::sync_block) is a real barrier across
// the block's threads; warp-collective operations (host/warp_ops_emu.h) exchange through per-warp
// storage with a barrier across the warp's 32 threads. Launches are serialised by a mutex.
#pragma once

#include <cuda_fp16.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace pt_emu {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// A reusable barrier for `n` threads (futex-backed waits through std::atomic::wait).
class Barrier {
  public:
    explicit Barrier(int n) : n_(n) {}
    void wait() {
        const unsigned gen = gen_.load(std::memory_order_acquire);
        if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
            count_.store(0, std::memory_order_relaxed);
            gen_.fetch_add(1, std::memory_order_acq_rel);
            gen_.notify_all();
            return;
        }
        for (int spin = 0; spin < 64; ++spin)
            if (gen_.load(std::memory_order_acquire) != gen) return;
        while (gen_.load(std::memory_order_acquire) == gen) gen_.wait(gen, std::memory_order_acquire);
    }

  private:
    const int n_;
    std::atomic<int> count_{0};
    std::atomic<unsigned> gen_{0};
};

// Exchange storage of one warp: two slots (alternating per collective operation, so one barrier
// per operation suffices) of 8 words and one address per lane.
struct Warp {
    Barrier bar{32};
    uint32_t words[2][32][8];
    const void *addrs[2][32];
};

struct Block {
    explicit Block(unsigned threads) : bar(static_cast<int>(threads)), warps((threads + 31) / 32) {}
    Barrier bar;
    std::vector<Warp> warps;
    unsigned char *smem = nullptr;
    size_t smem_bytes = 0;
};

struct ThreadState {
    Block *block = nullptr;
    Warp *warp = nullptr;
    unsigned lane = 0;
    unsigned phase = 0; // which exchange slot the next warp operation uses
};

inline thread_local ThreadState tls;

// ldmatrix phases (one 8x8 matrix: 8 row addresses of 16 B) whose rows share a shared-memory bank
// group (banks of 4 B, 32 of them: a 16-byte row covers 4), i.e. would serialise on the GPU.
inline std::atomic<unsigned long long> ldmatrix_bank_conflicts{0};

[[noreturn]] inline void fail(const char *what, const void *addr) {
    std::fprintf(stderr, "prefix-tune host emulation: %s (address %p, block %p + %zu bytes)\n", what,
                 addr, static_cast<void *>(tls.block->smem), tls.block->smem_bytes);
    std::abort();
}

// What the hardware requires of a shared-memory operand of `bytes` bytes: 16-byte alignment (for
// ldmatrix rows and cp.async) and lying inside the block's dynamic shared memory.
inline void check_smem(const void *addr, size_t bytes, const char *op) {
    const auto *p = static_cast<const unsigned char *>(addr);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(op, addr);
    if (p < tls.block->smem || p + bytes > tls.block->smem + tls.block->smem_bytes) fail(op, addr);
}

} // namespace pt_emu

inline thread_local pt_emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define PT_DYNAMIC_SMEM(name) unsigned char *name = pt_emu::tls.block->smem

inline float atomicAdd(float *addr, float v) {
    return std::atomic_ref<float>(*addr).fetch_add(v, std::memory_order_relaxed);
}

namespace pt_emu {

// Runs `kernel` over the grid: `threads` OS threads, each looping over the blocks in order.
// Shared memory is filled with 0x7f bytes (fp16 NaN) first so a read of unwritten smem shows.
inline void launch(Dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()> &kernel) {
    static std::mutex launch_mutex;
    std::lock_guard<std::mutex> guard(launch_mutex);
    if (threads == 0 || threads % 32 != 0) throw std::runtime_error("block size must be a multiple of 32");
    std::vector<uint4> smem((smem_bytes + 15) / 16 + 1);
    std::memset(smem.data(), 0x7f, smem.size() * sizeof(uint4));
    Block block(threads);
    block.smem = reinterpret_cast<unsigned char *>(smem.data());
    block.smem_bytes = smem_bytes;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned tid = 0; tid < threads; ++tid) {
        pool.emplace_back([&, tid] {
            tls.block = &block;
            tls.warp = &block.warps[tid / 32];
            tls.lane = tid % 32;
            tls.phase = 0;
            blockDim = Dim3{threads, 1, 1};
            gridDim = grid;
            threadIdx = Dim3{tid, 0, 0};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = Dim3{x, y, z};
                        kernel();
                        block.bar.wait(); // the block is finished before the next starts
                    }
        });
    }
    for (auto &t : pool) t.join();
}

} // namespace pt_emu
