// Fused prefix attention, forward and backward (FlashAttention-2 design).
//
// Keys/values are [prefix ++ sequence] without ever materialising the concatenation: a CTA walks
// the prefix tiles (read from the bank entry of its sequence, always visible) and then the causal
// sequence tiles. Layouts, masking and the launch shapes are documented in abi/attention.h.
//
// Forward: one CTA per (128-query block, batch*query head): see fwd_body.
//
// Backward:
//  1. prefix_attn_bwd_preprocess: lse2 = lse log2(e), delta = rowsum(dO * O) on whole padded rows
//     (so the later kernels copy them with 16-byte cp.async); zeroes the fp32 dQ accumulator.
//  2. prefix_attn_bwd_dkdv: one CTA of 8 warps per (batch*query head, 128-key block), key blocks
//     being the prefix blocks then the sequence blocks (FlashAttention-2's backward shapes and
//     warp layouts: P and dS go through shared memory). It streams the query steps that see its
//     keys, recomputes P from lse2, and keeps dK/dV in registers. Sequence blocks write dK/dV
//     (Hq = Hkv) or fp32 per-query-head partials (GQA); prefix blocks write fp32 per-(sequence,
//     query head) partials. In atomic mode it also adds dQ += dS K into the fp32 accumulator
//     with atomics (BM x D atomics per BM x 128 x D step).
//  3a. atomic mode: prefix_attn_bwd_dq_convert turns the accumulator into fp16 dQ.
//  3b. deterministic mode: prefix_attn_bwd_dq recomputes S and dP per query block (the forward's
//      structure) and accumulates dQ in registers: no atomics, bitwise reproducible, at the cost
//      of two more tensor-core GEMMs per tile (about 1.6x the backward's tensor work).
//  4. prefix_attn_bwd_kv_reduce (GQA): dK/dV = the sum of the group's partials, in head order;
//     prefix_attn_bwd_prefix_reduce: d(prefix K/V) = the sum of the partials of the sequences
//     using each prefix and of the kv head's query heads, in batch and head order, in fp32
//     (deterministic in both modes).
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
    float *lse = nullptr, *lse2 = nullptr;
    const __half *d_o = nullptr;
    float *delta = nullptr, *dq_accum = nullptr, *dpk_partial = nullptr, *dpv_partial = nullptr;
    float *dk_partial = nullptr, *dv_partial = nullptr;
    __half *dq = nullptr, *dk = nullptr, *dv = nullptr;
    float *d_prefix_k = nullptr, *d_prefix_v = nullptr;
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

// A compile-time flag passed to a generic lambda.
template <bool B> struct BoolTag {
    static constexpr bool value = B;
};
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

// ---------------------------------------------------------------------------------------------
// Forward (FlashAttention-2's structure, FwdTraits<D> tiles).
//
// Keys are walked as one virtual row range [prefix ++ sequence]: virtual key v < Pe (the
// sequence's prefix length, 0 without a prefix) is prefix row v, v >= Pe is sequence row v - Pe,
// and query t sees v <= t + Pe (bottom-right causal). Tiles of BN virtual keys, so a short prefix
// shares its tile with the first sequence keys (P = 10 costs no tile of its own). The CTA walks
// its tiles from the last to the first: first the tiles that cross the diagonal (masked, loop A),
// then the unmasked tiles of sequence keys only (loop B: the main loop, no mask, no zero-fill,
// one loader), then the tiles holding prefix keys (loop C: unmasked, per-row prefix/sequence
// source). K and V have one buffer each, in separate cp.async groups: V(j) lands while S(j) is
// computed, K(j-1) while the softmax and P V(j) run; two barriers per tile.

struct FwdWalk {
    const __half *k_pre, *v_pre, *k_seq, *v_seq;
    int pe;     // prefix keys this sequence sees
    int kv_end; // virtual keys the block needs: Pe + min(m0 + BM, valid_len); past it, zero-fill
};

// Tile j of K or V (BN virtual keys from j*BN) into shared memory (row stride LD). kSeqOnly: the
// tile holds sequence keys only, all below kv_end (the main loop's tiles). Otherwise each row
// picks its source and rows at or past kv_end are zero-filled.
template <class Tr, bool kSeqOnly>
__device__ __forceinline__ void fwd_load_tile(__half *s, const __half *pre, const __half *seq,
                                              const FwdWalk &w, int j, int tid) {
    constexpr int D = Tr::kHeadDim, LD = Tr::kLd, BN = Tr::kBlockN;
    constexpr int kCpr = D / 8;                  // 16-byte chunks per row
    constexpr int kRpp = Tr::kThreads / kCpr;    // rows per pass of the CTA
    static_assert(BN % kRpp == 0, "whole passes");
    const int r0 = tid / kCpr, c0 = (tid % kCpr) * 8;
    const int v0 = j * BN + r0;
    __half *dst = s + r0 * LD + c0;
    if constexpr (kSeqOnly) {
        const __half *src = seq + (size_t)(v0 - w.pe) * D + c0;
#pragma unroll
        for (int i = 0; i < BN / kRpp; ++i) cp_async_16_always(dst + i * kRpp * LD, src + i * kRpp * D);
    } else {
#pragma unroll
        for (int i = 0; i < BN / kRpp; ++i) {
            const int v = v0 + i * kRpp;
            const bool ok = v < w.kv_end;
            const __half *src = v < w.pe ? pre + (size_t)v * D : seq + (size_t)(v - w.pe) * D;
            cp_async_16(dst + i * kRpp * LD, ok ? src + c0 : seq, ok);
        }
    }
}

