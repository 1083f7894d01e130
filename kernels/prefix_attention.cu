// Fused prefix attention, forward and backward (FlashAttention-2 design).
//
// Keys/values are [prefix ++ sequence] without ever materialising the concatenation: a CTA walks
// the prefix tiles (read from the bank entry of its sequence, always visible) and then the causal
// sequence tiles. Layouts, masking and the launch shapes are documented in abi/attention.h.
//
// Forward: one CTA per (64-query block, batch*query head); Q in shared memory, K/V tiles
// double-buffered with cp.async; S = Q K^T on tensor cores (mma.m16n8k16 through warp_ops.cuh),
// online softmax in base 2 (log2(e) folded into the scale), P converted in registers into the A
// operand of P V (V read with ldmatrix.trans). Writes O (fp16) and the natural-log LSE (fp32).
//
// Backward:
//  1. prefix_attn_bwd_preprocess: delta = rowsum(dO * O); zeroes the fp32 dQ accumulator.
//  2. prefix_attn_bwd_dkdv: one CTA per (key block, batch*kv head), key blocks being the prefix
//     blocks then the sequence blocks. It streams every query block of every query head of the
//     group that sees its keys, recomputes P^T from the LSE, and keeps dK/dV in registers (so the
//     GQA sum over query heads is free). Sequence blocks write dK/dV; prefix blocks write fp32
//     per-sequence partials. In atomic mode it also writes dS^T to shared memory and adds
//     dQ += dS K into the fp32 accumulator with atomics.
//  3a. atomic mode: prefix_attn_bwd_dq_convert turns the accumulator into fp16 dQ.
//  3b. deterministic mode: prefix_attn_bwd_dq recomputes S and dP per query block (the forward's
//      structure) and accumulates dQ in registers: no atomics, bitwise reproducible, at the cost
//      of two more tensor-core GEMMs per tile (about 1.6x the backward's tensor work).
//  4. prefix_attn_bwd_prefix_reduce: d(prefix K/V) = sum of the partials of the sequences using
//     each prefix, in batch order (deterministic in both modes).
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "abi/attention.h"
#include "attention_traits.cuh"
#include "warp_ops.cuh"

#ifndef PT_DYNAMIC_SMEM
#define PT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pt {

// Sizes plus the buffers of one call (the kernels' separate pointer arguments, gathered; the
// ones a kernel does not take are null).
struct PrefixAttnParams : pt_attn_params {
    const __half *q = nullptr, *k = nullptr, *v = nullptr, *prefix_k = nullptr, *prefix_v = nullptr;
    const int32_t *prefix_index = nullptr, *valid_len = nullptr;
    __half *o = nullptr;
    float *lse = nullptr;
    const __half *d_o = nullptr;
    float *delta = nullptr, *dq_accum = nullptr, *dpk_partial = nullptr, *dpv_partial = nullptr;
    __half *dq = nullptr, *dk = nullptr, *dv = nullptr, *d_prefix_k = nullptr, *d_prefix_v = nullptr;
    __device__ explicit PrefixAttnParams(const pt_attn_params &s) : pt_attn_params(s) {}
};

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Tile movement and warp GEMMs.

// ROWS x D tile from global (row stride D) to shared (row stride LD) with cp.async; rows at or
// past `valid_rows` are zero-filled.
template <int ROWS, int D, int LD, int THREADS>
__device__ __forceinline__ void load_tile_async(__half *s, const __half *g, int row0,
                                                int valid_rows, int tid) {
    constexpr int kChunks = D / 8; // 16-byte chunks per row
#pragma unroll
    for (int c = tid; c < ROWS * kChunks; c += THREADS) {
        const int r = c / kChunks, cc = c % kChunks;
        const bool ok = row0 + r < valid_rows;
        const __half *src = ok ? g + (size_t)(row0 + r) * D + cc * 8 : g;
        cp_async_16(s + r * LD + cc * 8, src, ok);
    }
}

