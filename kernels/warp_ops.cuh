// Warp-level operations of the kernels: the ONLY place with inline PTX.
//
// Each operation is one small wrapper: on the device, inline PTX; under PT_HOST_EMULATION (the
// simulated CUDA device's host build, sim/cuda), the exact emulation in host/sim_warp_ops.h (same
// fragment layouts as the PTX ISA, lanes exchanging through per-warp storage, with the
// simulator's checks). Kernels never write PTX or __shfl*/__syncthreads themselves.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", .f16), g = lane>>2, t = lane&3:
//   A (16x16, row): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16x8,  col): b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 2t+8.., n = g)
//   C/D (16x8, f32): c[0], c[1] = (g, 2t..2t+1), c[2], c[3] = (g+8, 2t..2t+1)
// ldmatrix .x4: lanes 8i..8i+7 give the 8 row addresses (16 B each) of matrix i; register i of
// lane l holds row l/4, columns 2(l%4)..+1 of matrix i (.trans: of the transposed matrix).
#pragma once

#include <stdint.h>

#if defined(PT_HOST_EMULATION) && !defined(__CUDA_ARCH__)
#include "host/sim_warp_ops.h"
#else

namespace pt {

// D = A * B + C, m16n8k16, f16 inputs, f32 accumulation.
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2],
                                          const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory; `row` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// 16-byte asynchronous copy global -> shared; when !valid the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes));
}

// 16-byte asynchronous copy global -> shared of a row known to be valid (no zero-fill operand).
__device__ __forceinline__ void cp_async_16_always(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x with the MUFU.EX2 unit (ex2.approx.ftz.f32: max relative error 2^-22 in the PTX ISA's
// words "2 ulp"; subnormal inputs and results are flushed to zero; ex2(-inf) = +0).
__device__ __forceinline__ float ex2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

// Butterfly exchange within the warp (all lanes participate).
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n"
                 : "=f"(r)
                 : "f"(v), "r"(lane_mask));
    return r;
}

// Barrier across the thread block (every thread must reach it).
__device__ __forceinline__ void sync_block() { asm volatile("bar.sync 0;\n" ::: "memory"); }

} // namespace pt

#endif
