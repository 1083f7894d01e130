// Optimizer steps on fp32 master weights with fp32 gradients (ABI: kernels/abi/optim.h), and the
// sum-of-squares reduction behind the global gradient norm.
//
// - pt_adamw_step / pt_adamw_step_f16: torch.optim.AdamW's update, element-wise; the _f16 variant
//   also writes the updated weights rounded to fp16 (the copy the fp16 forward pass reads);
// - pt_sgd_step / pt_sgd_momentum_step (+ _f16): torch.optim.SGD (L2 weight decay added to the
//   gradient, optional momentum buffer);
// - pt_adamw_step_clipped / pt_sgd_step_clipped / pt_sgd_momentum_step_clipped: the same updates
//   with the clipping factor computed on the device from the gradient's sum of squares (and the
//   step skipped when it is not finite), so a training step needs no host round trip;
// - pt_axpy: y += alpha * x (gradient accumulation);
// - pt_sum_squares_partial + pt_sum_squares_finish: deterministic two-stage sum of x^2 (fixed
//   grid, fixed tree order: the same input always gives the same bits).
// No fast-math: sqrtf and the division are IEEE-rounded, so the CPU f64 reference bounds the error.
#include "common.cuh"

namespace {

template <bool WRITE_F16>
__device__ __forceinline__ void adamw(const pt_adamw_params p, float *__restrict__ param,
                                      const float *__restrict__ grad, float *__restrict__ m,
                                      float *__restrict__ v, __half *__restrict__ param_f16) {
    const int64_t stride = pt::grid_thread_count();
    for (int64_t i = pt::global_thread_index(); i < p.n; i += stride) {
        const float g = grad[i] * p.grad_scale;
        float w = param[i] * p.decay;
        const float mi = m[i] + p.one_minus_beta1 * (g - m[i]);
        const float vi = p.beta2 * v[i] + p.one_minus_beta2 * g * g;
        const float denom = sqrtf(vi) / p.bias_correction2_sqrt + p.eps;
        w -= p.step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
        param[i] = w;
        if (WRITE_F16) {
            param_f16[i] = __float2half_rn(w);
        }
    }
}

template <bool MOMENTUM, bool WRITE_F16>
__device__ __forceinline__ void sgd(const pt_sgd_params p, float *__restrict__ param,
                                    const float *__restrict__ grad, float *__restrict__ buf,
                                    __half *__restrict__ param_f16) {
    const int64_t stride = pt::grid_thread_count();
    for (int64_t i = pt::global_thread_index(); i < p.n; i += stride) {
        const float w = param[i];
        float g = grad[i] * p.grad_scale + p.weight_decay * w;
        if (MOMENTUM) {
            g = p.first_step ? g : p.momentum * buf[i] + g;
            buf[i] = g;
        }
        const float updated = w - p.lr * g;
        param[i] = updated;
        if (WRITE_F16) {
            param_f16[i] = __float2half_rn(updated);
        }
    }
}

// The gradient factor of a *_clipped kernel (kernels/abi/optim.h): false when the norm is not
// finite (the step is skipped; every thread of the grid sees the same value).
__device__ __forceinline__ bool clip_factor(const pt_clip_params c, const float *__restrict__ sum_sq,
                                            float grad_scale, float *factor) {
    const float norm = sqrtf(*sum_sq) * grad_scale;
    // NaN fails the comparison too.
    if (!(fabsf(norm) <= 3.402823466e+38f)) {
        return false;
    }
    float coef = 1.0f;
    if (c.max_norm > 0.0f) {
        coef = fminf(1.0f, c.max_norm / (norm + 1e-6f));
    }
    *factor = grad_scale * coef;
    return true;
}

}  // namespace

extern "C" __global__ void pt_adamw_step_clipped(pt_adamw_params p, const pt_clip_params c,
                                                 const float *__restrict__ sum_sq,
                                                 float *__restrict__ param,
                                                 const float *__restrict__ grad,
                                                 float *__restrict__ m, float *__restrict__ v) {
    if (clip_factor(c, sum_sq, p.grad_scale, &p.grad_scale)) {
        adamw<false>(p, param, grad, m, v, nullptr);
    }
}

