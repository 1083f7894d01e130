// Precision conversions between fp32 and fp16 buffers (ABI: kernels/abi/convert.h).
//
// - pt_f32_to_f16: round to nearest even (__float2half_rn); out-of-range values become +-inf,
//   like a C cast / torch's .half();
// - pt_f16_to_f32: exact widening;
// - pt_f16_to_f32_scaled: widening then one fp32 multiply by `scale` (unscaling loss-scaled
//   gradients).
// Grid-stride loops; 4 elements per iteration (16-byte fp32 / 8-byte fp16 accesses) when both
// pointers are aligned, then a scalar tail.
#include "common.cuh"

namespace {

// Widens 4 halves stored in one 8-byte word.
__device__ __forceinline__ float4 half4_to_float4(uint2 raw) {
    __half2 lo = *reinterpret_cast<__half2 *>(&raw.x);
    __half2 hi = *reinterpret_cast<__half2 *>(&raw.y);
    float2 a = __half22float2(lo);
    float2 b = __half22float2(hi);
    return make_float4(a.x, a.y, b.x, b.y);
}

template <bool SCALED>
__device__ __forceinline__ void f16_to_f32(const pt_convert_params p, const __half *__restrict__ x,
                                           float *__restrict__ y) {
    const int64_t start = pt::global_thread_index();
    const int64_t stride = pt::grid_thread_count();
    int64_t vec_end = 0;
    if (pt::is_aligned(x, 8) && pt::is_aligned(y, 16)) {
        const int64_t n4 = p.n / 4;
        const uint2 *x4 = reinterpret_cast<const uint2 *>(x);
        float4 *y4 = reinterpret_cast<float4 *>(y);
        for (int64_t i = start; i < n4; i += stride) {
            float4 v = half4_to_float4(x4[i]);
            if (SCALED) {
                v.x *= p.scale;
                v.y *= p.scale;
                v.z *= p.scale;
                v.w *= p.scale;
            }
            y4[i] = v;
        }
        vec_end = n4 * 4;
    }
    for (int64_t i = vec_end + start; i < p.n; i += stride) {
        float v = __half2float(x[i]);
        y[i] = SCALED ? v * p.scale : v;
    }
}

}  // namespace

extern "C" __global__ void pt_f32_to_f16(const pt_convert_params p, const float *__restrict__ x,
                                         __half *__restrict__ y) {
    const int64_t start = pt::global_thread_index();
    const int64_t stride = pt::grid_thread_count();
    int64_t vec_end = 0;
    if (pt::is_aligned(x, 16) && pt::is_aligned(y, 8)) {
        const int64_t n4 = p.n / 4;
        const float4 *x4 = reinterpret_cast<const float4 *>(x);
        uint2 *y4 = reinterpret_cast<uint2 *>(y);
        for (int64_t i = start; i < n4; i += stride) {
            const float4 v = x4[i];
            __half2 lo = __floats2half2_rn(v.x, v.y);
            __half2 hi = __floats2half2_rn(v.z, v.w);
            uint2 raw;
            raw.x = *reinterpret_cast<unsigned int *>(&lo);
            raw.y = *reinterpret_cast<unsigned int *>(&hi);
            y4[i] = raw;
        }
        vec_end = n4 * 4;
    }
    for (int64_t i = vec_end + start; i < p.n; i += stride) {
        y[i] = __float2half_rn(x[i]);
    }
}

extern "C" __global__ void pt_f16_to_f32(const pt_convert_params p, const __half *__restrict__ x,
                                         float *__restrict__ y) {
    f16_to_f32<false>(p, x, y);
}

extern "C" __global__ void pt_f16_to_f32_scaled(const pt_convert_params p,
                                                const __half *__restrict__ x,
                                                float *__restrict__ y) {
    f16_to_f32<true>(p, x, y);
}
