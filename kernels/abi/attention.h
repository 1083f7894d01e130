/* Launch parameters of the fused prefix-attention kernels (kernels/prefix_attention.cu).
 *
 * Shared by the CUDA kernels, the host emulation and Rust (through bindgen), so it is plain C.
 *
 * Buffers (all contiguous, row-major), passed as separate kernel arguments:
 *   q, o, d_o, dq             [B, Hq, T, D]      fp16 (uint16_t bit patterns)
 *   k, v, dk, dv              [B, Hkv, T, D]     fp16
 *   prefix_k, prefix_v        [n_prefixes, Hkv, P, D] fp16 (the prefix bank)
 *   d_prefix_k, d_prefix_v    [n_prefixes, Hkv, P, D] fp32, summed over the sequences using each
 *                             prefix and over the query heads of each kv head
 *   prefix_index, valid_len   [B] int32; prefix_index[b] < 0: sequence b sees no prefix (its
 *                             rows attend over their own keys; it adds nothing to d_prefix_*)
 *   lse                       [B, Hq, T] fp32: the NATURAL-log sum of exponentials of the scaled
 *                             scores of each row (0 on padding rows)
 *   lse2, delta               [B, Hq, Tp] fp32 scratch, Tp = T rounded up to PT_ATTN_ROW_PAD:
 *                             lse * log2(e) (+inf on padding rows and past T) and rowsum(dO*O)
 *                             (0 there), written by prefix_attn_bwd_preprocess; whole aligned
 *                             rows, so the backward kernels copy them with 16-byte cp.async and
 *                             no bounds checks
 *   dq_accum                  [B, Hq, T, D] fp32 scratch (atomic mode only): unscaled dS K
 *   dpk_partial, dpv_partial  [B, Hq, P, D] fp32 scratch: per (sequence, query head) prefix
 *                             gradients, reduced over the sequences using each prefix (batch
 *                             order) and the query heads of each kv head by
 *                             prefix_attn_bwd_prefix_reduce
 *   dk_partial, dv_partial    [B, Hq, T, D] fp32 scratch, GQA only (Hq > Hkv): per query head dK/dV,
 *                             summed over the group's heads in order by prefix_attn_bwd_kv_reduce
 *                             (with Hq = Hkv the dK/dV kernel writes dk/dv itself)
 * Query head h reads kv head h / (Hq / Hkv). Row t of sequence b is padding when t >= valid_len[b]:
 * its O and LSE are 0 and it contributes to no gradient. Keys are [prefix ++ sequence]: the prefix
 * is always visible, the sequence is causal (query t sees sequence keys 0..=t). P may be 0.
 * Supported head dims: 64 and 128 (one kernel per head dim, suffix _d64 / _d128).
 *
 * Kernels and their launch shapes:
 *   prefix_attn_fwd_dD            grid (ceil(T / PT_ATTN_FWD_BLOCK_M), B*Hq)   (both head dims)
 *   prefix_attn_bwd_preprocess    grid (Tp / PT_ATTN_PRE_ROWS, B*Hq)                (any D)
 *   prefix_attn_bwd_dkdv_dD       grid (B*Hq, ceil(P / BN) + ceil(T / BN)), BN = PT_ATTN_BWD_BLOCK_N,
 *                                 PT_ATTN_BWD_THREADS threads: one CTA per (query head, key block),
 *                                 the prefix key blocks first, then the sequence key blocks
 *   prefix_attn_bwd_dq_dD         grid (ceil(T / PT_ATTN_DQ_BLOCK_M), B*Hq)    (deterministic only)
 *   prefix_attn_bwd_dq_convert    grid (ceil(B*Hq*T*D / (PT_ATTN_THREADS*4)), 1)  (atomic only)
 *   prefix_attn_bwd_kv_reduce     grid (ceil(B*Hkv*T*D / (PT_ATTN_THREADS*4)), 1) (Hq > Hkv only)
 *   prefix_attn_bwd_prefix_reduce grid (ceil(n_prefixes*Hkv*P*D / PT_ATTN_THREADS), 1) (P > 0)
 * Threads per block: PT_ATTN_THREADS, except the dK/dV kernel (PT_ATTN_BWD_THREADS).
 * Dynamic shared memory: PT_ATTN_*_SMEM_D64 / _D128 bytes (above 48 KB needs the attribute).
 */