extern "C" __global__ void pt_sgd_step_clipped(pt_sgd_params p, const pt_clip_params c,
                                               const float *__restrict__ sum_sq,
                                               float *__restrict__ param,
                                               const float *__restrict__ grad) {
    if (clip_factor(c, sum_sq, p.grad_scale, &p.grad_scale)) {
        sgd<false, false>(p, param, grad, nullptr, nullptr);
    }
}

extern "C" __global__ void pt_sgd_momentum_step_clipped(pt_sgd_params p, const pt_clip_params c,
                                                        const float *__restrict__ sum_sq,
                                                        float *__restrict__ param,
                                                        const float *__restrict__ grad,
                                                        float *__restrict__ buf) {
    if (clip_factor(c, sum_sq, p.grad_scale, &p.grad_scale)) {
        sgd<true, false>(p, param, grad, buf, nullptr);
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_axpy(const pt_axpy_params p, const float *__restrict__ x, float *__restrict__ y) {
    const int64_t stride = pt::grid_thread_count();
    for (int64_t i = pt::global_thread_index(); i < p.n; i += stride) {
        y[i] = fmaf(p.alpha, x[i], y[i]);
    }
}

extern "C" __global__ void pt_adamw_step(const pt_adamw_params p, float *__restrict__ param,
                                         const float *__restrict__ grad, float *__restrict__ m,
                                         float *__restrict__ v) {
    adamw<false>(p, param, grad, m, v, nullptr);
}

extern "C" __global__ void pt_adamw_step_f16(const pt_adamw_params p, float *__restrict__ param,
                                             const float *__restrict__ grad,
                                             float *__restrict__ m, float *__restrict__ v,
                                             __half *__restrict__ param_f16) {
    adamw<true>(p, param, grad, m, v, param_f16);
}

extern "C" __global__ void pt_sgd_step(const pt_sgd_params p, float *__restrict__ param,
                                       const float *__restrict__ grad) {
    sgd<false, false>(p, param, grad, nullptr, nullptr);
}

extern "C" __global__ void pt_sgd_step_f16(const pt_sgd_params p, float *__restrict__ param,
                                           const float *__restrict__ grad,
                                           __half *__restrict__ param_f16) {
    sgd<false, true>(p, param, grad, nullptr, param_f16);
}

extern "C" __global__ void pt_sgd_momentum_step(const pt_sgd_params p, float *__restrict__ param,
                                                const float *__restrict__ grad,
                                                float *__restrict__ buf) {
    sgd<true, false>(p, param, grad, buf, nullptr);
}

extern "C" __global__ void pt_sgd_momentum_step_f16(const pt_sgd_params p,
                                                    float *__restrict__ param,
                                                    const float *__restrict__ grad,
                                                    float *__restrict__ buf,
                                                    __half *__restrict__ param_f16) {
    sgd<true, true>(p, param, grad, buf, param_f16);
}

// Stage 1: block b writes the sum of x[i]^2 over its grid-stride share to partials[b].
// Launch with PT_REDUCE_THREADS threads, at most PT_REDUCE_MAX_BLOCKS blocks and PT_REDUCE_SMEM
// bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(PT_REDUCE_THREADS)
    pt_sum_squares_partial(const pt_reduce_params p, const float *__restrict__ x,
                           float *__restrict__ partials) {
    PT_DYNAMIC_SMEM(smem);
    float *scratch = reinterpret_cast<float *>(smem);
    float acc = 0.0f;
    const int64_t stride = pt::grid_thread_count();
    for (int64_t i = pt::global_thread_index(); i < p.n; i += stride) {
        const float xi = x[i];
        acc = fmaf(xi, xi, acc);
    }
    const float total = pt::block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = total;
    }
}

// Stage 2: one block of PT_REDUCE_THREADS threads adds the p.n partials into out[0]
// (overwriting it, or adding to it when p.accumulate != 0); PT_REDUCE_SMEM bytes of dynamic
// shared memory.
extern "C" __global__ void __launch_bounds__(PT_REDUCE_THREADS)
    pt_sum_squares_finish(const pt_reduce_params p, const float *__restrict__ partials,
                          float *__restrict__ out) {
    PT_DYNAMIC_SMEM(smem);
    float *scratch = reinterpret_cast<float *>(smem);
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
        acc += partials[i];
    }
    const float total = pt::block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        out[0] = p.accumulate ? out[0] + total : total;
    }
}