// acc[NT][4] += A (16 x K, smem rows at sA, stride LDA) * B^T, B given as NT*8 rows of K
// (smem rows at sB, stride LDB): both operands read with plain ldmatrix.
template <int NT, int K, int LDA, int LDB>
__device__ __forceinline__ void warp_gemm_ss_nt(float (*acc)[4], const __half *sA,
                                                const __half *sB, int lane) {
    static_assert(NT % 2 == 0 && K % 16 == 0, "tile");
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4(a, sA + (lane % 16) * LDA + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            ldmatrix_x4(b, sB + (nn * 16 + (lane % 8) + 8 * (lane / 16)) * LDB + kk * 16 +
                               8 * ((lane / 8) % 2));
            mma_16816(acc[2 * nn], a, b, acc[2 * nn]);
            mma_16816(acc[2 * nn + 1], a, b + 2, acc[2 * nn + 1]);
        }
    }
}

// acc[NT][4] += A (16 x 16*KT, in registers as A fragments) * B, B stored row-major K x (NT*8)
// in shared memory (stride LDB), read with ldmatrix.trans.
template <int NT, int KT, int LDB>
__device__ __forceinline__ void warp_gemm_rs_nn(float (*acc)[4], const uint32_t (*a)[4],
                                                const __half *sB, int lane) {
    static_assert(NT % 2 == 0, "tile");
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LDB +
                                     nn * 16 + 8 * (lane / 16));
            mma_16816(acc[2 * nn], a[kk], b, acc[2 * nn]);
            mma_16816(acc[2 * nn + 1], a[kk], b + 2, acc[2 * nn + 1]);
        }
    }
}

// C fragments of a 16 x (16*KT) f32 tile -> A fragments (fp16) of the next GEMM.
template <int KT>
__device__ __forceinline__ void acc_to_a(uint32_t (*a)[4], const float (*acc)[4]) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        a[kk][0] = pack_half2(acc[2 * kk][0], acc[2 * kk][1]);
        a[kk][1] = pack_half2(acc[2 * kk][2], acc[2 * kk][3]);
        a[kk][2] = pack_half2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        a[kk][3] = pack_half2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