// S (MT m16 slabs x BN keys, this warp's 32 rows) = Q K^T. Q from registers (a_q) or from the
// shared Q tile (sQw: this warp's first row); K tile rows k_t.
template <class Tr>
__device__ __forceinline__ void fwd_qk(float (*s)[Tr::kBlockN / 8][4],
                                       const uint32_t (*a_q)[Tr::kHeadDim / 16][4],
                                       const __half *sQw, const __half *k_t, int lane) {
    constexpr int D = Tr::kHeadDim, BN = Tr::kBlockN, LD = Tr::kLd;
    constexpr int MT = FwdSmem<Tr>::kMTiles;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (Tr::kQInRegs) {
#pragma unroll
                for (int r = 0; r < 4; ++r) a[mt][r] = a_q[mt][kk][r];
            } else {
                ldmatrix_x4(a[mt], sQw + (mt * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
            }
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
            uint32_t b[4];
            ldmatrix_x4(b, k_t + (nn * 16 + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 +
                               8 * ((lane / 8) % 2));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(s[mt][2 * nn], a[mt], b, s[mt][2 * nn]);
                mma_16816(s[mt][2 * nn + 1], a[mt], b + 2, s[mt][2 * nn + 1]);
            }
        }
    }
}

// acc_o (MT x D) += P (MT x BN, A fragments) V (BN x D, ldmatrix.trans).
template <class Tr>
__device__ __forceinline__ void fwd_pv(float (*acc_o)[Tr::kHeadDim / 8][4],
                                       const uint32_t (*a_p)[Tr::kBlockN / 16][4],
                                       const __half *v_t, int lane) {
    constexpr int D = Tr::kHeadDim, BN = Tr::kBlockN, LD = Tr::kLd;
    constexpr int MT = FwdSmem<Tr>::kMTiles;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int nn = 0; nn < D / 16; ++nn) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_t + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD +
                                     nn * 16 + 8 * (lane / 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(acc_o[mt][2 * nn], a_p[mt][kk], b, acc_o[mt][2 * nn]);
                mma_16816(acc_o[mt][2 * nn + 1], a_p[mt][kk], b + 2, acc_o[mt][2 * nn + 1]);
            }
        }
}

// One tile of the forward: S, mask (kMask), online softmax, P V; prefetches K(j-1).
template <class Tr, bool kMask, bool kSeqOnly>
__device__ __forceinline__ void fwd_tile(int j, const FwdWalk &w, const __half *sQw, __half *sK,
                                         __half *sV, const uint32_t (*a_q)[Tr::kHeadDim / 16][4],
                                         float (*acc_o)[Tr::kHeadDim / 8][4], float *row_max,
                                         float *row_sum, float scale_log2, int q_row0, int tid,
                                         int lane) {
    constexpr int D = Tr::kHeadDim, BN = Tr::kBlockN;
    constexpr int MT = FwdSmem<Tr>::kMTiles, NT = BN / 8;
    const int g = lane >> 2, t = lane & 3;
    cp_async_wait<0>(); // K(j) has landed (the only group in flight)
    sync_block();       // ... for every thread; and P V(j+1) is done with sV
    fwd_load_tile<Tr, kSeqOnly>(sV, w.v_pre, w.v_seq, w, j, tid);
    cp_async_commit();

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc<NT>(s[mt]);
    fwd_qk<Tr>(s, a_q, sQw, sK, lane);
    if constexpr (kMask) {
        // Virtual key v is visible from query q when v <= q + Pe.
        const int lim0 = q_row0 + w.pe - j * BN - 2 * t; // column bound of row g of slab 0
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    if (n * 8 + (i & 1) > lim0 + mt * 16 + g + 8 * (i >> 1)) s[mt][n][i] = -INFINITY;
    }
    cp_async_wait<0>(); // V(j) has landed
    sync_block();       // ... for every thread; and S(j) is done with sK
    if (j > 0) {
        fwd_load_tile<Tr, kSeqOnly>(sK, w.k_pre, w.k_seq, w, j - 1, tid);
        cp_async_commit();
    }

    // Online softmax in base 2 on the raw scores (scale * log2(e) folded into one FFMA).
    uint32_t a_p[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int ri = 2 * mt + r;
            float mx = row_max[ri];
#pragma unroll
            for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
            mx = quad_max(mx);
            // Only a masked tile can leave a row without a visible key so far (max = -inf).
            const float m_scaled = (kMask && mx == -INFINITY) ? 0.f : mx * scale_log2;
            const float corr = ex2_approx(fmaf(row_max[ri], scale_log2, -m_scaled));
            row_max[ri] = mx;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = ex2_approx(fmaf(s[mt][n][2 * r + e], scale_log2, -m_scaled));
                    s[mt][n][2 * r + e] = pv;
                    sum += pv;
                }
            row_sum[ri] = fmaf(row_sum[ri], corr, sum);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                acc_o[mt][n][2 * r] *= corr;
                acc_o[mt][n][2 * r + 1] *= corr;
            }
        }
        acc_to_a<BN / 16>(a_p[mt], s[mt]);
    }
    fwd_pv<Tr>(acc_o, a_p, sV, lane);
}

