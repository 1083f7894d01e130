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

// ---------------------------------------------------------------------------------------------
// Split-KV decode attention (flash-decoding), ABI in abi/decode.h.
//
// pt_decode_split_lL: one CTA of PT_DECODE_SPLIT_THREADS threads per (sequence x kv head, key
// split, row group). A row group is up to PT_DECODE_SPLIT_ROWS query rows (token t, query head h)
// of the kv head's GQA group, r = t * G + h: their query heads share every K/V load. L lanes
// hold one key (L = 8, 16, 32 for D <= 64, 128, 256): lane c of the group loads the key's and the
// value's 8 halves c*8 .. c*8+7 with one 16-byte load each, so a warp covers 32 / L keys per
// load, the CTA's warps take consecutive key slots (several warps per query row), and each lane
// group keeps its own online-softmax state per row in base 2 (scale * log2(e) folded into q).
// At the end the groups of a warp merge through shuffles, the warps through shared memory, and
// the CTA writes either the output (one split) or an fp32 partial (O normalised, base-2 LSE)
// that pt_decode_combine merges over the splits.

namespace pt {
namespace decode {

constexpr int kRows = PT_DECODE_SPLIT_ROWS;
constexpr int kSplitWarps = PT_DECODE_SPLIT_THREADS / 32;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
}

__device__ __forceinline__ void unpack8(const uint4 &u, float f[8]) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 x = __half22float2(h[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

// Merges the softmax state (m2, l2, a2) into (m, l, a) (base 2; m = -inf: empty).
__device__ __forceinline__ void merge_state(float &m, float &l, float a[8], float m2, float l2,
                                            const float a2[8]) {
    const float mx = fmaxf(m, m2);
    const float f1 = m == -INFINITY ? 0.f : ex2_approx(m - mx);
    const float f2 = m2 == -INFINITY ? 0.f : ex2_approx(m2 - mx);
    l = l * f1 + l2 * f2;
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = a[e] * f1 + a2[e] * f2;
    m = mx;
}

template <int L>
__device__ __forceinline__ void split_body(const pt_decode_params &p, const __half *q,
                                           const __half *k_new, const __half *v_new,
                                           const __half *cache_k, const __half *cache_v,
                                           const int32_t *past, const int32_t *n_new, __half *o,
                                           float *o_part, float *lse_part, unsigned char *smem) {
    constexpr int KPW = 32 / L;                  // keys per warp per load
    constexpr int kStride = kSplitWarps * KPW;   // keys per CTA per load
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int grp = lane / L, c = lane % L;
    const int D = p.head_dim, G = p.q_heads / p.kv_heads, T = p.n_new;
    const int bk = blockIdx.x, b = bk / p.kv_heads, hk = bk % p.kv_heads;
    const int split = blockIdx.y, r0 = blockIdx.z * kRows;
    const int nn = n_new[b], n_past = past[b];
    const bool chunk = c * 8 < D; // this lane's 8 dims exist
    const float qscale = p.scale * kLog2e;

    // The rows: token t, head h of the group; valid when t < n_new[b].
    int row_t[kRows], row_h[kRows];
    bool row_ok[kRows];
    int t_max = -1;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int rr = r0 + r;
        row_t[r] = rr / G;
        row_h[r] = hk * G + rr % G;
        row_ok[r] = rr < G * T && row_t[r] < nn;
        if (row_ok[r]) t_max = row_t[r] > t_max ? row_t[r] : t_max;
    }
    // Keys of this split: [k_lo, k_hi) of the virtual sequence cache[0, past) ++ new[0, T).
    const int k_lo = split * p.keys_per_split;
    const int k_end = n_past + t_max + 1;
    const int k_hi = k_lo + p.keys_per_split < k_end ? k_lo + p.keys_per_split : k_end;

    float qv[kRows][8], m[kRows], l[kRows], acc[kRows][8];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (row_ok[r] && chunk) {
            const int64_t at = (((int64_t)b * p.q_heads + row_h[r]) * T + row_t[r]) * D + c * 8;
            unpack8(*reinterpret_cast<const uint4 *>(q + at), f);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            qv[r][e] = f[e] * qscale;
            acc[r][e] = 0.f;
        }
        m[r] = -INFINITY;
        l[r] = 0.f;
    }

    const int64_t cache_base = ((int64_t)b * p.kv_heads + hk) * p.capacity * D + c * 8;
    const int64_t new_base = ((int64_t)b * p.kv_heads + hk) * (int64_t)T * D + c * 8;
    auto load = [&](int j, uint4 &kk, uint4 &vv) {
        kk = make_uint4(0u, 0u, 0u, 0u);
        vv = kk;
        if (j < k_hi && chunk) {
            const int64_t at = j < n_past ? cache_base + (int64_t)j * D : new_base + (int64_t)(j - n_past) * D;
            const __half *kp = j < n_past ? cache_k : k_new;
            const __half *vp = j < n_past ? cache_v : v_new;
            kk = *reinterpret_cast<const uint4 *>(kp + at);
            vv = *reinterpret_cast<const uint4 *>(vp + at);
        }
    };
    auto visit = [&](int j, const uint4 &kk, const uint4 &vv) {
        float kf[8], vf[8];
        unpack8(kk, kf);
        unpack8(vv, vf);
        float s[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) part = fmaf(qv[r][e], kf[e], part);
            s[r] = part;
        }
#pragma unroll
        for (int mk = 1; mk < L; mk <<= 1)
#pragma unroll
            for (int r = 0; r < kRows; ++r) s[r] += shfl_xor(s[r], mk);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            // Row r sees virtual key j when j <= past + t (its own new token included).
            if (!(row_ok[r] && j < k_hi && j <= n_past + row_t[r])) continue;
            const float mx = fmaxf(m[r], s[r]);
            const float corr = ex2_approx(m[r] - mx); // m = -inf: 0
            const float pw = ex2_approx(s[r] - mx);
            l[r] = fmaf(l[r], corr, pw);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(acc[r][e], corr, pw * vf[e]);
            m[r] = mx;
        }
    };
    // Two keys per lane group in flight: both loads are issued before either is used. The loop
    // runs on the warp's first key (uniform over the warp: the shuffles need every lane); a
    // group whose key is past k_hi visits it masked.
    for (int jw = k_lo + warp * KPW; jw < k_hi; jw += 2 * kStride) {
        const int j = jw + grp;
        uint4 k0, v0, k1, v1;
        load(j, k0, v0);
        load(j + kStride, k1, v1);
        visit(j, k0, v0);
        visit(j + kStride, k1, v1);
    }

    // Merge the lane groups of the warp (lanes c, c + L, ...).
