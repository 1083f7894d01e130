// Token embedding lookup (+ GPT-2's learned position embedding) into the fp32 residual stream
// (ABI: kernels/abi/model_ops.h, pt_embedding_params).
//
// One thread per (row, pair of features): reads two fp16 of the token row (and of the position
// row), adds in fp32, writes two fp32. Grid-stride over rows * d/2 (d even) or rows * d.
#include "model_ops.cuh"

extern "C" __global__ void __launch_bounds__(PT_EW_THREADS)
    pt_embedding_fwd(const pt_embedding_params p, const int32_t *__restrict__ tokens,
                     const int32_t *__restrict__ pos_offset, const __half *__restrict__ tok_emb,
                     const __half *__restrict__ pos_emb, float *__restrict__ x) {
    const int64_t d = p.d_model;
    const int64_t n = (int64_t)p.batch * p.seq * d;
    const int64_t stride = pt::ops::thread_count();
    for (int64_t i = pt::ops::thread_index(); i < n; i += stride) {
        const int64_t r = i / d, c = i % d;
        const int b = (int)(r / p.seq), t = (int)(r % p.seq);
        const int tok = tokens[r];
        float v;
        if (tok < 0 || tok >= p.vocab) {
            v = NAN;
        } else {
            v = pt::ops::ld(tok_emb, (int64_t)tok * d + c);
            if (p.n_positions > 0) {
                const int pos = pos_offset[b] + t;
                v = (pos < 0 || pos >= p.n_positions) ? NAN
                                                      : v + pt::ops::ld(pos_emb, (int64_t)pos * d + c);
            }
        }
        x[i] = v;
    }
}