template <class Tr>
__device__ __forceinline__ void fwd_body(const PrefixAttnParams &p, unsigned char *smem) {
    constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd;
    constexpr int MT = FwdSmem<Tr>::kMTiles;
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
    __half *sK = sQ + BM * LD;
    __half *sV = sK + BN * LD;
    FwdWalk w;
    {
        // A negative prefix index: this sequence sees no prefix.
        const int pi = p.prefix > 0 ? p.prefix_index[b] : 0;
        w.pe = pi < 0 ? 0 : p.prefix;
        const size_t pre_off = ((size_t)imax(pi, 0) * p.kv_heads + hk) * (size_t)p.prefix * D;
        const size_t seq_off = ((size_t)b * p.kv_heads + hk) * (size_t)T * D;
        w.k_pre = p.prefix_k + pre_off;
        w.v_pre = p.prefix_v + pre_off;
        w.k_seq = p.k + seq_off;
        w.v_seq = p.v + seq_off;
        w.kv_end = w.pe + imin(m0 + BM, vl);
    }
    const int n_tiles = cdiv(w.kv_end, BN);
    const int j_mask = imin((m0 + w.pe + 1) / BN, n_tiles); // tiles >= j_mask cross the diagonal
    const int j_seq = cdiv(w.pe, BN);                        // tiles >= j_seq: sequence keys only

    load_tile_async<BM, D, LD, Tr::kThreads>(sQ, p.q + (size_t)bh * T * D, m0, vl, tid);
    cp_async_commit();
    fwd_load_tile<Tr, false>(sK, w.k_pre, w.k_seq, w, n_tiles - 1, tid);
    cp_async_commit();

    const __half *sQw = sQ + warp * (16 * MT) * LD;
    uint32_t a_q[Tr::kQInRegs ? MT : 1][D / 16][4];
    if constexpr (Tr::kQInRegs) {
        cp_async_wait<1>(); // Q has landed
        sync_block();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(a_q[mt][kk], sQw + (mt * 16 + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
    }

    float acc_o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc<D / 8>(acc_o[mt]);
    float row_max[2 * MT], row_sum[2 * MT];
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.f;
    }
    const float scale_log2 = p.scale * kLog2e;
    const int q_row0 = m0 + warp * 16 * MT;

    int j = n_tiles - 1;
    for (; j >= j_mask; --j) // A: tiles crossing the diagonal
        fwd_tile<Tr, true, false>(j, w, sQw, sK, sV, a_q, acc_o, row_max, row_sum, scale_log2,
                                  q_row0, tid, lane);
    for (; j > j_seq; --j) // B: sequence keys only, and so is tile j - 1
        fwd_tile<Tr, false, true>(j, w, sQw, sK, sV, a_q, acc_o, row_max, row_sum, scale_log2,
                                  q_row0, tid, lane);
    for (; j >= 0; --j) // C: tiles with prefix keys (and the last sequence-only tile)
        fwd_tile<Tr, false, false>(j, w, sQw, sK, sV, a_q, acc_o, row_max, row_sum, scale_log2,
                                   q_row0, tid, lane);

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int ri = 2 * mt + r;
            const float sum = quad_sum(row_sum[ri]);
            const int q = q_row0 + mt * 16 + g + 8 * r;
            const bool valid = q < vl;
            const float inv = valid ? 1.f / sum : 0.f;
            if (q < T) {
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    reinterpret_cast<uint32_t *>(O + (size_t)q * D + n * 8 + 2 * t)[0] =
                        pack_half2(acc_o[mt][n][2 * r] * inv, acc_o[mt][n][2 * r + 1] * inv);
                if (t == 0) L[q] = valid ? row_max[ri] * p.scale + logf(sum) : 0.f;
            }
        }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: lse2 = lse * log2(e) and delta = rowsum(dO * O) on whole padded rows (+inf / 0 on
// padding rows and past T), and zero the dQ accumulator (atomic mode).

__device__ __forceinline__ int padded_rows(int T) { return cdiv(T, PT_ATTN_ROW_PAD) * PT_ATTN_ROW_PAD; }

__device__ __forceinline__ void bwd_preprocess_body(const PrefixAttnParams &p) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int D = p.head_dim, T = p.seq, Tp = padded_rows(T), bh = blockIdx.y, b = bh / p.q_heads;
    const int vl = p.valid_len[b];
    const __half *dO = p.d_o + (size_t)bh * T * D;
    const __half *O = p.o + (size_t)bh * T * D;
    constexpr int kWarps = PT_ATTN_THREADS / 32;
    for (int j = warp; j < PT_ATTN_PRE_ROWS; j += kWarps) {
        const int row = blockIdx.x * PT_ATTN_PRE_ROWS + j; // < Tp: the grid covers Tp rows
        float acc = 0.f;
        if (row < vl) // uniform over the warp; D / 2 half2 pairs, lanes stride over them
            for (int d2 = lane; d2 < D / 2; d2 += 32) {
                const float2 a = __half22float2(reinterpret_cast<const __half2 *>(dO + (size_t)row * D)[d2]);
                const float2 c = __half22float2(reinterpret_cast<const __half2 *>(O + (size_t)row * D)[d2]);
                acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
            }
#pragma unroll
        for (int m = 16; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
        if (lane == 0) {
            p.delta[(size_t)bh * Tp + row] = row < vl ? acc : 0.f;
            p.lse2[(size_t)bh * Tp + row] = row < vl ? p.lse[(size_t)bh * T + row] * kLog2e : INFINITY;
        }
        if (!p.deterministic && row < T)
            for (int d = lane; d < D; d += 32) p.dq_accum[((size_t)bh * T + row) * D + d] = 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward 2: dK, dV (prefix partials; GQA partials; dQ atomics) per (query head, key block).

// ROWS x D tiles (row stride D in global memory, LD in shared memory) by cp.async with the thread
// mapping fixed once: thread tid copies the 16-byte column chunk tid % (D/8) of rows
// tid / (D/8) + i * (THREADS / (D/8)); rows at or past `valid` are zero-filled.
template <int ROWS, int D, int LD, int THREADS> struct TileCopy {
    static constexpr int kCpr = D / 8, kRpp = THREADS / kCpr, kPasses = ROWS / kRpp;
    static_assert(kPasses * kRpp == ROWS, "whole passes");
    int r0, off_s, off_g;
    __device__ __forceinline__ explicit TileCopy(int tid)
        : r0(tid / kCpr), off_s(r0 * LD + (tid % kCpr) * 8), off_g(r0 * D + (tid % kCpr) * 8) {}
    __device__ __forceinline__ void operator()(__half *s, const __half *g, int row0, int valid) const {
        const __half *src = g + (size_t)row0 * D + off_g;
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
            const bool ok = row0 + r0 + i * kRpp < valid;
            cp_async_16(s + off_s + i * kRpp * LD, ok ? src + i * kRpp * D : g, ok);
        }
    }
};

// acc[MT][NT] += A B^T: A = MT*16 rows of K-dim 16*KT (row-major, stride LDA), B = NT*8 rows of the
// same K-dim (row-major, stride LDB); both read with plain ldmatrix.
template <int MT, int NT, int KT, int LDA, int LDB>
__device__ __forceinline__ void mma_rows_nt(float (*acc)[NT][4], const __half *sA, const __half *sB,
                                            int lane) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            ldmatrix_x4(a[mt], sA + (mt * 16 + lane % 16) * LDA + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            ldmatrix_x4(b, sB + (nn * 16 + (lane % 8) + 8 * (lane / 16)) * LDB + kk * 16 + 8 * ((lane / 8) % 2));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(acc[mt][2 * nn], a[mt], b, acc[mt][2 * nn]);
                mma_16816(acc[mt][2 * nn + 1], a[mt], b + 2, acc[mt][2 * nn + 1]);
            }
        }
    }
}