#pragma unroll
    for (int mk = L; mk < 32; mk <<= 1)
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float a2[8];
            const float m2 = shfl_xor(m[r], mk), l2 = shfl_xor(l[r], mk);
#pragma unroll
            for (int e = 0; e < 8; ++e) a2[e] = shfl_xor(acc[r][e], mk);
            merge_state(m[r], l[r], acc[r], m2, l2, a2);
        }
    // Merge the warps through shared memory: [warp][row] (m, l) and [warp][row][8 L] acc.
    float *s_ml = reinterpret_cast<float *>(smem);             // [W][R][2]
    float *s_acc = s_ml + kSplitWarps * kRows * 2;            // [W][R][8 L]
    if (lane < L) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            if (lane == 0) {
                s_ml[(warp * kRows + r) * 2] = m[r];
                s_ml[(warp * kRows + r) * 2 + 1] = l[r];
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) s_acc[(warp * kRows + r) * 8 * L + c * 8 + e] = acc[r][e];
        }
    }
    sync_block();
    // Thread (r, c) of the first kRows * L threads writes row r's dims c*8 ..
    if (tid < kRows * L) {
        const int r = tid / L, cc = tid % L;
        int rt = 0, rh = 0;
        bool ok = false;
#pragma unroll
        for (int i = 0; i < kRows; ++i)
            if (i == r) {
                rt = row_t[i];
                rh = row_h[i];
                ok = row_ok[i] || (r0 + i < G * T && p.n_splits == 1); // padding rows: zeros
            }
        if (ok && cc * 8 < D) {
            float mm = -INFINITY, ll = 0.f, a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int w = 0; w < kSplitWarps; ++w) {
                float a2[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) a2[e] = s_acc[(w * kRows + r) * 8 * L + cc * 8 + e];
                merge_state(mm, ll, a, s_ml[(w * kRows + r) * 2], s_ml[(w * kRows + r) * 2 + 1], a2);
            }
            const float inv = ll > 0.f ? 1.f / ll : 0.f;
            const int64_t row = ((int64_t)b * p.q_heads + rh) * T + rt;
            if (p.n_splits == 1) {
                uint4 h;
                h.x = pack2(a[0] * inv, a[1] * inv);
                h.y = pack2(a[2] * inv, a[3] * inv);
                h.z = pack2(a[4] * inv, a[5] * inv);
                h.w = pack2(a[6] * inv, a[7] * inv);
                *reinterpret_cast<uint4 *>(o + row * D + cc * 8) = h;
            } else {
                const int64_t rows = (int64_t)p.batch * p.q_heads * T;
                float *op = o_part + ((int64_t)split * rows + row) * D + cc * 8;
                reinterpret_cast<float4 *>(op)[0] = make_float4(a[0] * inv, a[1] * inv, a[2] * inv, a[3] * inv);
                reinterpret_cast<float4 *>(op)[1] = make_float4(a[4] * inv, a[5] * inv, a[6] * inv, a[7] * inv);
                if (cc == 0) lse_part[(int64_t)split * rows + row] = ll > 0.f ? mm + log2f(ll) : -INFINITY;
            }
        }
    }
}

