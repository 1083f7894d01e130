// The host emulation's translation unit: compiles the real kernel sources for the CPU (through
// the shim) and exports extern "C" launchers taking the same ABI struct as the GPU launch.
// Built by build/emulation.rs with -DPT_HOST_EMULATION.
#include "cuda_host_shim.h"

#include "../prefix_attention.cu"

#include <cstdio>
#include <exception>

namespace {

unsigned cdiv(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

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

using h16 = const __half *;
#define PT_H(x) reinterpret_cast<const __half *>(x)
#define PT_HM(x) reinterpret_cast<__half *>(x)

// Forward: O and LSE. Returns 0, or 1 for an unsupported head dim, 2 on an emulation error.
// Buffers as in abi/attention.h (fp16 passed as uint16_t bit patterns).
extern "C" int pt_emu_attn_fwd(const pt_attn_params *params, const uint16_t *q, const uint16_t *k,
                               const uint16_t *v, const uint16_t *prefix_k, const uint16_t *prefix_v,
                               const int32_t *prefix_index, const int32_t *valid_len, uint16_t *o,
                               float *lse) {
    const pt_attn_params p = *params;
    if (p.head_dim != 64 && p.head_dim != 128) return 1;
    return guarded([&] {
        const pt_emu::Dim3 grid{cdiv(p.seq, PT_ATTN_FWD_BLOCK_M), static_cast<unsigned>(p.batch * p.q_heads), 1};
        auto run = [&](auto kernel, size_t smem) {
            pt_emu::launch(grid, PT_ATTN_THREADS, smem, [&] {
                kernel(p, PT_H(q), PT_H(k), PT_H(v), PT_H(prefix_k), PT_H(prefix_v), prefix_index,
                       valid_len, PT_HM(o), lse);
            });
        };
        if (p.head_dim == 64)
            run(prefix_attn_fwd_d64, PT_ATTN_FWD_SMEM_D64);
        else
            run(prefix_attn_fwd_d128, PT_ATTN_FWD_SMEM_D128);
    });
}

// Backward: every kernel of the backward in order (see prefix_attention.cu). `dq_accum` is only
// used in atomic mode; `dpk_partial`/`dpv_partial` are [B, Hkv, P, D] fp32 scratch.
extern "C" int pt_emu_attn_bwd(const pt_attn_params *params, const uint16_t *q, const uint16_t *k,
                               const uint16_t *v, const uint16_t *prefix_k, const uint16_t *prefix_v,
                               const int32_t *prefix_index, const int32_t *valid_len,
                               const uint16_t *o, const float *lse, const uint16_t *d_o,
                               float *delta, float *dq_accum, float *dpk_partial,
                               float *dpv_partial, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                               uint16_t *d_prefix_k, uint16_t *d_prefix_v) {
    const pt_attn_params p = *params;
    if (p.head_dim != 64 && p.head_dim != 128) return 1;
    return guarded([&] {
        const unsigned bh = static_cast<unsigned>(p.batch * p.q_heads);
        const unsigned bk = static_cast<unsigned>(p.batch * p.kv_heads);
        pt_emu::launch({cdiv(p.seq, PT_ATTN_PRE_ROWS), bh, 1}, PT_ATTN_THREADS, 0, [&] {
            prefix_attn_bwd_preprocess(p, valid_len, PT_H(o), PT_H(d_o), delta, dq_accum);
        });
        const pt_emu::Dim3 kv_grid{cdiv(p.prefix, PT_ATTN_BWD_BLOCK_N) + cdiv(p.seq, PT_ATTN_BWD_BLOCK_N), bk, 1};
        auto dkdv = [&](auto kernel, size_t smem) {
            pt_emu::launch(kv_grid, PT_ATTN_THREADS, smem, [&] {
                kernel(p, PT_H(q), PT_H(k), PT_H(v), PT_H(prefix_k), PT_H(prefix_v), prefix_index,
                       valid_len, lse, PT_H(d_o), delta, dq_accum, dpk_partial, dpv_partial, PT_HM(dk),
                       PT_HM(dv));
            });
        };
        if (p.head_dim == 64)
            dkdv(prefix_attn_bwd_dkdv_d64, PT_ATTN_DKDV_SMEM_D64);
        else
            dkdv(prefix_attn_bwd_dkdv_d128, PT_ATTN_DKDV_SMEM_D128);
        if (p.deterministic) {
            const pt_emu::Dim3 grid{cdiv(p.seq, PT_ATTN_FWD_BLOCK_M), bh, 1};
            auto dqk = [&](auto kernel, size_t smem) {
                pt_emu::launch(grid, PT_ATTN_THREADS, smem, [&] {
                    kernel(p, PT_H(q), PT_H(k), PT_H(v), PT_H(prefix_k), PT_H(prefix_v), prefix_index,
                           valid_len, lse, PT_H(d_o), delta, PT_HM(dq));
                });
            };
            if (p.head_dim == 64)
                dqk(prefix_attn_bwd_dq_d64, PT_ATTN_DQ_SMEM_D64);
            else
                dqk(prefix_attn_bwd_dq_d128, PT_ATTN_DQ_SMEM_D128);
        } else {
            const long long n = static_cast<long long>(bh) * p.seq * p.head_dim;
            pt_emu::launch({cdiv(n, PT_ATTN_THREADS * 4), 1, 1}, PT_ATTN_THREADS, 0,
                           [&] { prefix_attn_bwd_dq_convert(p, dq_accum, PT_HM(dq)); });
        }
        if (p.prefix > 0 && p.n_prefixes > 0) {
            const long long n = static_cast<long long>(p.n_prefixes) * p.kv_heads * p.prefix * p.head_dim;
            pt_emu::launch({cdiv(n, PT_ATTN_THREADS), 1, 1}, PT_ATTN_THREADS, 0, [&] {
                prefix_attn_bwd_prefix_reduce(p, prefix_index, dpk_partial, dpv_partial,
                                              PT_HM(d_prefix_k), PT_HM(d_prefix_v));
            });
        }
    });
}

// ldmatrix operations so far (all launches) whose 8 row addresses hit a shared-memory bank twice.
extern "C" unsigned long long pt_emu_ldmatrix_bank_conflicts() {
    return pt_emu::ldmatrix_bank_conflicts.load();
}
