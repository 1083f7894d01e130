// Host emulation of the KV-cache decode attention (kernels/decode_attention.cu): the real source
// compiled for the CPU through the shim, with an extern "C" launcher taking the same ABI struct as
// the GPU launch (fp16 as uint16_t bit patterns). A translation unit of the emulation library,
// built by build/emulation.rs with -DPT_HOST_EMULATION. Returns 0, or 2 when the emulation failed.
#include "cuda_host_shim.h"

#include "../decode_attention.cu"

#include <cstdio>
#include <exception>

extern "C" int pt_emu_decode_attention(const pt_decode_params *params, const uint16_t *q,
                                       const uint16_t *k_new, const uint16_t *v_new,
                                       const uint16_t *cache_k, const uint16_t *cache_v,
                                       const int32_t *past, const int32_t *n_new, uint16_t *o) {
    const pt_decode_params p = *params;
    if (p.batch <= 0 || p.n_new <= 0 || p.q_heads <= 0) return 0;
    try {
        pt_emu::launch({static_cast<unsigned>(p.n_new), static_cast<unsigned>(p.q_heads),
                        static_cast<unsigned>(p.batch)},
                       PT_DECODE_THREADS, 0, [&] {
                           pt_decode_attention(p, reinterpret_cast<const __half *>(q),
                                               reinterpret_cast<const __half *>(k_new),
                                               reinterpret_cast<const __half *>(v_new),
                                               reinterpret_cast<const __half *>(cache_k),
                                               reinterpret_cast<const __half *>(cache_v), past,
                                               n_new, reinterpret_cast<__half *>(o));
                       });
        return 0;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "prefix-tune host emulation: %s\n", e.what());
        return 2;
    }
}