template <int L> constexpr int split_smem() { return kSplitWarps * kRows * (2 + 8 * L) * 4; }
static_assert(split_smem<8>() == PT_DECODE_SPLIT_SMEM_D64, "abi/decode.h out of step");
static_assert(split_smem<16>() == PT_DECODE_SPLIT_SMEM_D128, "abi/decode.h out of step");
static_assert(split_smem<32>() == PT_DECODE_SPLIT_SMEM_D256, "abi/decode.h out of step");

// pt_decode_combine: one warp per query row (sequence, head, token): O = sum over the splits of
// 2^(lse_s - max) O_s / sum of the weights; rows t >= n_new[b] are zeros.
__device__ __forceinline__ void combine_body(const pt_decode_params &p, const int32_t *n_new,
                                             const float *o_part, const float *lse_part, __half *o) {
    const int lane = threadIdx.x % 32;
    // Rows fit int32 (checked by the launch wrapper): 32-bit division, no call frame.
    const int rows = p.batch * p.q_heads * p.n_new;
    const int row = (int)blockIdx.x * (PT_DECODE_COMBINE_THREADS / 32) + (int)threadIdx.x / 32;
    if (row >= rows) return; // uniform over the warp
    const int D = p.head_dim, t = row % p.n_new, b = row / (p.q_heads * p.n_new);
    __half *out = o + (int64_t)row * D;
    if (t >= n_new[b]) {
        for (int d = 2 * lane; d < D; d += 64) *reinterpret_cast<uint32_t *>(out + d) = 0u;
        return;
    }
    float mx = -INFINITY;
    for (int s = lane; s < p.n_splits; s += 32) mx = fmaxf(mx, lse_part[(int64_t)s * rows + row]);
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) mx = fmaxf(mx, shfl_xor(mx, k));
    // Every valid row sees its own token: some split holds a key, mx is finite.
    for (int d = 4 * lane; d < D; d += 128) {
        float a[4] = {0.f, 0.f, 0.f, 0.f}, wsum = 0.f;
        for (int s = 0; s < p.n_splits; ++s) {
            const float ls = lse_part[(int64_t)s * rows + row];
            if (ls == -INFINITY) continue; // an empty split
            const float w = ex2_approx(ls - mx);
            const float4 x = *reinterpret_cast<const float4 *>(o_part + ((int64_t)s * rows + row) * D + d);
            a[0] = fmaf(w, x.x, a[0]);
            a[1] = fmaf(w, x.y, a[1]);
            a[2] = fmaf(w, x.z, a[2]);
            a[3] = fmaf(w, x.w, a[3]);
            wsum += w;
        }
        const float inv = 1.f / wsum;
        uint2 h;
        h.x = pack2(a[0] * inv, a[1] * inv);
        h.y = pack2(a[2] * inv, a[3] * inv);
        *reinterpret_cast<uint2 *>(out + d) = h;
    }
}

} // namespace decode
} // namespace pt

#define PT_DECODE_SPLIT(NAME, L)                                                                \
    extern "C" __global__ void __launch_bounds__(PT_DECODE_SPLIT_THREADS) NAME(                 \
        const pt_decode_params p, const __half *__restrict__ q, const __half *__restrict__ k_new, \
        const __half *__restrict__ v_new, const __half *__restrict__ cache_k,                   \
        const __half *__restrict__ cache_v, const int32_t *__restrict__ past,                   \
        const int32_t *__restrict__ n_new, __half *__restrict__ o, float *__restrict__ o_part,  \
        float *__restrict__ lse_part) {                                                         \
        PT_DYNAMIC_SMEM(pt_smem);                                                               \
        pt::decode::split_body<L>(p, q, k_new, v_new, cache_k, cache_v, past, n_new, o, o_part,  \
                                  lse_part, pt_smem);                                           \
    }

PT_DECODE_SPLIT(pt_decode_split_d64, 8)
PT_DECODE_SPLIT(pt_decode_split_d128, 16)
PT_DECODE_SPLIT(pt_decode_split_d256, 32)

extern "C" __global__ void __launch_bounds__(PT_DECODE_COMBINE_THREADS)
    pt_decode_combine(const pt_decode_params p, const int32_t *__restrict__ n_new,
                      const float *__restrict__ o_part, const float *__restrict__ lse_part,
                      __half *__restrict__ o) {
    pt::decode::combine_body(p, n_new, o_part, lse_part, o);
}
