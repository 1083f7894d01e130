/* Launch parameters of the fused prefix-attention kernels (kernels/prefix_attention.cu).
 *
 * Shared by the CUDA kernels, the host emulation and Rust (through bindgen), so it is plain C.
 *
 * Buffers (all contiguous, row-major), passed as separate kernel arguments:
 *   q, o, d_o, dq             [B, Hq, T, D]      fp16 (uint16_t bit patterns)
 *   k, v, dk, dv              [B, Hkv, T, D]     fp16
 *   prefix_k, prefix_v        [n_prefixes, Hkv, P, D] fp16 (the prefix bank)
 *   d_prefix_k, d_prefix_v    [n_prefixes, Hkv, P, D] fp16, summed over the sequences using each
 *                             prefix and over the query heads of each kv head
 *   prefix_index, valid_len   [B] int32; prefix_index[b] < 0: sequence b sees no prefix (its
 *                             rows attend over their own keys; it adds nothing to d_prefix_*)
 *   lse, delta                [B, Hq, T] fp32; lse is the NATURAL-log sum of exponentials of the
 *                             scaled scores of each row (0 on padding rows), delta = rowsum(dO*O)
 *   dq_accum                  [B, Hq, T, D] fp32 scratch (atomic mode only)
 *   dpk_partial, dpv_partial  [B, Hkv, P, D] fp32 scratch: per-sequence prefix gradients, reduced
 *                             over the sequences in batch order by prefix_attn_bwd_prefix_reduce
 * Query head h reads kv head h / (Hq / Hkv). Row t of sequence b is padding when t >= valid_len[b]:
 * its O and LSE are 0 and it contributes to no gradient. Keys are [prefix ++ sequence]: the prefix
 * is always visible, the sequence is causal (query t sees sequence keys 0..=t). P may be 0.
 * Supported head dims: 64 and 128 (one kernel per head dim, suffix _d64 / _d128).
 *
 * Kernels and their launch shapes (all blocks have PT_ATTN_THREADS threads):
 *   prefix_attn_fwd_dD            grid (ceil(T / PT_ATTN_FWD_BLOCK_M), B*Hq)
 *   prefix_attn_bwd_preprocess    grid (ceil(T / PT_ATTN_PRE_ROWS), B*Hq)        (any D)
 *   prefix_attn_bwd_dkdv_dD       grid (ceil(P / BN) + ceil(T / BN), B*Hkv), BN = PT_ATTN_BWD_BLOCK_N
 *   prefix_attn_bwd_dq_dD         grid (ceil(T / PT_ATTN_FWD_BLOCK_M), B*Hq)   (deterministic only)
 *   prefix_attn_bwd_dq_convert    grid (ceil(B*Hq*T*D / (PT_ATTN_THREADS*4)), 1)  (atomic only)
 *   prefix_attn_bwd_prefix_reduce grid (ceil(n_prefixes*Hkv*P*D / PT_ATTN_THREADS), 1) (P > 0)
 * Dynamic shared memory: PT_ATTN_*_SMEM_D64 / _D128 bytes (above 48 KB needs the attribute).
 */
#ifndef PT_ABI_ATTENTION_H
#define PT_ABI_ATTENTION_H

#include <stdint.h>

#define PT_ATTN_THREADS 128
#define PT_ATTN_FWD_BLOCK_M 64
#define PT_ATTN_FWD_BLOCK_N 64
#define PT_ATTN_BWD_BLOCK_N 64
#define PT_ATTN_BWD_BLOCK_M_D64 64
#define PT_ATTN_BWD_BLOCK_M_D128 32
#define PT_ATTN_PRE_ROWS 16
/* Shared memory bytes: rows are padded by 8 halves (16 B) against bank conflicts. */
/* forward and dq: Q tile + 2 x (K, V) tiles; dq adds the dO tile. */
#define PT_ATTN_FWD_SMEM_D64 46080
#define PT_ATTN_FWD_SMEM_D128 87040
#define PT_ATTN_DQ_SMEM_D64 55296
#define PT_ATTN_DQ_SMEM_D128 104448
/* dK/dV: K, V tiles + 2 x (Q, dO) tiles + dS tile + 2 x (lse, delta) rows. */
#define PT_ATTN_DKDV_SMEM_D64 65536
#define PT_ATTN_DKDV_SMEM_D128 75264

/* Sizes and flags of one prefix-attention call, passed by value to every kernel of the family;
 * the buffers above are separate kernel arguments, in the order each kernel lists them:
 *   prefix_attn_fwd_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, o, lse)
 *   prefix_attn_bwd_preprocess(p, valid_len, o, d_o, delta, dq_accum)
 *   prefix_attn_bwd_dkdv_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, lse, d_o,
 *                           delta, dq_accum, dpk_partial, dpv_partial, dk, dv)
 *   prefix_attn_bwd_dq_dD(p, q, k, v, prefix_k, prefix_v, prefix_index, valid_len, lse, d_o,
 *                         delta, dq)
 *   prefix_attn_bwd_dq_convert(p, dq_accum, dq)
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
