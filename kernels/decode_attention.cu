// KV-cache decode attention (ABI: kernels/abi/decode.h, pt_decode_params).
//
// One warp per (sequence, query head, new-token row). Lane l owns the head dimensions
// l, l + 32, ... (at most PT_DECODE_MAX_HEAD_DIM / 32 per lane, in registers). The warp walks
// the keys one by one: each lane's partial dot product is summed across the warp, and every lane
// keeps the same online-softmax state (running max and sum) and rescales its own slice of the
// output accumulator. fp32 math throughout; one fp16 rounding on store.
#include "model_ops.cuh"

#include "abi/decode.h"

namespace pt {
namespace decode {

constexpr int kPerLane = PT_DECODE_MAX_HEAD_DIM / 32;

// One key/value entry into the running softmax state.
__device__ __forceinline__ void visit(const float qv[kPerLane], const __half *k, const __half *v,
                                      int lane, int d, float scale, float &m, float &l,
                                      float acc[kPerLane]) {
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < d) part += qv[i] * __half2float(k[c]);
    }
    const float s = pt::ops::warp_sum(part) * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new); // m = -inf at the first entry: corr = 0
    const float e = expf(s - m_new);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        acc[i] = acc[i] * corr + (c < d ? e * __half2float(v[c]) : 0.0f);
    }
    m = m_new;
}

} // namespace decode
} // namespace pt

extern "C" __global__ void __launch_bounds__(PT_DECODE_THREADS)
    pt_decode_attention(const pt_decode_params p, const __half *__restrict__ q,
                        const __half *__restrict__ k_new, const __half *__restrict__ v_new,
                        const __half *__restrict__ cache_k, const __half *__restrict__ cache_v,
                        const int32_t *__restrict__ past, const int32_t *__restrict__ n_new,
                        __half *__restrict__ o) {
    using pt::decode::kPerLane;
    const int t = (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int lane = (int)(threadIdx.x & 31);
    const int d = p.head_dim, T = p.n_new;
    const int hkv = h / (p.q_heads / p.kv_heads);
    const int64_t q_row = (((int64_t)b * p.q_heads + h) * T + t) * d;
    if (t >= n_new[b]) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int c = lane + 32 * i;
            if (c < d) o[q_row + c] = __float2half_rn(0.0f);
        }
        return;
    }
    float qv[kPerLane], acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        qv[i] = c < d ? __half2float(q[q_row + c]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int64_t cache_base = ((int64_t)b * p.kv_heads + hkv) * p.capacity * d;
    const int n_past = past[b];
    for (int j = 0; j < n_past; ++j) {
        const int64_t at = cache_base + (int64_t)j * d;
        pt::decode::visit(qv, cache_k + at, cache_v + at, lane, d, p.scale, m, l, acc);
    }
    const int64_t new_base = ((int64_t)b * p.kv_heads + hkv) * T * d;
    for (int j = 0; j <= t; ++j) {
        const int64_t at = new_base + (int64_t)j * d;
        pt::decode::visit(qv, k_new + at, v_new + at, lane, d, p.scale, m, l, acc);
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < d) o[q_row + c] = __float2half_rn(acc[i] * inv);
    }
}
