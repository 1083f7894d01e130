// The LM head's pieces around its GEMM (ABI: kernels/abi/model_ops.h): the head runs on the
// target rows only, a chunk of rows at a time, so [tokens x vocab] logits are never resident.
// - pt_gather_rows: the chunk's hidden rows into a contiguous [n, d] buffer;
// - pt_cross_entropy: per row, loss = logsumexp(z) - z[target] in fp32 from fp16 logits, and the
//   logits overwritten in place by grad_scale * (softmax(z) - onehot(target));
// - pt_scatter_rows: the chunk's hidden-state gradient back to its token rows.
// The cross-entropy runs one block per row: one online-softmax pass (running max and sum, merged
// across the block), then one pass writing the gradient.
#include "model_ops.cuh"

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_gather_rows(const pt_rows_params p, const __half *__restrict__ src,
                   const int32_t *__restrict__ index, __half *__restrict__ dst) {
    const int64_t n = (int64_t)p.n * p.d;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t e = pt::ops::thread_index(); e < n; e += stride) {
        const int64_t r = e / p.d, c = e % p.d;
        dst[e] = src[(int64_t)index[r] * p.d + c];
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_scatter_rows(const pt_rows_params p, const __half *__restrict__ src,
                    const int32_t *__restrict__ index, __half *__restrict__ dst) {
    const int64_t n = (int64_t)p.n * p.d;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t e = pt::ops::thread_index(); e < n; e += stride) {
        const int64_t r = e / p.d, c = e % p.d;
        dst[(int64_t)index[r] * p.d + c] = src[e];
    }
}

extern "C" __global__ void __launch_bounds__(PT_CE_THREADS)
    pt_cross_entropy(const pt_ce_params p, __half *__restrict__ logits,
                     const int32_t *__restrict__ targets, float *__restrict__ loss) {
    PT_DYNAMIC_SMEM(pt_smem);
    float *scratch = reinterpret_cast<float *>(pt_smem);
    const int64_t row = blockIdx.x;
    if (row >= p.rows) return; // the whole block leaves together
    const int tid = threadIdx.x;
    const int vocab = p.vocab;
    __half *z = logits + row * vocab;
    const int target = targets[row];
    if (target < 0 || target >= vocab) {
        if (p.write_grad)
            for (int c = tid; c < vocab; c += blockDim.x) z[c] = __float2half_rn(0.0f);
        if (tid == 0) loss[row] = target < 0 ? 0.0f : NAN; // out of range: visible, never silent
        return;
    }
    // Every thread reads the target logit before any thread can overwrite it.
    const float zt = pt::ops::ld(z, target);
    float m = -INFINITY, s = 0.0f;
    for (int c = tid; c < vocab; c += blockDim.x) {
        const float v = pt::ops::ld(z, c);
        if (v == -INFINITY) continue; // exp(-inf) = 0 adds nothing (and -inf - -inf is NaN)
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    pt::ops::block_lse(m, s, scratch);
    const float lse = m + logf(s);
    if (tid == 0) loss[row] = lse - zt;
    if (p.write_grad) {
        for (int c = tid; c < vocab; c += blockDim.x) {
            const float prob = expf(pt::ops::ld(z, c) - lse);
            pt::ops::st(z, c, p.grad_scale * (c == target ? prob - 1.0f : prob));
        }
    }
}
