// Helpers of the model-layer kernels (embedding, norm, activation, rope, cross_entropy): grid-
// stride indexing and warp/block reductions written ONLY with the wrappers of warp_ops.cuh
// (pt::shfl_xor, pt::sync_block) and dynamic shared memory, so that the same sources run on the
// GPU and in the host emulation (kernels/host/). Header-only, everything forced inline (build.rs
// rejects stack frames).
#pragma once

#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "abi/model_ops.h"
#include "warp_ops.cuh"

#ifndef PT_DYNAMIC_SMEM
#define PT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pt {
namespace ops {

// 64-bit grid-stride indexing (more than 2^31 elements stay correct).
__device__ __forceinline__ int64_t thread_index() {
    return (int64_t)blockIdx.x * (int64_t)blockDim.x + (int64_t)threadIdx.x;
}

__device__ __forceinline__ int64_t thread_count() {
    return (int64_t)gridDim.x * (int64_t)blockDim.x;
}

__device__ __forceinline__ float ld(const __half *p, int64_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void st(__half *p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// Sum over the 32 lanes of a warp; every lane gets the result. Every lane must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
    return v;
}

// Online-softmax pair (running max m, sum s of exp(x - m)): merges another pair into this one.
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return; // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Merges (m, s) over the warp; every lane gets the result.
__device__ __forceinline__ void warp_lse(float &m, float &s) {
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) {
        const float m2 = shfl_xor(m, k);
        const float s2 = shfl_xor(s, k);
        lse_merge(m, s, m2, s2);
    }
}

// Block-wide sum (blockDim.x a multiple of 32, at most 32 warps) through `scratch` (32 floats of
// shared memory); every thread gets the result. Every thread must call it; it synchronises the
// block twice, so the scratch can be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = (int)(blockDim.x >> 5);
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    sync_block();
    float t = lane < n_warps ? scratch[lane] : 0.0f;
    t = warp_sum(t);
    sync_block();
    return t;
}

// Block-wide online-softmax merge through `scratch` (2 x 32 floats); every thread gets (m, s).
__device__ __forceinline__ void block_lse(float &m, float &s, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = (int)(blockDim.x >> 5);
    warp_lse(m, s);
    if (lane == 0) {
        scratch[warp] = m;
        scratch[32 + warp] = s;
    }
    sync_block();
    m = lane < n_warps ? scratch[lane] : -INFINITY;
    s = lane < n_warps ? scratch[32 + lane] : 0.0f;
    warp_lse(m, s);
    sync_block();
}

} // namespace ops
} // namespace pt