template <int NT> __device__ __forceinline__ void zero_acc(float (*acc)[4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
}

// Reductions over the 4 lanes holding one accumulator row.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, shfl_xor(v, 1));
    return fmaxf(v, shfl_xor(v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += shfl_xor(v, 1);
    return v + shfl_xor(v, 2);
}

// ---------------------------------------------------------------------------------------------
// The key walk shared by the forward and the dQ kernel: prefix tiles, then causal sequence tiles.

struct KeyWalk {
    const __half *k_pre, *v_pre, *k_seq, *v_seq;
    int n_pre_tiles, n_tiles, prefix, valid_len;

    __device__ __forceinline__ bool is_prefix(int it) const { return it < n_pre_tiles; }
    __device__ __forceinline__ int row0(int it, int bn) const {
        return (it < n_pre_tiles ? it : it - n_pre_tiles) * bn;
    }
};

template <int BN>
__device__ __forceinline__ KeyWalk make_walk(const PrefixAttnParams &p, int b, int hk, int m0,
                                             int BM, int vl) {
    KeyWalk w;
    const int D = p.head_dim, T = p.seq;
    // A negative prefix index: this sequence sees no prefix (the walk has no prefix tiles).
    const int pi = p.prefix > 0 ? p.prefix_index[b] : 0;
    const int P = pi < 0 ? 0 : p.prefix;
    const size_t pre_off = ((size_t)imax(pi, 0) * p.kv_heads + hk) * (size_t)P * D;
    const size_t seq_off = ((size_t)b * p.kv_heads + hk) * (size_t)T * D;
    w.k_pre = p.prefix_k + pre_off;
    w.v_pre = p.prefix_v + pre_off;
    w.k_seq = p.k + seq_off;
    w.v_seq = p.v + seq_off;
    w.n_pre_tiles = cdiv(P, BN);
    const int seq_end = imin(m0 + BM, vl); // keys past the block's last valid query are unseen
    w.n_tiles = w.n_pre_tiles + cdiv(seq_end, BN);
    w.prefix = P;
    w.valid_len = vl;
    return w;
}

template <class Tr>
__device__ __forceinline__ void load_kv_tile(const KeyWalk &w, int it, __half *sK, __half *sV,
                                             int tid) {
    const bool pre = w.is_prefix(it);
    const int r0 = w.row0(it, Tr::kBlockN);
    const int rows = pre ? w.prefix : w.valid_len;
    load_tile_async<Tr::kBlockN, Tr::kHeadDim, Tr::kLd, Tr::kThreads>(sK, pre ? w.k_pre : w.k_seq,
                                                                       r0, rows, tid);
    load_tile_async<Tr::kBlockN, Tr::kHeadDim, Tr::kLd, Tr::kThreads>(sV, pre ? w.v_pre : w.v_seq,
                                                                       r0, rows, tid);
}

// Is key column `col` of tile `it` visible from query row `q`? (query-major tiles)
__device__ __forceinline__ bool key_visible(const KeyWalk &w, int it, int bn, int col, int q) {
    const int key = w.row0(it, bn) + col;
    return w.is_prefix(it) ? key < w.prefix : key <= q;
}

// Masks invisible scores of a warp's 16 x BN score tile to -inf.
template <int NT>
__device__ __forceinline__ void mask_scores(float (*s)[4], const KeyWalk &w, int it, int bn,
                                            int q_row0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int col = n * 8 + 2 * t + (i & 1);
            const int q = q_row0 + g + 8 * (i >> 1);
            if (!key_visible(w, it, bn, col, q)) s[n][i] = -INFINITY;
        }
}

// Online softmax step for the two rows (g, g+8) a thread holds: updates the running max and the
// (thread-partial) sum, rescales the output accumulator and turns s into P (unnormalised).
template <int NT, int NO>
__device__ __forceinline__ void online_softmax(float (*s)[4], float (*acc_o)[4], float row_max[2],
                                               float row_sum[2], float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = quad_max(mx);
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
        const float corr = exp2f(row_max[r] * scale_log2 - m_scaled);
        row_max[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pv = exp2f(s[n][2 * r + e] * scale_log2 - m_scaled);
                s[n][2 * r + e] = pv;
                sum += pv;
            }
        row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            acc_o[n][2 * r] *= corr;
            acc_o[n][2 * r + 1] *= corr;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <class Tr>
__device__ __forceinline__ void fwd_body(const PrefixAttnParams &p, unsigned char *smem) {
    constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int Hq = p.q_heads, group = Hq / p.kv_heads, T = p.seq;
    const int bh = blockIdx.y, b = bh / Hq, hk = (bh % Hq) / group;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM; // the longest rows first
    const int vl = p.valid_len[b];
    __half *O = p.o + (size_t)bh * T * D;
    float *L = p.lse + (size_t)bh * T;

    if (m0 >= vl) { // padding only: O = 0, LSE = 0
        for (int i = tid; i < BM * D / 2; i += Tr::kThreads) {
            const int r = m0 + i / (D / 2);
            if (r < T) reinterpret_cast<uint32_t *>(O + (size_t)r * D)[i % (D / 2)] = 0u;
        }
        for (int r = tid; r < BM; r += Tr::kThreads)
            if (m0 + r < T) L[m0 + r] = 0.f;
        return;
    }

    __half *sQ = reinterpret_cast<__half *>(smem);
    __half *sK = sQ + BM * LD; // [2][BN][LD]
    __half *sV = sK + 2 * BN * LD;
    const KeyWalk w = make_walk<BN>(p, b, hk, m0, BM, vl);
    const __half *Qg = p.q + (size_t)bh * T * D;

    load_tile_async<BM, D, LD, Tr::kThreads>(sQ, Qg, m0, vl, tid);
    load_kv_tile<Tr>(w, 0, sK, sV, tid);
    cp_async_commit();

    float acc_o[D / 8][4];
    zero_acc<D / 8>(acc_o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    const float scale_log2 = p.scale * kLog2e;
    const int q_row0 = m0 + warp * 16;

    for (int it = 0; it < w.n_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < w.n_tiles) {
            load_kv_tile<Tr>(w, it + 1, sK + (buf ^ 1) * BN * LD, sV + (buf ^ 1) * BN * LD, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        sync_block();
        const __half *k_t = sK + buf * BN * LD, *v_t = sV + buf * BN * LD;

        float s[BN / 8][4];
        zero_acc<BN / 8>(s);
        warp_gemm_ss_nt<BN / 8, D, LD, LD>(s, sQ + warp * 16 * LD, k_t, lane);
        mask_scores<BN / 8>(s, w, it, BN, q_row0, lane);
        online_softmax<BN / 8, D / 8>(s, acc_o, row_max, row_sum, scale_log2);
        uint32_t a_p[BN / 16][4];
        acc_to_a<BN / 16>(a_p, s);
        warp_gemm_rs_nn<D / 8, BN / 16, LD>(acc_o, a_p, v_t, lane);
        sync_block(); // everyone is done with this buffer before it is refilled
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[r]);
        const int q = q_row0 + g + 8 * r;
        const bool valid = q < vl;
        const float inv = valid ? 1.f / sum : 0.f;
        if (q < T) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                reinterpret_cast<uint32_t *>(O + (size_t)q * D + n * 8 + 2 * t)[0] =
                    pack_half2(acc_o[n][2 * r] * inv, acc_o[n][2 * r + 1] * inv);
            if (t == 0) L[q] = valid ? row_max[r] * p.scale + logf(sum) : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: delta = rowsum(dO * O), and zero the dQ accumulator (atomic mode).

__device__ __forceinline__ void bwd_preprocess_body(const PrefixAttnParams &p) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int D = p.head_dim, T = p.seq, bh = blockIdx.y, b = bh / p.q_heads;
    const int vl = p.valid_len[b];
    const __half *dO = p.d_o + (size_t)bh * T * D;
    const __half *O = p.o + (size_t)bh * T * D;
    constexpr int kWarps = PT_ATTN_THREADS / 32;
    for (int j = warp; j < PT_ATTN_PRE_ROWS; j += kWarps) {
        const int row = blockIdx.x * PT_ATTN_PRE_ROWS + j;
        if (row >= T) break; // uniform over the warp
        float acc = 0.f;
        if (row < vl)
            for (int d = lane; d < D; d += 32)
                acc += __half2float(dO[(size_t)row * D + d]) * __half2float(O[(size_t)row * D + d]);
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
        if (lane == 0) p.delta[(size_t)bh * T + row] = row < vl ? acc : 0.f;
        if (!p.deterministic)
            for (int d = lane; d < D; d += 32) p.dq_accum[((size_t)bh * T + row) * D + d] = 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 2: dK, dV (and prefix partials, and dQ atomics) per key block.

template <class Tr>
__device__ __forceinline__ void bwd_dkdv_body(const PrefixAttnParams &p, unsigned char *smem) {
    constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd;
    constexpr int LDS = BwdSmem<Tr>::kLdS;
    static_assert(BN == 16 * Tr::kWarps, "one 16-key slab per warp");
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int Hq = p.q_heads, Hkv = p.kv_heads, group = Hq / Hkv, T = p.seq, P = p.prefix;
    const int bk = blockIdx.y, b = bk / Hkv, hk = bk % Hkv;
    const int n_pre_blocks = cdiv(P, BN);
    const bool pre = (int)blockIdx.x < n_pre_blocks;
    const int n0 = (pre ? (int)blockIdx.x : (int)blockIdx.x - n_pre_blocks) * BN;
    const int vl = p.valid_len[b];
    const int n_keys = pre ? P : T;

    // Query blocks that see these keys: all valid rows for the prefix, rows >= n0 for the sequence.
    // A sequence without a prefix (negative index) gives its prefix blocks zero partials.
    const bool unseen = pre && p.prefix_index[b] < 0;
    const int q_lo = pre ? 0 : n0;
    const int mb_lo = q_lo / BM;
    const int n_mb = q_lo < vl && !unseen ? cdiv(vl, BM) - mb_lo : 0;
    const int n_steps = group * n_mb;

    __half *sK = reinterpret_cast<__half *>(smem);
    __half *sV = sK + BN * LD;
    __half *sQ = sV + BN * LD;       // [2][BM][LD]
    __half *sdO = sQ + 2 * BM * LD;  // [2][BM][LD]
    __half *sdS = sdO + 2 * BM * LD; // [BN][LDS]: dS^T
    float *sL = reinterpret_cast<float *>(sdS + BN * LDS); // [2][BM]: lse * log2(e)
    float *sDl = sL + 2 * BM;                               // [2][BM]: delta

    float acc_dk[D / 8][4], acc_dv[D / 8][4];
    zero_acc<D / 8>(acc_dk);
    zero_acc<D / 8>(acc_dv);

    if (n_steps > 0) {
        size_t kv_off;
        const __half *Kg, *Vg;
        if (pre) {
            kv_off = ((size_t)p.prefix_index[b] * Hkv + hk) * (size_t)P * D;
            Kg = p.prefix_k + kv_off;
            Vg = p.prefix_v + kv_off;
        } else {
            kv_off = ((size_t)b * Hkv + hk) * (size_t)T * D;
            Kg = p.k + kv_off;
            Vg = p.v + kv_off;
        }
        load_tile_async<BN, D, LD, Tr::kThreads>(sK, Kg, n0, n_keys, tid);
        load_tile_async<BN, D, LD, Tr::kThreads>(sV, Vg, n0, n_keys, tid);

        auto load_step = [&](int s, int buf) {
            const int bh = b * Hq + hk * group + s / n_mb;
            const int m0 = (mb_lo + s % n_mb) * BM;
            const __half *Qg = p.q + (size_t)bh * T * D;
            const __half *dOg = p.d_o + (size_t)bh * T * D;
            load_tile_async<BM, D, LD, Tr::kThreads>(sQ + buf * BM * LD, Qg, m0, vl, tid);
            load_tile_async<BM, D, LD, Tr::kThreads>(sdO + buf * BM * LD, dOg, m0, vl, tid);
            for (int r = tid; r < BM; r += Tr::kThreads) {
                const int q = m0 + r;
                // Padding rows get lse = +inf, so their P (and dS) is exactly 0.
                sL[buf * BM + r] = q < vl ? p.lse[(size_t)bh * T + q] * kLog2e : INFINITY;
                sDl[buf * BM + r] = q < vl ? p.delta[(size_t)bh * T + q] : 0.f;
            }
        };
        load_step(0, 0);
        cp_async_commit();

        const float scale_log2 = p.scale * kLog2e;
        const int key_row0 = n0 + warp * 16;
        for (int s = 0; s < n_steps; ++s) {
            const int buf = s & 1;
            if (s + 1 < n_steps) {
                load_step(s + 1, buf ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            sync_block();
            const int bh = b * Hq + hk * group + s / n_mb;
            const int m0 = (mb_lo + s % n_mb) * BM;
            const __half *q_t = sQ + buf * BM * LD, *do_t = sdO + buf * BM * LD;
            const float *l_t = sL + buf * BM, *dl_t = sDl + buf * BM;

            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
            float st[BM / 8][4], dpt[BM / 8][4];
            zero_acc<BM / 8>(st);
            zero_acc<BM / 8>(dpt);
            warp_gemm_ss_nt<BM / 8, D, LD, LD>(st, sK + warp * 16 * LD, q_t, lane);
            warp_gemm_ss_nt<BM / 8, D, LD, LD>(dpt, sV + warp * 16 * LD, do_t, lane);
#pragma unroll
            for (int n = 0; n < BM / 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int key = key_row0 + g + 8 * (i >> 1);
                    const int qc = n * 8 + 2 * t + (i & 1);
                    const bool ok = pre ? key < P : key <= m0 + qc;
                    const float pv = ok ? exp2f(st[n][i] * scale_log2 - l_t[qc]) : 0.f;
                    st[n][i] = pv;
                    dpt[n][i] = pv * (dpt[n][i] - dl_t[qc]);
                }
            uint32_t a_p[BM / 16][4], a_ds[BM / 16][4];
            acc_to_a<BM / 16>(a_p, st);
            acc_to_a<BM / 16>(a_ds, dpt);
            warp_gemm_rs_nn<D / 8, BM / 16, LD>(acc_dv, a_p, do_t, lane); // dV += P^T dO
            warp_gemm_rs_nn<D / 8, BM / 16, LD>(acc_dk, a_ds, q_t, lane); // dK += dS^T Q

            if (!p.deterministic) {
                // dQ += dS K: dS^T goes through shared memory; warp w owns columns [w*D/4, +D/4).
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        uint32_t *row = reinterpret_cast<uint32_t *>(
                            sdS + (warp * 16 + g + 8 * r) * LDS + kk * 16 + 2 * t);
                        row[0] = a_ds[kk][r];     // columns kk*16 + 2t..
                        row[4] = a_ds[kk][2 + r]; // columns kk*16 + 8 + 2t..
                    }
                sync_block();
                constexpr int WN = D / 4; // columns per warp
                float acc_dq[BM / 16][WN / 8][4];
#pragma unroll
                for (int mt = 0; mt < BM / 16; ++mt) zero_acc<WN / 8>(acc_dq[mt]);
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk) {
                    uint32_t bfr[WN / 16][4];
#pragma unroll
                    for (int nn = 0; nn < WN / 16; ++nn)
                        ldmatrix_x4_trans(bfr[nn], sK + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD +
                                                       warp * WN + nn * 16 + 8 * (lane / 16));
#pragma unroll
                    for (int mt = 0; mt < BM / 16; ++mt) {
                        uint32_t a[4];
                        ldmatrix_x4_trans(a, sdS + (kk * 16 + (lane % 8) + 8 * (lane / 16)) * LDS +
                                                 mt * 16 + 8 * ((lane / 8) % 2));
#pragma unroll
                        for (int nn = 0; nn < WN / 16; ++nn) {
                            mma_16816(acc_dq[mt][2 * nn], a, bfr[nn], acc_dq[mt][2 * nn]);
                            mma_16816(acc_dq[mt][2 * nn + 1], a, bfr[nn] + 2, acc_dq[mt][2 * nn + 1]);
                        }
                    }
                }
                float *dqa = p.dq_accum + (size_t)bh * T * D;
#pragma unroll
                for (int mt = 0; mt < BM / 16; ++mt)
#pragma unroll
                    for (int n = 0; n < WN / 8; ++n)
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int q = m0 + mt * 16 + g + 8 * (i >> 1);
                            const int d = warp * WN + n * 8 + 2 * t + (i & 1);
                            if (q < vl) atomicAdd(dqa + (size_t)q * D + d, acc_dq[mt][n][i] * p.scale);
                        }
            }
            sync_block(); // buffers of this step are free again
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + warp * 16 + g + 8 * r;
        if (key >= n_keys) continue;
        if (pre) {
            const size_t off = (((size_t)b * Hkv + hk) * P + key) * D;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int d = n * 8 + 2 * t;
                p.dpk_partial[off + d] = acc_dk[n][2 * r] * p.scale;
                p.dpk_partial[off + d + 1] = acc_dk[n][2 * r + 1] * p.scale;
                p.dpv_partial[off + d] = acc_dv[n][2 * r];
                p.dpv_partial[off + d + 1] = acc_dv[n][2 * r + 1];
            }
        } else {
            const size_t off = (((size_t)b * Hkv + hk) * T + key) * D;
            __half *dk = p.dk + off;
            __half *dv = p.dv + off;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int d = n * 8 + 2 * t;
                reinterpret_cast<uint32_t *>(dk + d)[0] =
                    pack_half2(acc_dk[n][2 * r] * p.scale, acc_dk[n][2 * r + 1] * p.scale);
                reinterpret_cast<uint32_t *>(dv + d)[0] = pack_half2(acc_dv[n][2 * r], acc_dv[n][2 * r + 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 3b (deterministic): dQ per query block, accumulated in registers.

template <class Tr>
__device__ __forceinline__ void bwd_dq_body(const PrefixAttnParams &p, unsigned char *smem) {
    constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int Hq = p.q_heads, group = Hq / p.kv_heads, T = p.seq;
    const int bh = blockIdx.y, b = bh / Hq, hk = (bh % Hq) / group;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int vl = p.valid_len[b];
    __half *dQ = p.dq + (size_t)bh * T * D;

    if (m0 >= vl) {
        for (int i = tid; i < BM * D / 2; i += Tr::kThreads) {
            const int r = m0 + i / (D / 2);
            if (r < T) reinterpret_cast<uint32_t *>(dQ + (size_t)r * D)[i % (D / 2)] = 0u;
        }
        return;
    }

    __half *sQ = reinterpret_cast<__half *>(smem);
    __half *sdO = sQ + BM * LD;
    __half *sK = sdO + BM * LD; // [2][BN][LD]
    __half *sV = sK + 2 * BN * LD;
    const KeyWalk w = make_walk<BN>(p, b, hk, m0, BM, vl);
    load_tile_async<BM, D, LD, Tr::kThreads>(
        sQ, p.q + (size_t)bh * T * D, m0, vl, tid);
    load_tile_async<BM, D, LD, Tr::kThreads>(
        sdO, p.d_o + (size_t)bh * T * D, m0, vl, tid);
    load_kv_tile<Tr>(w, 0, sK, sV, tid);
    cp_async_commit();

    const int q_row0 = m0 + warp * 16;
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q_row0 + g + 8 * r;
        lse2[r] = q < vl ? p.lse[(size_t)bh * T + q] * kLog2e : INFINITY;
        dl[r] = q < vl ? p.delta[(size_t)bh * T + q] : 0.f;
    }
    const float scale_log2 = p.scale * kLog2e;
    float acc_dq[D / 8][4];
    zero_acc<D / 8>(acc_dq);

    for (int it = 0; it < w.n_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < w.n_tiles) {
            load_kv_tile<Tr>(w, it + 1, sK + (buf ^ 1) * BN * LD, sV + (buf ^ 1) * BN * LD, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        sync_block();
        const __half *k_t = sK + buf * BN * LD, *v_t = sV + buf * BN * LD;
        float s[BN / 8][4], dp[BN / 8][4];
        zero_acc<BN / 8>(s);
        zero_acc<BN / 8>(dp);
        warp_gemm_ss_nt<BN / 8, D, LD, LD>(s, sQ + warp * 16 * LD, k_t, lane);
        warp_gemm_ss_nt<BN / 8, D, LD, LD>(dp, sdO + warp * 16 * LD, v_t, lane);
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const bool ok = key_visible(w, it, BN, n * 8 + 2 * t + (i & 1), q_row0 + g + 8 * r);
                const float pv = ok ? exp2f(s[n][i] * scale_log2 - lse2[r]) : 0.f;
                dp[n][i] = pv * (dp[n][i] - dl[r]);
            }
        uint32_t a_ds[BN / 16][4];
        acc_to_a<BN / 16>(a_ds, dp);
        warp_gemm_rs_nn<D / 8, BN / 16, LD>(acc_dq, a_ds, k_t, lane); // dQ += dS K
        sync_block();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q_row0 + g + 8 * r;
        if (q >= T) continue;
        const float sc = q < vl ? p.scale : 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            reinterpret_cast<uint32_t *>(dQ + (size_t)q * D + n * 8 + 2 * t)[0] =
                pack_half2(acc_dq[n][2 * r] * sc, acc_dq[n][2 * r + 1] * sc);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 3a (atomic): dQ accumulator -> fp16. Backward 4: prefix gradient reduction.

__device__ __forceinline__ void bwd_dq_convert_body(const PrefixAttnParams &p) {
    const size_t n = (size_t)p.batch * p.q_heads * p.seq * p.head_dim;
    const size_t i0 = ((size_t)blockIdx.x * PT_ATTN_THREADS + threadIdx.x) * 4;
    __half *dq = p.dq;
    for (size_t i = i0; i < i0 + 4 && i < n; ++i) dq[i] = __float2half_rn(p.dq_accum[i]);
}

__device__ __forceinline__ void bwd_prefix_reduce_body(const PrefixAttnParams &p) {
    const size_t per_prefix = (size_t)p.kv_heads * p.prefix * p.head_dim;
    const size_t n = per_prefix * p.n_prefixes;
    const size_t i = (size_t)blockIdx.x * PT_ATTN_THREADS + threadIdx.x;
    if (i >= n) return;
    const int pi = (int)(i / per_prefix);
    const size_t e = i % per_prefix;
    float sk = 0.f, sv = 0.f;
    for (int b = 0; b < p.batch; ++b) // fixed order: deterministic
        if (p.prefix_index[b] == pi) {
            sk += p.dpk_partial[(size_t)b * per_prefix + e];
            sv += p.dpv_partial[(size_t)b * per_prefix + e];
        }
    p.d_prefix_k[i] = __float2half_rn(sk);
    p.d_prefix_v[i] = __float2half_rn(sv);
}

} // namespace pt

// ---------------------------------------------------------------------------------------------
// Entry points (extern "C": looked up by name from the cubin/PTX and by the host emulation).

#define PT_ATTN_INPUTS                                                                          \
    const __half *__restrict__ q, const __half *__restrict__ k, const __half *__restrict__ v,     \
        const __half *__restrict__ prefix_k, const __half *__restrict__ prefix_v,                 \
        const int32_t *__restrict__ prefix_index, const int32_t *__restrict__ valid_len
#define PT_ATTN_SET_INPUTS(a)                                                                   \
    a.q = q;                                                                                    \
    a.k = k;                                                                                    \
    a.v = v;                                                                                    \
    a.prefix_k = prefix_k;                                                                      \
    a.prefix_v = prefix_v;                                                                      \
    a.prefix_index = prefix_index;                                                              \
    a.valid_len = valid_len

#define PT_ATTN_FWD(D)                                                                          \
    extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS)                               \
        prefix_attn_fwd_d##D(const pt_attn_params p, PT_ATTN_INPUTS, __half *__restrict__ o,    \
                             float *__restrict__ lse) {                                         \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::PrefixAttnParams a(p);                                                              \
        PT_ATTN_SET_INPUTS(a);                                                                  \
        a.o = o;                                                                                \
        a.lse = lse;                                                                            \
        pt::fwd_body<pt::FwdTraits<D>>(a, pt_smem);                                             \
    }

#define PT_ATTN_BWD_DKDV(D)                                                                     \
    extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS) prefix_attn_bwd_dkdv_d##D(    \
        const pt_attn_params p, PT_ATTN_INPUTS, const float *__restrict__ lse,                  \
        const __half *__restrict__ d_o, const float *__restrict__ delta, float *dq_accum,       \
        float *__restrict__ dpk_partial, float *__restrict__ dpv_partial, __half *__restrict__ dk, \
        __half *__restrict__ dv) {                                                              \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::PrefixAttnParams a(p);                                                              \
        PT_ATTN_SET_INPUTS(a);                                                                  \
        a.lse = const_cast<float *>(lse);                                                       \
        a.d_o = d_o;                                                                            \
        a.delta = const_cast<float *>(delta);                                                   \
        a.dq_accum = dq_accum;                                                                  \
        a.dpk_partial = dpk_partial;                                                            \
        a.dpv_partial = dpv_partial;                                                            \
        a.dk = dk;                                                                              \
        a.dv = dv;                                                                              \
        pt::bwd_dkdv_body<pt::BwdTraits<D>>(a, pt_smem);                                        \
    }

#define PT_ATTN_BWD_DQ(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS) prefix_attn_bwd_dq_d##D(      \
        const pt_attn_params p, PT_ATTN_INPUTS, const float *__restrict__ lse,                  \
        const __half *__restrict__ d_o, const float *__restrict__ delta, __half *__restrict__ dq) { \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::PrefixAttnParams a(p);                                                              \
        PT_ATTN_SET_INPUTS(a);                                                                  \
        a.lse = const_cast<float *>(lse);                                                       \
        a.d_o = d_o;                                                                            \
        a.delta = const_cast<float *>(delta);                                                   \
        a.dq = dq;                                                                              \
        pt::bwd_dq_body<pt::FwdTraits<D>>(a, pt_smem);                                          \
    }

PT_ATTN_FWD(64)
PT_ATTN_FWD(128)
PT_ATTN_BWD_DKDV(64)
PT_ATTN_BWD_DKDV(128)
PT_ATTN_BWD_DQ(64)
PT_ATTN_BWD_DQ(128)

extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS)
    prefix_attn_bwd_preprocess(const pt_attn_params p, const int32_t *__restrict__ valid_len,
                               const __half *__restrict__ o, const __half *__restrict__ d_o,
                               float *__restrict__ delta, float *__restrict__ dq_accum) {
    pt::PrefixAttnParams a(p);
    a.valid_len = valid_len;
    a.o = const_cast<__half *>(o);
    a.d_o = d_o;
    a.delta = delta;
    a.dq_accum = dq_accum;
    pt::bwd_preprocess_body(a);
}

extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS)
    prefix_attn_bwd_dq_convert(const pt_attn_params p, const float *__restrict__ dq_accum,
                               __half *__restrict__ dq) {
    pt::PrefixAttnParams a(p);
    a.dq_accum = const_cast<float *>(dq_accum);
    a.dq = dq;
    pt::bwd_dq_convert_body(a);
}

extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS)
    prefix_attn_bwd_prefix_reduce(const pt_attn_params p, const int32_t *__restrict__ prefix_index,
                                  const float *__restrict__ dpk_partial,
                                  const float *__restrict__ dpv_partial,
                                  __half *__restrict__ d_prefix_k, __half *__restrict__ d_prefix_v) {
    pt::PrefixAttnParams a(p);
    a.prefix_index = prefix_index;
    a.dpk_partial = const_cast<float *>(dpk_partial);
    a.dpv_partial = const_cast<float *>(dpv_partial);
    a.d_prefix_k = d_prefix_k;
    a.d_prefix_v = d_prefix_v;
    pt::bwd_prefix_reduce_body(a);
}