// acc[MT][NT] += A B, B stored K-major ([16*KT][NT*8], stride LDB, ldmatrix.trans). A is stored
// row-major [MT*16][16*KT] (kATrans = false, plain ldmatrix) or K-major [16*KT][MT*16]
// (kATrans = true: the product needs the transpose of what shared memory holds).
template <int MT, int NT, int KT, int LDA, int LDB, bool kATrans>
__device__ __forceinline__ void mma_nn(float (*acc)[NT][4], const __half *sA, const __half *sB, int lane) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (kATrans)
                ldmatrix_x4_trans(a[mt], sA + (kk * 16 + (lane % 8) + 8 * (lane / 16)) * LDA + mt * 16 +
                                             8 * ((lane / 8) % 2));
            else
                ldmatrix_x4(a[mt], sA + (mt * 16 + lane % 16) * LDA + kk * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sB + (kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LDB + nn * 16 +
                                     8 * (lane / 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(acc[mt][2 * nn], a[mt], b, acc[mt][2 * nn]);
                mma_16816(acc[mt][2 * nn + 1], a[mt], b + 2, acc[mt][2 * nn + 1]);
            }
        }
    }
}

template <int MT, int NT> __device__ __forceinline__ void zero_tile(float (*acc)[NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc<NT>(acc[mt]);
}

// One CTA: the BN keys of key block blockIdx.y (prefix blocks first) of query head blockIdx.x.
// The query steps that see them (every valid row for a prefix block, rows >= n0 for a sequence
// block) run masked first (only the steps crossing the diagonal of a sequence block; a prefix
// block needs no mask: its rows past P are zero-filled, so their P and dS reach no gradient that
// is kept), then unmasked (the main loop). Per step: three barriers.
//   B1: Q(s), dO(s), lse2/delta(s) landed; then Q(s+1), lse2/delta(s+1) are issued.
//   S = Q K^T, dP = dO V^T; P = exp2(S scale log2e - lse2), dS = P (dP - delta) into sP, sdS.
//   B2: sP, sdS complete.  dV += P^T dO.
//   B3: dO(s) consumed; dO(s+1) is issued.  dK += dS^T Q;  dQ += dS K (atomic mode).
template <class Tr>
__device__ __forceinline__ void bwd_dkdv_body(const PrefixAttnParams &p, unsigned char *smem) {
    constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd, LDP = Tr::kLdP;
    constexpr int MTS = Tr::kMtS, NTS = Tr::kNtS, MTK = Tr::kMtK, NTK = Tr::kNtK;
    constexpr int MTQ = Tr::kMtQ, NTQ = Tr::kNtQ;
    constexpr int kThreads = Tr::kThreads;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int Hq = p.q_heads, Hkv = p.kv_heads, group = Hq / Hkv, T = p.seq, P = p.prefix;
    const int Tp = padded_rows(T);
    const int bh = blockIdx.x, b = bh / Hq, hq = bh % Hq, hk = hq / group;
    const int n_pre_blocks = cdiv(P, BN);
    const bool pre = (int)blockIdx.y < n_pre_blocks;
    const int n0 = (pre ? (int)blockIdx.y : (int)blockIdx.y - n_pre_blocks) * BN;
    const int vl = p.valid_len[b];
    const int pi = P > 0 ? p.prefix_index[b] : 0;
    const int n_keys = pre ? P : T;
    // A sequence without a prefix (negative index) gives its prefix blocks zero partials.
    const bool unseen = pre && pi < 0;
    const int q_lo = pre ? 0 : n0;
    const int mb_lo = q_lo / BM;
    const int n_steps = q_lo < vl && !unseen ? cdiv(vl, BM) - mb_lo : 0;
    const int n_masked = pre ? 0 : imin(n_steps, cdiv(BN - 1, BM));

    __half *sK = reinterpret_cast<__half *>(smem);
    __half *sV = sK + BN * LD;
    __half *sQ = sV + BN * LD;       // [2][BM][LD]
    __half *sdO = sQ + 2 * BM * LD;  // [BM][LD]
    __half *sP = sdO + BM * LD;      // [BM][LDP]
    __half *sdS = sP + BM * LDP;     // [BM][LDP]
    float *sL = reinterpret_cast<float *>(sdS + BM * LDP); // [2][BM] lse2
    float *sDl = sL + 2 * BM;                               // [2][BM] delta

    // Warp coordinates in each product's layout.
    const int wm_s = warp / Tr::kWnS, wn_s = warp % Tr::kWnS;
    const int wn_k = warp / Tr::kWdK, wd_k = warp % Tr::kWdK;
    const int wm_q = warp / Tr::kWdQ, wd_q = warp % Tr::kWdQ;
    const int rs0 = wm_s * MTS * 16, cs0 = wn_s * NTS * 8; // this warp's S rows / key columns
    const int rk0 = wn_k * MTK * 16, ck0 = wd_k * NTK * 8; // its dK/dV keys / dims
    const int rq0 = wm_q * MTQ * 16, cq0 = wd_q * NTQ * 8; // its dQ rows / dims

    float acc_dk[MTK][NTK][4], acc_dv[MTK][NTK][4];
    zero_tile<MTK, NTK>(acc_dk);
    zero_tile<MTK, NTK>(acc_dv);

    if (n_steps > 0) {
        const __half *Kg, *Vg;
        if (pre) {
            const size_t off = ((size_t)pi * Hkv + hk) * (size_t)P * D;
            Kg = p.prefix_k + off;
            Vg = p.prefix_v + off;
        } else {
            const size_t off = ((size_t)b * Hkv + hk) * (size_t)T * D;
            Kg = p.k + off;
            Vg = p.v + off;
        }
        const __half *Qg = p.q + (size_t)bh * T * D, *dOg = p.d_o + (size_t)bh * T * D;
        const float *L2g = p.lse2 + (size_t)bh * Tp, *Dlg = p.delta + (size_t)bh * Tp;
        // Step s's query block: the masked ones (from the diagonal on) first, then the rest.
        auto m0_of = [&](int s) { return (mb_lo + s) * BM; };
        // Q rows and lse2/delta of step s into buffer `buf` (rows past vl zero-filled; lse2 = +inf
        // there, so their P and dS are exactly 0).
        const TileCopy<BM, D, LD, kThreads> copy_q(tid);
        // Threads 0 .. BM/4 - 1 copy lse2, the next BM/4 delta: 4 floats each.
        const bool rows_copier = tid < BM / 2;
        const int r4 = 4 * (tid % (BM / 4));
        float *s_rows = (tid < BM / 4 ? sL : sDl) + r4;
        const float *g_rows = (tid < BM / 4 ? L2g : Dlg) + r4;
        auto load_q = [&](int s, int buf) {
            const int m0 = m0_of(s);
            copy_q(sQ + buf * BM * LD, Qg, m0, vl);
            if (rows_copier) cp_async_16_always(s_rows + buf * BM, g_rows + m0);
        };
        {
            const TileCopy<BN, D, LD, kThreads> copy_kv(tid);
            copy_kv(sK, Kg, n0, n_keys);
            copy_kv(sV, Vg, n0, n_keys);
        }
        load_q(0, 0);
        copy_q(sdO, dOg, m0_of(0), vl);
        cp_async_commit();

        const float scale_log2 = p.scale * kLog2e;
        auto step = [&](auto mask_tag, int s) {
            constexpr bool kMask = decltype(mask_tag)::value;
            const int buf = s & 1;
            const int m0 = m0_of(s);
            cp_async_wait<0>();
            sync_block(); // B1
            if (s + 1 < n_steps) {
                load_q(s + 1, buf ^ 1);
                cp_async_commit();
            }
            const __half *q_t = sQ + buf * BM * LD;

            float st[MTS][NTS][4], dpt[MTS][NTS][4];
            zero_tile<MTS, NTS>(st);
            zero_tile<MTS, NTS>(dpt);
            mma_rows_nt<MTS, NTS, D / 16, LD, LD>(st, q_t + rs0 * LD, sK + cs0 * LD, lane);
            mma_rows_nt<MTS, NTS, D / 16, LD, LD>(dpt, sdO + rs0 * LD, sV + cs0 * LD, lane);
#pragma unroll
            for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = rs0 + mt * 16 + g + 8 * r;
                    const float l2 = sL[buf * BM + row], dl = sDl[buf * BM + row];
#pragma unroll
                    for (int n = 0; n < NTS; ++n) {
                        float pv[2], ds[2];
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int col = cs0 + n * 8 + 2 * t + e;
                            // Sequence key n0 + col is visible from query m0 + row when not above it.
                            const bool ok = !kMask || n0 + col <= m0 + row;
                            pv[e] = ok ? ex2_approx(fmaf(st[mt][n][2 * r + e], scale_log2, -l2)) : 0.f;
                            ds[e] = pv[e] * (dpt[mt][n][2 * r + e] - dl);
                        }
                        const int at = row * LDP + cs0 + n * 8 + 2 * t;
                        *reinterpret_cast<uint32_t *>(sP + at) = pack_half2(pv[0], pv[1]);
                        *reinterpret_cast<uint32_t *>(sdS + at) = pack_half2(ds[0], ds[1]);
                    }
                }
            sync_block(); // B2
            // dV += P^T dO (P^T: the transpose of sP, whose rows are queries).
            mma_nn<MTK, NTK, BM / 16, LDP, LD, true>(acc_dv, sP + rk0, sdO + ck0, lane);
            sync_block(); // B3: every warp is done with dO(s)
            if (s + 1 < n_steps) {
                copy_q(sdO, dOg, m0_of(s + 1), vl);
                cp_async_commit();
            }
            // dK += dS^T Q.
            mma_nn<MTK, NTK, BM / 16, LDP, LD, true>(acc_dk, sdS + rk0, q_t + ck0, lane);
            if (!p.deterministic) {
                // dQ += dS K (unscaled; the convert pass applies the softmax scale).
                float acc_dq[MTQ][NTQ][4];
                zero_tile<MTQ, NTQ>(acc_dq);
                mma_nn<MTQ, NTQ, BN / 16, LDP, LD, false>(acc_dq, sdS + rq0 * LDP, sK + cq0, lane);
                float *dqa = p.dq_accum + ((size_t)bh * T + m0 + rq0) * D + cq0 + 2 * t;
#pragma unroll
                for (int mt = 0; mt < MTQ; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int row = mt * 16 + g + 8 * r;
                        if (m0 + rq0 + row < vl)
#pragma unroll
                            for (int n = 0; n < NTQ; ++n) {
                                atomicAdd(dqa + row * D + n * 8, acc_dq[mt][n][2 * r]);
                                atomicAdd(dqa + row * D + n * 8 + 1, acc_dq[mt][n][2 * r + 1]);
                            }
                    }
            }
        };
        int s = 0;
        for (; s < n_masked; ++s) step(BoolTag<true>{}, s);
        for (; s < n_steps; ++s) step(BoolTag<false>{}, s); // the main loop
    }

    // This warp's keys rk0 .. of the block: prefix partials, dK/dV, or GQA partials.
