// Host emulation of the model-layer kernels (embedding, norm, activation, rope, cross_entropy):
// compiles the real .cu sources for the CPU through the shim, like emulation.cpp does for the
// attention kernels, and exports extern "C" launchers taking the same ABI structs as the GPU
// launches (fp16 as uint16_t bit patterns). A second translation unit of the same library, built
// by build/emulation.rs with -DPT_HOST_EMULATION.
//
// Grid-stride kernels run with a small grid (at most PT_EMU_MAX_BLOCKS blocks), so the stride
// loops are exercised. Every launcher returns 0, or 2 when the emulation failed.
#include "cuda_host_shim.h"

#include "../activation.cu"
#include "../cross_entropy.cu"
#include "../embedding.cu"
#include "../norm.cu"
#include "../rope.cu"

#include <cstdio>
#include <exception>

namespace {

constexpr long long PT_EMU_MAX_BLOCKS = 3;

unsigned cdiv(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

pt_emu::Dim3 stride_grid(long long work) {
    long long blocks = (work + PT_EW_THREADS - 1) / PT_EW_THREADS;
    if (blocks > PT_EMU_MAX_BLOCKS) blocks = PT_EMU_MAX_BLOCKS;
    if (blocks < 1) blocks = 1;
    return {static_cast<unsigned>(blocks), 1, 1};
}

template <class F> int guarded(F &&f) {
    try {
        f();
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "prefix-tune host emulation: %s\n", e.what());
        return 2;
    }
}

} // namespace

#define PT_H(x) reinterpret_cast<const __half *>(x)
#define PT_HM(x) reinterpret_cast<__half *>(x)

extern "C" int pt_emu_embedding_fwd(const pt_embedding_params *params, const int32_t *tokens,
                                    const int32_t *pos_offset, const uint16_t *tok_emb,
                                    const uint16_t *pos_emb, float *x) {
    const pt_embedding_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid((long long)p.batch * p.seq * p.d_model), PT_EW_THREADS, 0, [&] {
            pt_embedding_fwd(p, tokens, pos_offset, PT_H(tok_emb), PT_H(pos_emb), x);
        });
    });
}

extern "C" int pt_emu_add_norm_fwd(const pt_norm_params *params, float *x, const uint16_t *y,
                                   const uint16_t *y_bias, const uint16_t *w, const uint16_t *b,
                                   uint16_t *x_save, uint16_t *h, float *mean, float *rstd) {
    const pt_norm_params p = *params;
    return guarded([&] {
        pt_emu::launch({cdiv(p.rows, PT_NORM_ROWS_PER_BLOCK), 1, 1}, PT_NORM_THREADS, 0, [&] {
            pt_add_norm_fwd(p, x, PT_H(y), PT_H(y_bias), PT_H(w), PT_H(b), PT_HM(x_save), PT_HM(h),
                            mean, rstd);
        });
    });
}

extern "C" int pt_emu_norm_bwd(const pt_norm_params *params, const uint16_t *dy, const uint16_t *x,
                               const uint16_t *w, const float *mean, const float *rstd, float *dx,
                               uint16_t *dx16) {
    const pt_norm_params p = *params;
    return guarded([&] {
        pt_emu::launch({cdiv(p.rows, PT_NORM_ROWS_PER_BLOCK), 1, 1}, PT_NORM_THREADS, 0, [&] {
            pt_norm_bwd(p, PT_H(dy), PT_H(x), PT_H(w), mean, rstd, dx, PT_HM(dx16));
        });
    });
}

extern "C" int pt_emu_gelu_fwd(const pt_act_params *params, uint16_t *a, const uint16_t *bias,
                               uint16_t *out) {
    const pt_act_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid(p.rows * p.width), PT_EW_THREADS, 0,
                       [&] { pt_gelu_fwd(p, PT_HM(a), PT_H(bias), PT_HM(out)); });
    });
}

extern "C" int pt_emu_gelu_bwd(const pt_act_params *params, const uint16_t *dy, const uint16_t *a,
                               uint16_t *da) {
    const pt_act_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid(p.rows * p.width), PT_EW_THREADS, 0,
                       [&] { pt_gelu_bwd(p, PT_H(dy), PT_H(a), PT_HM(da)); });
    });
}

extern "C" int pt_emu_swiglu_fwd(const pt_act_params *params, const uint16_t *gu, uint16_t *out) {
    const pt_act_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid(p.rows * p.width), PT_EW_THREADS, 0,
                       [&] { pt_swiglu_fwd(p, PT_H(gu), PT_HM(out)); });
    });
}

extern "C" int pt_emu_swiglu_bwd(const pt_act_params *params, const uint16_t *dy,
                                 const uint16_t *gu, uint16_t *dgu) {
    const pt_act_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid(p.rows * p.width), PT_EW_THREADS, 0,
                       [&] { pt_swiglu_bwd(p, PT_H(dy), PT_H(gu), PT_HM(dgu)); });
    });
}

extern "C" int pt_emu_rows_to_heads(const pt_heads_params *params, const uint16_t *src,
                                    const uint16_t *bias, const int32_t *pos_offset,
                                    const float *cos_t, const float *sin_t, uint16_t *dst) {
    const pt_heads_params p = *params;
    return guarded([&] {
        const long long n = (long long)p.batch * p.seq * p.heads * (p.head_dim / 2);
        pt_emu::launch(stride_grid(n), PT_EW_THREADS, 0, [&] {
            pt_rows_to_heads(p, PT_H(src), PT_H(bias), pos_offset, cos_t, sin_t, PT_HM(dst));
        });
    });
}

extern "C" int pt_emu_heads_to_rows(const pt_heads_params *params, const uint16_t *src,
                                    const int32_t *pos_offset, const float *cos_t,
                                    const float *sin_t, uint16_t *dst) {
    const pt_heads_params p = *params;
    return guarded([&] {
        const long long n = (long long)p.batch * p.seq * p.heads * (p.head_dim / 2);
        pt_emu::launch(stride_grid(n), PT_EW_THREADS, 0, [&] {
            pt_heads_to_rows(p, PT_H(src), pos_offset, cos_t, sin_t, PT_HM(dst));
        });
    });
}

extern "C" int pt_emu_gather_rows(const pt_rows_params *params, const uint16_t *src,
                                  const int32_t *index, uint16_t *dst) {
    const pt_rows_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid((long long)p.n * p.d), PT_EW_THREADS, 0,
                       [&] { pt_gather_rows(p, PT_H(src), index, PT_HM(dst)); });
    });
}

extern "C" int pt_emu_scatter_rows(const pt_rows_params *params, const uint16_t *src,
                                   const int32_t *index, uint16_t *dst) {
    const pt_rows_params p = *params;
    return guarded([&] {
        pt_emu::launch(stride_grid((long long)p.n * p.d), PT_EW_THREADS, 0,
                       [&] { pt_scatter_rows(p, PT_H(src), index, PT_HM(dst)); });
    });
}

extern "C" int pt_emu_cross_entropy(const pt_ce_params *params, uint16_t *logits,
                                    const int32_t *targets, float *loss) {
    const pt_ce_params p = *params;
    if (p.rows <= 0) return 0;
    return guarded([&] {
        pt_emu::launch({static_cast<unsigned>(p.rows), 1, 1}, PT_CE_THREADS, PT_CE_SMEM,
                       [&] { pt_cross_entropy(p, PT_HM(logits), targets, loss); });
    });
}