#ifndef PT_ABI_ATTENTION_H
#define PT_ABI_ATTENTION_H

#include <stdint.h>

#define PT_ATTN_THREADS 128
/* forward: 128 query rows per CTA (32 per warp); key tiles of 64 (D = 64) or 32 (D = 128: the
 * largest without register spills next to a 128-register output accumulator) */
#define PT_ATTN_FWD_BLOCK_M 128
#define PT_ATTN_FWD_BLOCK_N_D64 64
#define PT_ATTN_FWD_BLOCK_N_D128 32
/* deterministic dQ kernel: 64 x 64 tiles, 16 query rows per warp */
#define PT_ATTN_DQ_BLOCK_M 64
#define PT_ATTN_DQ_BLOCK_N 64
/* dK/dV kernel (FlashAttention-2's backward shapes): 8 warps, 128 keys per CTA; query steps of 128
 * rows (D = 64) or 64 rows (D = 128) */
#define PT_ATTN_BWD_THREADS 256
#define PT_ATTN_BWD_BLOCK_N 128
#define PT_ATTN_BWD_BLOCK_M_D64 128
#define PT_ATTN_BWD_BLOCK_M_D128 64
#define PT_ATTN_PRE_ROWS 16
/* rows of lse2 / delta per (sequence, query head): T rounded up to this (a multiple of every
 * query step) */
#define PT_ATTN_ROW_PAD 128
/* Shared memory bytes: rows are padded by 8 halves (16 B) against bank conflicts. */
/* forward: Q tile + one K and one V tile (FA2's schedule: V(j) loads during S(j), K(j-1) during
 * the softmax and P V(j)); dq: Q, dO tiles + 2 x (K, V) tiles. */
#define PT_ATTN_FWD_SMEM_D64 36864
#define PT_ATTN_FWD_SMEM_D128 52224
#define PT_ATTN_DQ_SMEM_D64 55296
#define PT_ATTN_DQ_SMEM_D128 104448
/* dK/dV: K, V tiles + 2 x Q tile + dO tile + P and dS tiles (BM x BN) + 2 x (lse2, delta) rows. */
#define PT_ATTN_DKDV_SMEM_D64 163840
#define PT_ATTN_DKDV_SMEM_D128 157696

/* Sizes and flags of one prefix-attention call, passed by value to every kernel of the family;
 * the buffers above are separate kernel arguments, in the order each kernel lists them:
 *   prefix_attn_fwd_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, o, lse)
 *   prefix_attn_bwd_preprocess(p, valid_len, o, d_o, lse, lse2, delta, dq_accum)
 *   prefix_attn_bwd_dkdv_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, lse2, d_o,
 *                           delta, dq_accum, dpk_partial, dpv_partial, dk_partial, dv_partial,
 *                           dk, dv)
 *   prefix_attn_bwd_dq_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, lse2, d_o,
 *                         delta, dq)
 *   prefix_attn_bwd_dq_convert(p, dq_accum, dq)
 *   prefix_attn_bwd_kv_reduce(p, dk_partial, dv_partial, dk, dv)
 *   prefix_attn_bwd_prefix_reduce(p, prefix_index, dpk_partial, dpv_partial, d_prefix_k,
 *                                 d_prefix_v)
 */
typedef struct pt_attn_params {
    int32_t batch;
    int32_t q_heads;
    int32_t kv_heads;
    int32_t seq;
    int32_t prefix;
    int32_t head_dim;
    int32_t n_prefixes;
    /* softmax scale applied to q.k (usually 1/sqrt(D)) */
    float scale;
    /* 1: dQ without float atomics (the separate prefix_attn_bwd_dq kernel, bitwise reproducible);
     * 0: dQ accumulated with fp32 atomics by prefix_attn_bwd_dkdv, then prefix_attn_bwd_dq_convert */
    int32_t deterministic;
} pt_attn_params;

#endif