#pragma unroll
    for (int mt = 0; mt < MTK; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = n0 + rk0 + mt * 16 + g + 8 * r;
            if (key >= n_keys) continue;
            if (pre || group > 1) {
                float *pk, *pv;
                if (pre) {
                    const size_t off = (((size_t)bh * P) + key) * D + ck0 + 2 * t;
                    pk = p.dpk_partial + off;
                    pv = p.dpv_partial + off;
                } else {
                    const size_t off = (((size_t)bh * T) + key) * D + ck0 + 2 * t;
                    pk = p.dk_partial + off;
                    pv = p.dv_partial + off;
                }
#pragma unroll
                for (int n = 0; n < NTK; ++n) {
                    reinterpret_cast<float2 *>(pk + n * 8)[0] =
                        make_float2(acc_dk[mt][n][2 * r] * p.scale, acc_dk[mt][n][2 * r + 1] * p.scale);
                    reinterpret_cast<float2 *>(pv + n * 8)[0] = make_float2(acc_dv[mt][n][2 * r], acc_dv[mt][n][2 * r + 1]);
                }
            } else {
                const size_t off = (((size_t)b * Hkv + hk) * T + key) * D + ck0 + 2 * t;
#pragma unroll
                for (int n = 0; n < NTK; ++n) {
                    reinterpret_cast<uint32_t *>(p.dk + off + n * 8)[0] =
                        pack_half2(acc_dk[mt][n][2 * r] * p.scale, acc_dk[mt][n][2 * r + 1] * p.scale);
                    reinterpret_cast<uint32_t *>(p.dv + off + n * 8)[0] =
                        pack_half2(acc_dv[mt][n][2 * r], acc_dv[mt][n][2 * r + 1]);
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
    // lse2 = +inf and delta = 0 on padding rows (the preprocess pass): their P and dS are 0.
    const int Tp = padded_rows(T);
    float lse2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q_row0 + g + 8 * r;
        lse2[r] = p.lse2[(size_t)bh * Tp + q];
        dl[r] = p.delta[(size_t)bh * Tp + q];
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
                const float pv = ok ? ex2_approx(fmaf(s[n][i], scale_log2, -lse2[r])) : 0.f;
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
// Backward 3a (atomic): dQ accumulator -> fp16 (times the softmax scale). Backward 4: the GQA
// sum of dK/dV over each kv head's query heads, and the prefix gradient reduction; both sum in a
// fixed order, in fp32 (deterministic in both modes).

__device__ __forceinline__ void bwd_dq_convert_body(const PrefixAttnParams &p) {
    const size_t n = (size_t)p.batch * p.q_heads * p.seq * p.head_dim; // a multiple of 4 (D is)
    const size_t i = ((size_t)blockIdx.x * PT_ATTN_THREADS + threadIdx.x) * 4;
    if (i >= n) return;
    const float4 a = *reinterpret_cast<const float4 *>(p.dq_accum + i);
    uint2 h;
    h.x = pack_half2(a.x * p.scale, a.y * p.scale);
    h.y = pack_half2(a.z * p.scale, a.w * p.scale);
    *reinterpret_cast<uint2 *>(p.dq + i) = h;
}

// dk/dv [B, Hkv, T, D] = sum over h of the partials [B, Hkv * group + h, T, D] (already scaled).
__device__ __forceinline__ void bwd_kv_reduce_body(const PrefixAttnParams &p) {
    const int group = p.q_heads / p.kv_heads;
    const size_t per_head = (size_t)p.seq * p.head_dim;
    const size_t n = (size_t)p.batch * p.kv_heads * per_head;
    const size_t i = ((size_t)blockIdx.x * PT_ATTN_THREADS + threadIdx.x) * 4;
    if (i >= n) return;
    const size_t bk = i / per_head, e = i % per_head;
    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
    for (int h = 0; h < group; ++h) { // fixed order: deterministic
        const size_t at = (bk * group + h) * per_head + e;
        const float4 a = *reinterpret_cast<const float4 *>(p.dk_partial + at);
        const float4 c = *reinterpret_cast<const float4 *>(p.dv_partial + at);
        sk.x += a.x, sk.y += a.y, sk.z += a.z, sk.w += a.w;
        sv.x += c.x, sv.y += c.y, sv.z += c.z, sv.w += c.w;
    }
    uint2 hk, hv;
    hk.x = pack_half2(sk.x, sk.y);
    hk.y = pack_half2(sk.z, sk.w);
    hv.x = pack_half2(sv.x, sv.y);
    hv.y = pack_half2(sv.z, sv.w);
    *reinterpret_cast<uint2 *>(p.dk + i) = hk;
    *reinterpret_cast<uint2 *>(p.dv + i) = hv;
}

// d(prefix K/V) [n_prefixes, Hkv, P, D]: the partials [B, Hq, P, D] of every sequence using the
// prefix (batch order) and every query head of the kv head (head order), summed in fp32.
__device__ __forceinline__ void bwd_prefix_reduce_body(const PrefixAttnParams &p) {
    const int group = p.q_heads / p.kv_heads;
    const size_t per_head = (size_t)p.prefix * p.head_dim;
    const size_t per_prefix = (size_t)p.kv_heads * per_head;
    const size_t n = per_prefix * p.n_prefixes;
    const size_t i = (size_t)blockIdx.x * PT_ATTN_THREADS + threadIdx.x;
    if (i >= n) return;
    const int pi = (int)(i / per_prefix);
    const size_t e = i % per_prefix;
    const size_t hk = e / per_head, r = e % per_head;
    float sk = 0.f, sv = 0.f;
    for (int b = 0; b < p.batch; ++b) // fixed order: deterministic
        if (p.prefix_index[b] == pi)
            for (int h = 0; h < group; ++h) {
                const size_t at = (((size_t)b * p.kv_heads + hk) * group + h) * per_head + r;
                sk += p.dpk_partial[at];
                sv += p.dpv_partial[at];
            }
    p.d_prefix_k[i] = sk; // fp32: the trained quantity is never rounded to fp16
    p.d_prefix_v[i] = sv;
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
    extern "C" __global__ void __launch_bounds__(PT_ATTN_BWD_THREADS) prefix_attn_bwd_dkdv_d##D( \
        const pt_attn_params p, PT_ATTN_INPUTS, const float *__restrict__ lse2,                 \
        const __half *__restrict__ d_o, const float *__restrict__ delta, float *dq_accum,       \
        float *__restrict__ dpk_partial, float *__restrict__ dpv_partial,                       \
        float *__restrict__ dk_partial, float *__restrict__ dv_partial, __half *__restrict__ dk, \
        __half *__restrict__ dv) {                                                              \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::PrefixAttnParams a(p);                                                              \
        PT_ATTN_SET_INPUTS(a);                                                                  \
        a.lse2 = const_cast<float *>(lse2);                                                     \
        a.d_o = d_o;                                                                            \
        a.delta = const_cast<float *>(delta);                                                   \
        a.dq_accum = dq_accum;                                                                  \
        a.dpk_partial = dpk_partial;                                                            \
        a.dpv_partial = dpv_partial;                                                            \
        a.dk_partial = dk_partial;                                                              \
        a.dv_partial = dv_partial;                                                              \
        a.dk = dk;                                                                              \
        a.dv = dv;                                                                              \
        pt::bwd_dkdv_body<pt::BwdTraits<D>>(a, pt_smem);                                        \
    }

#define PT_ATTN_BWD_DQ(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS) prefix_attn_bwd_dq_d##D(      \
        const pt_attn_params p, PT_ATTN_INPUTS, const float *__restrict__ lse2,                 \
        const __half *__restrict__ d_o, const float *__restrict__ delta, __half *__restrict__ dq) { \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::PrefixAttnParams a(p);                                                              \
        PT_ATTN_SET_INPUTS(a);                                                                  \
        a.lse2 = const_cast<float *>(lse2);                                                     \
        a.d_o = d_o;                                                                            \
        a.delta = const_cast<float *>(delta);                                                   \
        a.dq = dq;                                                                              \
        pt::bwd_dq_body<pt::DqTraits<D>>(a, pt_smem);                                           \
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
                               const float *__restrict__ lse, float *__restrict__ lse2,
                               float *__restrict__ delta, float *__restrict__ dq_accum) {
    pt::PrefixAttnParams a(p);
    a.valid_len = valid_len;
    a.o = const_cast<__half *>(o);
    a.d_o = d_o;
    a.lse = const_cast<float *>(lse);
    a.lse2 = lse2;
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
    prefix_attn_bwd_kv_reduce(const pt_attn_params p, const float *__restrict__ dk_partial,
                              const float *__restrict__ dv_partial, __half *__restrict__ dk,
                              __half *__restrict__ dv) {
    pt::PrefixAttnParams a(p);
    a.dk_partial = const_cast<float *>(dk_partial);
    a.dv_partial = const_cast<float *>(dv_partial);
    a.dk = dk;
    a.dv = dv;
    pt::bwd_kv_reduce_body(a);
}

extern "C" __global__ void __launch_bounds__(PT_ATTN_THREADS)
    prefix_attn_bwd_prefix_reduce(const pt_attn_params p, const int32_t *__restrict__ prefix_index,
                                  const float *__restrict__ dpk_partial,
                                  const float *__restrict__ dpv_partial,
                                  float *__restrict__ d_prefix_k, float *__restrict__ d_prefix_v) {
    pt::PrefixAttnParams a(p);
    a.prefix_index = prefix_index;
    a.dpk_partial = const_cast<float *>(dpk_partial);
    a.dpv_partial = const_cast<float *>(dpv_partial);
    a.d_prefix_k = d_prefix_k;
    a.d_prefix_v = d_prefix_v;
    pt::bwd_prefix_reduce_body(a);
}
