// The prefix reparameterization MLP in fp32 (src/prefix/reparam.rs, src/cuda/reparam.rs): a small
// row-major matmul with optional transposes and an epilogue, and column sums (the bias gradients).
// Sizes are small (P <= 256, widths <= a few thousand), so one thread per output element, the
// inner product summed in order in fp32, grid-stride over m * n.
#include "model_ops.cuh"

// Epilogues of pt_reparam_gemm.
#define PT_REPARAM_PLAIN 0    // c = acc
#define PT_REPARAM_BIAS 1     // c = acc + bias[j]
#define PT_REPARAM_TANH 2     // c = tanh(acc + bias[j])
#define PT_REPARAM_TANH_BWD 3 // c = acc * (1 - h[i, j]^2)

// c[m, n] = op(a) * op(b): op(a)[i, l] = ta ? a[l * m + i] : a[i * k + l],
// op(b)[l, j] = tb ? b[j * k + l] : b[l * n + j]. bias (length n) and h ([m, n]) are read only
// by the epilogues that use them (any valid pointer otherwise).
extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_reparam_gemm(const int m, const int n, const int k, const int ta, const int tb,
                    const int epilogue, const float *__restrict__ a, const float *__restrict__ b,
                    const float *__restrict__ bias, const float *__restrict__ h,
                    float *__restrict__ c) {
    const int64_t total = (int64_t)m * n;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t idx = pt::ops::thread_index(); idx < total; idx += stride) {
        const int64_t i = idx / n, j = idx % n;
        const int64_t sa = ta ? m : 1, sb = tb ? 1 : n;
        const float *pa = ta ? a + i : a + i * k;
        const float *pb = tb ? b + j * k : b + j;
        float acc = 0.0f;
        for (int l = 0; l < k; ++l) acc += pa[l * sa] * pb[l * sb];
        if (epilogue == PT_REPARAM_TANH_BWD) {
            const float hv = h[idx];
            acc *= 1.0f - hv * hv;
        } else if (epilogue != PT_REPARAM_PLAIN) {
            acc += bias[j];
            if (epilogue == PT_REPARAM_TANH) acc = tanhf(acc);
        }
        c[idx] = acc;
    }
}

// out[j] = sum over rows of x[r, j], rows in order.
extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_reparam_col_sum(const int rows, const int cols, const float *__restrict__ x,
                       float *__restrict__ out) {
    const int64_t stride = pt::ops::thread_count();
    for (int64_t j = pt::ops::thread_index(); j < cols; j += stride) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += x[(int64_t)r * cols + j];
        out[j] = s;
    }
}
