// LayerNorm (GPT-2) and RMSNorm (Llama): the forward fused with the residual add of the branch
// before it, and the backward to the input fused with the residual gradient's accumulation
// (ABI: kernels/abi/model_ops.h, pt_norm_params). The weights are frozen: no weight gradients.
//
// One warp per row (PT_NORM_ROWS_PER_BLOCK rows per block); each lane strides over the row, the
// statistics are warp sums (pt::shfl_xor). The forward makes three passes over a row that stays
// in L1/L2: residual add + first moment, centred second moment (LayerNorm: two-pass variance, as
// the reference), normalise; the backward two: the two row sums, then the gradient.
#include "model_ops.cuh"

namespace {

template <bool LAYER>
__device__ __forceinline__ void add_norm_fwd(const pt_norm_params &p, float *__restrict__ x,
                                             const __half *__restrict__ y,
                                             const __half *__restrict__ y_bias,
                                             const __half *__restrict__ w,
                                             const __half *__restrict__ b,
                                             __half *__restrict__ x_save, __half *__restrict__ h,
                                             float *__restrict__ mean, float *__restrict__ rstd) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * PT_NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= p.rows) return; // the whole warp leaves together
    const int d = p.d;
    float *xr = x + row * d;
    const int64_t base = row * d;
    float s = 0.0f;
    for (int c = lane; c < d; c += 32) {
        float v = xr[c];
        if (y != nullptr) {
            v += pt::ops::ld(y, base + c);
            if (y_bias != nullptr) v += pt::ops::ld(y_bias, c);
            xr[c] = v;
        }
        if (x_save != nullptr) pt::ops::st(x_save, base + c, v);
        s += LAYER ? v : v * v;
    }
    s = pt::ops::warp_sum(s);
    const float inv_d = 1.0f / (float)d;
    float m = 0.0f, rs;
    if (LAYER) {
        m = s * inv_d;
        float var = 0.0f;
        for (int c = lane; c < d; c += 32) {
            const float v = xr[c] - m;
            var += v * v;
        }
        var = pt::ops::warp_sum(var);
        rs = 1.0f / sqrtf(var * inv_d + p.eps);
    } else {
        rs = 1.0f / sqrtf(s * inv_d + p.eps);
    }
    for (int c = lane; c < d; c += 32) {
        float v = (xr[c] - m) * rs * pt::ops::ld(w, c);
        if (LAYER && b != nullptr) v += pt::ops::ld(b, c);
        pt::ops::st(h, base + c, v);
    }
    if (lane == 0) {
        if (LAYER && mean != nullptr) mean[row] = m;
        rstd[row] = rs;
    }
}

template <bool LAYER>
__device__ __forceinline__ void norm_bwd(const pt_norm_params &p, const __half *__restrict__ dy,
                                         const __half *__restrict__ x,
                                         const __half *__restrict__ w,
                                         const float *__restrict__ mean,
                                         const float *__restrict__ rstd, float *__restrict__ dx,
                                         __half *__restrict__ dx16) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * PT_NORM_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const int d = p.d;
    const int64_t base = row * d;
    const float m = LAYER ? mean[row] : 0.0f;
    const float rs = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int c = lane; c < d; c += 32) {
        const float g = pt::ops::ld(dy, base + c) * pt::ops::ld(w, c);
        const float xhat = (pt::ops::ld(x, base + c) - m) * rs;
        sum_g += g;
        sum_gx += g * xhat;
    }
    const float inv_d = 1.0f / (float)d;
    const float mean_g = LAYER ? pt::ops::warp_sum(sum_g) * inv_d : 0.0f;
    const float mean_gx = pt::ops::warp_sum(sum_gx) * inv_d;
    for (int c = lane; c < d; c += 32) {
        const float g = pt::ops::ld(dy, base + c) * pt::ops::ld(w, c);
        const float xhat = (pt::ops::ld(x, base + c) - m) * rs;
        float v = rs * (g - mean_g - xhat * mean_gx);
        if (p.accumulate) v += dx[base + c];
        dx[base + c] = v;
        if (dx16 != nullptr) pt::ops::st(dx16, base + c, v);
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(PT_NORM_THREADS)
    pt_add_norm_fwd(const pt_norm_params p, float *__restrict__ x, const __half *__restrict__ y,
                    const __half *__restrict__ y_bias, const __half *__restrict__ w,
                    const __half *__restrict__ b, __half *__restrict__ x_save,
                    __half *__restrict__ h, float *__restrict__ mean, float *__restrict__ rstd) {
    if (p.kind == PT_NORM_LAYER)
        add_norm_fwd<true>(p, x, y, y_bias, w, b, x_save, h, mean, rstd);
    else
        add_norm_fwd<false>(p, x, y, y_bias, w, b, x_save, h, mean, rstd);
}

extern "C" __global__ void __launch_bounds__(PT_NORM_THREADS)
    pt_norm_bwd(const pt_norm_params p, const __half *__restrict__ dy,
                const __half *__restrict__ x, const __half *__restrict__ w,
                const float *__restrict__ mean, const float *__restrict__ rstd,
                float *__restrict__ dx, __half *__restrict__ dx16) {
    if (p.kind == PT_NORM_LAYER)
        norm_bwd<true>(p, dy, x, w, mean, rstd, dx, dx16);
    else
        norm_bwd<false>(p, dy, x, w, mean, rstd, dx, dx16);
}
