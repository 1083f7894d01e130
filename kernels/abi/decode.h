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
 * head_dim <= PT_DECODE_MAX_HEAD_DIM; past[b] <= capacity.
 * Plain C for bindgen: fixed-width types, no pointers, no enums.
 */
#ifndef PT_ABI_DECODE_H
#define PT_ABI_DECODE_H

#include <stdint.h>

#define PT_DECODE_THREADS 32
#define PT_DECODE_MAX_HEAD_DIM 256

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
} pt_decode_params;

#endif /* PT_ABI_DECODE_H */
