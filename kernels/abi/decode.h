/* Launch parameters of the KV-cache decode attention (kernels/decode_attention.cu).
 *
 * pt_decode_attention(p, q [B, Hq, T, D] f16, k_new [B, Hkv, T, D] f16, v_new [B, Hkv, T, D] f16,
 *                     cache_k [B, Hkv, capacity, D] f16, cache_v [B, Hkv, capacity, D] f16,
 *                     past [B] int32, n_new [B] int32, o [B, Hq, T, D] f16 out)
 *   Sequence b has past[b] cached entries (its prefix first, then the tokens seen so far) and
 *   n_new[b] <= T new tokens. Query row t < n_new[b] of head h attends over
 *     cache[b, h / (Hq/Hkv), 0 .. past[b]]  ++  new[b, h / (Hq/Hkv), 0 .. t]   (inclusive)
 *   with softmax(scale * q.k) in fp32; rows t >= n_new[b] are written as zeros.
 *   The new keys are read from k_new/v_new (the caller appends them to the cache afterwards).
 * Launch grid (T, Hq, B), PT_DECODE_THREADS threads (one warp per query row), no shared memory.
 * head_dim <= PT_DECODE_MAX_HEAD_DIM; past[b] <= capacity. (The fallback for head dims that are
 * not a multiple of 8; the host emulation runs it too.)
 *
 * Split-KV (flash-decoding), head_dim a multiple of 8, at most 64 / 128 / 256:
 *   pt_decode_split_d64 / _d128 / _d256(p, q, k_new, v_new, cache_k, cache_v, past, n_new, o,
 *                                       o_part [n_splits, B, Hq, T, D] f32,
 *                                       lse_part [n_splits, B, Hq, T] f32)
 *     grid (B * Hkv, n_splits, ceil(G * T / PT_DECODE_SPLIT_ROWS)), G = Hq / Hkv,
 *     PT_DECODE_SPLIT_THREADS threads, PT_DECODE_SPLIT_SMEM_D64/_D128/_D256 bytes of dynamic
 *     shared memory. CTA (b * Hkv + hk, s, z) covers the virtual keys
 *     [s * keys_per_split, (s + 1) * keys_per_split) of cache ++ new for the query rows
 *     r = z * PT_DECODE_SPLIT_ROWS + i (token r / G, head hk * G + r % G) of kv head hk: the
 *     group's heads share each K/V load. With n_splits = 1 it writes o itself (zeros on rows
 *     t >= n_new[b]); otherwise, for every valid row, the split's normalised output and its
 *     base-2 log-sum-exp (-inf when the split holds no visible key), and
 *   pt_decode_combine(p, n_new, o_part, lse_part, o)
 *     grid ceil(B * Hq * T / (PT_DECODE_COMBINE_THREADS / 32)), one warp per row, merges them.
 * Plain C for bindgen: fixed-width types, no pointers, no enums.
 */
#ifndef PT_ABI_DECODE_H
#define PT_ABI_DECODE_H

#include <stdint.h>

#define PT_DECODE_THREADS 32
#define PT_DECODE_MAX_HEAD_DIM 256
#define PT_DECODE_SPLIT_THREADS 128
/* query rows (token, head of the GQA group) per split CTA */
#define PT_DECODE_SPLIT_ROWS 4
/* per-warp softmax states: 4 warps x 4 rows x (2 + 8 L) floats, L = 8, 16, 32 lanes per key */
#define PT_DECODE_SPLIT_SMEM_D64 (4 * 4 * (2 + 64) * 4)
#define PT_DECODE_SPLIT_SMEM_D128 (4 * 4 * (2 + 128) * 4)
#define PT_DECODE_SPLIT_SMEM_D256 (4 * 4 * (2 + 256) * 4)
#define PT_DECODE_COMBINE_THREADS 128

typedef struct pt_decode_params {
    int32_t batch;
    int32_t q_heads;
    int32_t kv_heads;
    int32_t head_dim;
    /* new-token slots per sequence (T) */
    int32_t n_new;
    /* cache entries per (sequence, kv head) */
    int32_t capacity;
    /* softmax scale, 1/sqrt(head_dim) */
    float scale;
    /* split-KV kernels only: keys of the virtual sequence per split, and the number of splits */
    int32_t keys_per_split;
    int32_t n_splits;
} pt_decode_params;

#endif /* PT_ABI_DECODE_H */
