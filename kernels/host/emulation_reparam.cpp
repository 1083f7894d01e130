// Host emulation of the reparameterization kernels (kernels/reparam.cu: the fp32 matmul with
// epilogue and the column sums): compiles the real .cu source for the CPU through the shim, like
// emulation_model_ops.cpp, and exports extern "C" launchers with the GPU launches' arguments. A
// translation unit of the emulation library built by build/emulation.rs with -DPT_HOST_EMULATION.
//
// Grid-stride kernels run with a small grid (at most 3 blocks) so the stride loops are exercised.
// Every launcher returns 0, or 2 when the emulation failed.
#include "cuda_host_shim.h"

#include <cmath>

#include "../reparam.cu"

#include <cstdio>
#include <exception>

namespace {

pt_emu::Dim3 reparam_grid(long long work) {
    long long blocks = (work + PT_EW_THREADS - 1) / PT_EW_THREADS;
    if (blocks > 3) blocks = 3;
    if (blocks < 1) blocks = 1;
    return {static_cast<unsigned>(blocks), 1, 1};
}

template <class F> int reparam_guarded(F &&f) {
    try {
        f();
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "prefix-tune host emulation: %s\n", e.what());
        return 2;
    }
}

} // namespace

extern "C" int pt_emu_reparam_gemm(int m, int n, int k, int ta, int tb, int epilogue,
                                   const float *a, const float *b, const float *bias,
                                   const float *h, float *c) {
    return reparam_guarded([&] {
        pt_emu::launch(reparam_grid(static_cast<long long>(m) * n), PT_EW_THREADS, 0,
                       [&] { pt_reparam_gemm(m, n, k, ta, tb, epilogue, a, b, bias, h, c); });
    });
}

extern "C" int pt_emu_reparam_col_sum(int rows, int cols, const float *x, float *out) {
    return reparam_guarded([&] {
        pt_emu::launch(reparam_grid(cols), PT_EW_THREADS, 0,
                       [&] { pt_reparam_col_sum(rows, cols, x, out); });
    });
}
