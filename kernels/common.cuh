// Device helpers shared by every kernel family: grid-stride indexing, warp/block reductions,
// alignment tests. Header-only, everything __device__ __forceinline__ so no call frames appear
// (build.rs rejects kernels with a non-zero stack frame).
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "abi.h"

#ifndef PT_DYNAMIC_SMEM
#define PT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pt {

// Index of this thread in the whole grid and the grid's thread count, as 64-bit values so that
// grid-stride loops over more than 2^31 elements stay correct.
__device__ __forceinline__ int64_t global_thread_index() {
    return (int64_t)blockIdx.x * (int64_t)blockDim.x + (int64_t)threadIdx.x;
}

__device__ __forceinline__ int64_t grid_thread_count() {
    return (int64_t)gridDim.x * (int64_t)blockDim.x;
}

// True when `p` is aligned to `bytes` (a power of two): the vectorised paths need 8/16 bytes.
__device__ __forceinline__ bool is_aligned(const void *p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Sum of `v` over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024). `scratch` is shared
// memory of at least 32 floats. The result is valid in thread 0 only. Contains __syncthreads():
// every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (int)(blockDim.x >> 5);
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = 0.0f;
    if (warp == 0) {
        total = lane < n_warps ? scratch[lane] : 0.0f;
        total = warp_sum(total);
    }
    return total;
}

}  // namespace pt
