// Layout changes between token rows [B*T, row_stride] and heads [B, H, T, D], with the
// projection bias and RoPE (HF rotate-half) folded in (ABI: kernels/abi/model_ops.h,
// pt_heads_params):
// - pt_rows_to_heads: the forward of q/k/v after their (fused) projection GEMM: + bias, rotate;
// - pt_heads_to_rows: the way back: the attention output O before W_o (rope = 0), and in the
//   backward dQ/dK (inverse rotation) and dV (rope = 0) into the fused [dq | dk | dv] rows.
// RoPE angles come from fp32 cos/sin tables [n_positions, D/2] computed once on the host in f64;
// row (b, t) uses entry pos_offset[b] + t. One thread per (row, head, i < D/2): it moves the pair
// (i, i + D/2), so the rotation needs no exchange. Grid-stride.
#include "model_ops.cuh"

namespace {

// Maps a flat index over B*T*H*(D/2) (i fastest, then h, then t, then b) to its parts.
struct PairIndex {
    int64_t b, t, h, i;
};

__device__ __forceinline__ PairIndex pair_index(const pt_heads_params &p, int64_t e) {
    const int64_t half = p.head_dim / 2;
    PairIndex r;
    r.i = e % half;
    e /= half;
    r.h = e % p.heads;
    e /= p.heads;
    r.t = e % p.seq;
    r.b = e / p.seq;
    return r;
}

// cos/sin of the pair's angle; NaN outside the table.
__device__ __forceinline__ void angle(const pt_heads_params &p, const PairIndex &q,
                                      const int32_t *pos_offset, const float *cos_t,
                                      const float *sin_t, float &c, float &s) {
    const int64_t pos = (int64_t)pos_offset[q.b] + q.t;
    if (pos < 0 || pos >= p.n_positions) {
        c = s = NAN;
        return;
    }
    const int64_t e = pos * (p.head_dim / 2) + q.i;
    c = cos_t[e];
    s = sin_t[e];
}

} // namespace

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_rows_to_heads(const pt_heads_params p, const __half *__restrict__ src,
                     const __half *__restrict__ bias, const int32_t *__restrict__ pos_offset,
                     const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                     __half *__restrict__ dst) {
    const int64_t half = p.head_dim / 2;
    const int64_t n = (int64_t)p.batch * p.seq * p.heads * half;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t e = pt::ops::thread_index(); e < n; e += stride) {
        const PairIndex q = pair_index(p, e);
        const int64_t col = q.h * p.head_dim + q.i;
        const int64_t s0 = (q.b * p.seq + q.t) * p.row_stride + p.col_offset + col;
        float lo = pt::ops::ld(src, s0), hi = pt::ops::ld(src, s0 + half);
        if (bias != nullptr) {
            lo += pt::ops::ld(bias, col);
            hi += pt::ops::ld(bias, col + half);
        }
        if (p.rope) {
            float c, s;
            angle(p, q, pos_offset, cos_t, sin_t, c, s);
            const float a = lo, b = hi;
            lo = a * c - b * s;
            hi = b * c + a * s;
        }
        const int64_t d0 = ((q.b * p.heads + q.h) * p.seq + q.t) * p.head_dim + q.i;
        pt::ops::st(dst, d0, lo);
        pt::ops::st(dst, d0 + half, hi);
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_heads_to_rows(const pt_heads_params p, const __half *__restrict__ src,
                     const int32_t *__restrict__ pos_offset, const float *__restrict__ cos_t,
                     const float *__restrict__ sin_t, __half *__restrict__ dst) {
    const int64_t half = p.head_dim / 2;
    const int64_t n = (int64_t)p.batch * p.seq * p.heads * half;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t e = pt::ops::thread_index(); e < n; e += stride) {
        const PairIndex q = pair_index(p, e);
        const int64_t s0 = ((q.b * p.heads + q.h) * p.seq + q.t) * p.head_dim + q.i;
        float lo = pt::ops::ld(src, s0), hi = pt::ops::ld(src, s0 + half);
        if (p.rope) { // the transpose of the rotation: rotate by -angle
            float c, s;
            angle(p, q, pos_offset, cos_t, sin_t, c, s);
            const float a = lo, b = hi;
            lo = a * c + b * s;
            hi = b * c - a * s;
        }
        const int64_t d0 = (q.b * p.seq + q.t) * p.row_stride + p.col_offset + q.h * p.head_dim + q.i;
        pt::ops::st(dst, d0, lo);
        pt::ops::st(dst, d0 + half, hi);
    }
}
