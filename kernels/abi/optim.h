/* ABI of kernels/optim.cu: optimizer steps on fp32 master weights and the grad-norm reduction. */
#ifndef PT_ABI_OPTIM_H
#define PT_ABI_OPTIM_H

#include <stdint.h>

/* One AdamW step, exactly torch.optim.AdamW (amsgrad=False, maximize=False), as src/optim.rs:
 *   g  = grad * grad_scale
 *   p  = p * decay                              decay = 1 - lr * weight_decay
 *   m  = m + one_minus_beta1 * (g - m)          (torch's lerp)
 *   v  = beta2 * v + one_minus_beta2 * g * g
 *   p  = p - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
 * with step_size = lr / (1 - beta1^t) and bias_correction2_sqrt = sqrt(1 - beta2^t). Every scalar
 * is computed on the host in f64 and rounded once to f32 (t counts from 1). */
typedef struct pt_adamw_params {
    int64_t n;
    float decay;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float eps;
    float step_size;
    float bias_correction2_sqrt;
    /* multiplies every gradient first: clipping factor times 1/loss_scale, folded */
    float grad_scale;
} pt_adamw_params;

/* One SGD step, torch.optim.SGD (dampening 0, no Nesterov; weight decay is L2, added to the
 * gradient), as src/optim.rs:
 *   g = grad * grad_scale + weight_decay * p
 *   with momentum (the pt_sgd_momentum_* kernels): b = g on the first step (first_step != 0),
 *   else b = momentum * b + g; then g = b
 *   p = p - lr * g */
typedef struct pt_sgd_params {
    int64_t n;
    float lr;
    float weight_decay;
    float grad_scale;
    float momentum;
    int32_t first_step;
} pt_sgd_params;

/* Threads per block of the reductions (pt_sum_squares_partial / pt_sum_squares_finish) and the
 * most blocks the first stage may use (the finishing stage reduces at most this many partials). */
#define PT_REDUCE_THREADS 256
#define PT_REDUCE_MAX_BLOCKS 1024
/* Dynamic shared memory of both reduction kernels: one float per warp (at most 32 warps). */
#define PT_REDUCE_SMEM 128

/* Sum of squares of n fp32 values, in two stages: stage 1 writes one partial per block,
 * stage 2 (one block) adds the `n` partials; with `accumulate` != 0 it adds to *out instead of
 * overwriting it (global norm over several tensors). */
typedef struct pt_reduce_params {
    int64_t n;
    int32_t accumulate;
} pt_reduce_params;

/* Clipping on the device (the *_clipped optimizer kernels), so that a training step needs no
 * host round trip between its backward and its update: `sum_sq` (device memory, written by
 * pt_sum_squares_*) is the sum of squares of the gradient as stored, which the kernel first
 * multiplies by the params' grad_scale (1/loss_scale). Every thread computes
 *   norm = sqrt(sum_sq) * grad_scale
 * and, when norm is not finite (an fp16 overflow), leaves every buffer untouched (the step is
 * skipped); otherwise the gradient factor is grad_scale * min(1, max_norm / (norm + 1e-6))
 * (torch.nn.utils.clip_grad_norm_; max_norm 0: no clipping). */
typedef struct pt_clip_params {
    float max_norm;
} pt_clip_params;

/* y += alpha * x over n fp32 values (pt_axpy: gradient accumulation over micro-batches). */
typedef struct pt_axpy_params {
    int64_t n;
    float alpha;
} pt_axpy_params;

#endif /* PT_ABI_OPTIM_H */
