// Deliberately broken kernels, built only for tests (tests/sim_faults.rs compiles this file with
// nvcc at test time; the simulator's host build registers them): each one commits a fault that
// the simulated CUDA device must report. Plus one correct kernel as the control. Not part of the
// embedded modules.
#include <cuda_fp16.h>
#include <stdint.h>

#include "../warp_ops.cuh"

#ifndef PT_DYNAMIC_SMEM
#define PT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// The control: out[i] = 2 * in[i] for i < n (grid-stride).
extern "C" __global__ void pt_test_scale(const float *__restrict__ in, float *__restrict__ out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = 2.0f * in[i];
}

// Writes `out[n + offset]` from thread 0 of block 0: past the end of an n-element buffer.
extern "C" __global__ void pt_test_oob_store(float *__restrict__ out, int n, int offset) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[n + offset] = 1.0f;
}

// Reads a float4 from `in + 1` (4-byte aligned, not 16): a misaligned vector access.
extern "C" __global__ void pt_test_misaligned(const float *__restrict__ in, float *__restrict__ out) {
    if (threadIdx.x == 0) {
        const float4 v = *reinterpret_cast<const float4 *>(in + 1);
        out[0] = v.x + v.y + v.z + v.w;
    }
}

// Warp 1 returns before the block's __syncthreads; the others wait there.
extern "C" __global__ void pt_test_early_return(float *__restrict__ out) {
    if (threadIdx.x >= 32 && threadIdx.x < 64) return;
    pt::sync_block();
    out[threadIdx.x] = 1.0f;
}

// Warps wait at two different __syncthreads.
extern "C" __global__ void pt_test_divergent_barrier(float *__restrict__ out) {
    if (threadIdx.x < 32) {
        pt::sync_block();
    } else {
        pt::sync_block();
    }
    out[threadIdx.x] = 1.0f;
}

// Loads a 64 x 8 tile of fp16 into shared memory with cp.async and reads it with ldmatrix:
//  mode 0: correct (wait_group 0, then __syncthreads, then ldmatrix);
//  mode 1: no __syncthreads between the wait and the ldmatrix (read-after-write hazard);
//  mode 2: two groups committed, wait_group 1 retires only the first, the ldmatrix reads the
//          second (data still in flight);
//  mode 3: correct load, then the tile is refilled right after the ldmatrix without a barrier
//          (write-after-read hazard).
// 64 threads; out[lane-major]: the ldmatrix registers (for the control's values).
extern "C" __global__ void pt_test_cp_async(const __half *__restrict__ src, uint32_t *__restrict__ out, int mode) {
    PT_DYNAMIC_SMEM(smem);
    __half *tile = reinterpret_cast<__half *>(smem); // 64 rows of 8 halves (16 B)
    const int t = threadIdx.x;
    if (mode == 2) {
        // Rows 0..31 in the first group, rows 32..63 in the second.
        if (t < 32) pt::cp_async_16(tile + t * 8, src + t * 8, true);
        pt::cp_async_commit();
        if (t >= 32) pt::cp_async_16(tile + t * 8, src + t * 8, true);
        pt::cp_async_commit();
        pt::cp_async_wait<1>();
    } else {
        pt::cp_async_16(tile + t * 8, src + t * 8, true);
        pt::cp_async_commit();
        pt::cp_async_wait<0>();
    }
    if (mode != 1) pt::sync_block();
    const int warp = t / 32, lane = t % 32;
    uint32_t r[4];
    // Warp w reads rows 32w .. 32w + 31 (four 8x8 matrices).
    pt::ldmatrix_x4(r, tile + (warp * 32 + lane) * 8);
    if (mode == 3) {
        // Refill the other warp's rows before it is known to be done with them.
        pt::cp_async_16(tile + ((t + 32) % 64) * 8, src + t * 8, true);
        pt::cp_async_commit();
        pt::cp_async_wait<0>();
    }
    for (int i = 0; i < 4; ++i) out[t * 4 + i] = r[i];
}

// Thread t writes shared word t, then (with no barrier) reads word t ^ 32, which another warp
// wrote: a plain shared-memory race (found by the ThreadSanitizer build, scripts/sim --racecheck).
extern "C" __global__ void pt_test_smem_race(float *__restrict__ out) {
    PT_DYNAMIC_SMEM(smem);
    float *s = reinterpret_cast<float *>(smem);
    const int t = threadIdx.x;
    s[t] = static_cast<float>(t);
    out[t] = s[t ^ 32];
}

// Needs `bytes` of dynamic shared memory and touches all of it (a launch over 48 KB needs the
// opt-in attribute).
extern "C" __global__ void pt_test_big_smem(float *__restrict__ out, int bytes) {
    PT_DYNAMIC_SMEM(smem);
    float *s = reinterpret_cast<float *>(smem);
    const int n = bytes / 4;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 1.0f;
    pt::sync_block();
    if (threadIdx.x == 0) out[0] = s[n - 1];
}
