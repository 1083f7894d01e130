// MLP activations, forward and backward, element-wise in fp32 on fp16 tensors
// (ABI: kernels/abi/model_ops.h, pt_act_params):
// - GELU, tanh approximation (GPT-2's gelu_new), with the c_fc bias folded into the forward
//   (cuBLAS writes x W^T without bias; the biased pre-activation is written back for the
//   backward);
// - SwiGLU on the fused [gate | up] projection (one GEMM for both), backward into the fused
//   [d_gate | d_up] layout so that the input gradient is one GEMM again.
// Grid-stride loops over rows * width.
#include "model_ops.cuh"

namespace {

constexpr float kGeluC = 0.7978845608028654f; // sqrt(2/pi)
constexpr float kGeluA = 0.044715f;

__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(kGeluC * (x + kGeluA * x * x * x)));
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float t = tanhf(kGeluC * (x + kGeluA * x * x * x));
    const float dt = (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * dt;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

} // namespace

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_gelu_fwd(const pt_act_params p, __half *__restrict__ a, const __half *__restrict__ bias,
                __half *__restrict__ out) {
    const int64_t n = p.rows * p.width;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t i = pt::ops::thread_index(); i < n; i += stride) {
        float x = pt::ops::ld(a, i);
        if (bias != nullptr) {
            x += pt::ops::ld(bias, i % p.width);
            pt::ops::st(a, i, x);
            x = pt::ops::ld(a, i); // the backward sees the stored (rounded) pre-activation
        }
        pt::ops::st(out, i, gelu(x));
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_gelu_bwd(const pt_act_params p, const __half *__restrict__ dy,
                const __half *__restrict__ a, __half *__restrict__ da) {
    const int64_t n = p.rows * p.width;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t i = pt::ops::thread_index(); i < n; i += stride) {
        pt::ops::st(da, i, pt::ops::ld(dy, i) * gelu_grad(pt::ops::ld(a, i)));
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_swiglu_fwd(const pt_act_params p, const __half *__restrict__ gu,
                  __half *__restrict__ out) {
    const int64_t w = p.width;
    const int64_t n = p.rows * w;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t i = pt::ops::thread_index(); i < n; i += stride) {
        const int64_t r = i / w, c = i % w;
        const float g = pt::ops::ld(gu, r * 2 * w + c);
        const float u = pt::ops::ld(gu, r * 2 * w + w + c);
        pt::ops::st(out, i, g * sigmoid(g) * u);
    }
}

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_swiglu_bwd(const pt_act_params p, const __half *__restrict__ dy,
                  const __half *__restrict__ gu, __half *__restrict__ dgu) {
    const int64_t w = p.width;
    const int64_t n = p.rows * w;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t i = pt::ops::thread_index(); i < n; i += stride) {
        const int64_t r = i / w, c = i % w;
        const float g = pt::ops::ld(gu, r * 2 * w + c);
        const float u = pt::ops::ld(gu, r * 2 * w + w + c);
        const float d = pt::ops::ld(dy, i);
        const float s = sigmoid(g);
        pt::ops::st(dgu, r * 2 * w + c, d * u * s * (1.0f + g * (1.0f - s)));
        pt::ops::st(dgu, r * 2 * w + w + c, d * g * s);
    }
}
