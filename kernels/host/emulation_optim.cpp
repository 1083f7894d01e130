// Host emulation of the optimizer kernels (kernels/optim.cu: AdamW, SGD with and without
// momentum, the two-stage sum of squares): compiles the real .cu source for the CPU through the
// shim, like emulation_model_ops.cpp, and exports extern "C" launchers taking the same ABI
// structs as the GPU launches (fp16 as uint16_t bit patterns). A translation unit of the
// emulation library built by build/emulation.rs with -DPT_HOST_EMULATION.
//
// Grid-stride kernels run with a small grid (at most PT_EMU_OPT_MAX_BLOCKS blocks) so the stride
// loops are exercised; the reduction uses the same grid rule as src/cuda/ops.rs::sum_squares.
// Every launcher returns 0, or 2 when the emulation failed.
#include "cuda_host_shim.h"
#include "warp_ops_emu.h"

// optim.cu's block reduction (pt::block_sum in common.cuh) uses the raw CUDA intrinsics: map
// them onto the shim's block barrier and warp exchange, and make its static shared array one
// buffer per launch (the block's threads run concurrently, blocks one after another).
#undef __shared__
#define __shared__ static
#define __syncthreads() pt::sync_block()
#define __shfl_xor_sync(mask, v, offset) pt::shfl_xor((v), (offset))

#include "../optim.cu"

#undef __syncthreads
#undef __shfl_xor_sync

#include <cstdio>
#include <exception>
#include <vector>

namespace {

constexpr long long PT_EMU_OPT_MAX_BLOCKS = 3;
constexpr unsigned PT_EMU_OPT_THREADS = 256;

pt_emu::Dim3 opt_grid(long long n) {
    long long blocks = (n + PT_EMU_OPT_THREADS - 1) / PT_EMU_OPT_THREADS;
    if (blocks > PT_EMU_OPT_MAX_BLOCKS) blocks = PT_EMU_OPT_MAX_BLOCKS;
    if (blocks < 1) blocks = 1;
    return {static_cast<unsigned>(blocks), 1, 1};
}

template <class F> int opt_guarded(F &&f) {
    try {
        f();
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "prefix-tune host emulation: %s\n", e.what());
        return 2;
    }
}

} // namespace

#define PT_OPT_HM(x) reinterpret_cast<__half *>(x)

extern "C" int pt_emu_adamw_step(const pt_adamw_params *params, float *param, const float *grad,
                                 float *m, float *v, uint16_t *param_f16) {
    const pt_adamw_params p = *params;
    return opt_guarded([&] {
        pt_emu::launch(opt_grid(p.n), PT_EMU_OPT_THREADS, 0, [&] {
            if (param_f16)
                pt_adamw_step_f16(p, param, grad, m, v, PT_OPT_HM(param_f16));
            else
                pt_adamw_step(p, param, grad, m, v);
        });
    });
}

extern "C" int pt_emu_sgd_step(const pt_sgd_params *params, float *param, const float *grad,
                               float *momentum_buf, uint16_t *param_f16) {
    const pt_sgd_params p = *params;
    return opt_guarded([&] {
        pt_emu::launch(opt_grid(p.n), PT_EMU_OPT_THREADS, 0, [&] {
            if (momentum_buf && param_f16)
                pt_sgd_momentum_step_f16(p, param, grad, momentum_buf, PT_OPT_HM(param_f16));
            else if (momentum_buf)
                pt_sgd_momentum_step(p, param, grad, momentum_buf);
            else if (param_f16)
                pt_sgd_step_f16(p, param, grad, PT_OPT_HM(param_f16));
            else
                pt_sgd_step(p, param, grad);
        });
    });
}

// out[0] = sum of x^2 (or += with accumulate), both stages, with the GPU wrapper's grid.
extern "C" int pt_emu_sum_squares(long long n, const float *x, float *out, int accumulate) {
    return opt_guarded([&] {
        long long blocks = (n + PT_REDUCE_THREADS - 1) / PT_REDUCE_THREADS;
        if (blocks > PT_REDUCE_MAX_BLOCKS) blocks = PT_REDUCE_MAX_BLOCKS;
        if (blocks < 1) blocks = 1;
        std::vector<float> partials(static_cast<size_t>(blocks));
        const pt_reduce_params p1{n, 0};
        const pt_reduce_params p2{blocks, accumulate};
        pt_emu::launch({static_cast<unsigned>(blocks), 1, 1}, PT_REDUCE_THREADS, 0,
                       [&] { pt_sum_squares_partial(p1, x, partials.data()); });
        pt_emu::launch({1, 1, 1}, PT_REDUCE_THREADS, 0,
                       [&] { pt_sum_squares_finish(p2, partials.data(), out); });
    });
}
