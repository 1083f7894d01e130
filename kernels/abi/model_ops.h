/* Launch parameters of the frozen model's layer kernels (everything but attention):
 *   kernels/embedding.cu       token (+ learned position) embedding into the fp32 residual stream
 *   kernels/norm.cu            residual add + LayerNorm/RMSNorm forward; backward to the input,
 *                              accumulated into the fp32 residual gradient
 *   kernels/activation.cu      GELU-tanh and SwiGLU, forward and backward
 *   kernels/rope.cu            row-major <-> [B, H, T, D] layouts with bias and RoPE (HF
 *                              rotate-half), forward and backward
 *   kernels/cross_entropy.cu   chunked LM-head helpers: gather/scatter of rows, cross-entropy
 *                              loss per row and the logits' gradient in place
 *
 * Conventions shared by every kernel of this header:
 *   - activations are fp16 (uint16_t bit patterns on the Rust side), row-major [rows, width], one
 *     row per token, rows = B*T; the residual stream and its gradient are fp32;
 *   - every computation is done in fp32 and rounded once to fp16 on store;
 *   - token positions come from a per-sequence offset: row (b, t) sits at position
 *     pos_offset[b] + t (pos_offset is [B] int32);
 *   - optional buffers are passed as null pointers;
 *   - element-wise kernels are grid-stride loops: any grid of PT_EW_THREADS-thread blocks works.
 * Plain C for bindgen: fixed-width types, no pointers, no enums.
 */
#ifndef PT_ABI_MODEL_OPS_H
#define PT_ABI_MODEL_OPS_H

#include <stdint.h>

/* Threads per block of the grid-stride (element-wise) kernels. */
#define PT_EW_THREADS 256
/* Norm kernels: one warp per row, PT_NORM_ROWS_PER_BLOCK rows per block of
 * 32 * PT_NORM_ROWS_PER_BLOCK threads; grid (ceil(rows / PT_NORM_ROWS_PER_BLOCK), 1). */
#define PT_NORM_ROWS_PER_BLOCK 4
#define PT_NORM_THREADS 128
/* Cross-entropy: one block of PT_CE_THREADS threads per row, grid (rows, 1), with
 * PT_CE_SMEM bytes of dynamic shared memory (the block reductions' scratch). */
#define PT_CE_THREADS 256
#define PT_CE_SMEM 256

/* Normalisation kinds. */
#define PT_NORM_LAYER 0
#define PT_NORM_RMS 1

/* pt_embedding_fwd(p, tokens [B*T] int32, pos_offset [B] int32, tok_emb [vocab, d] f16,
 *                  pos_emb [n_positions, d] f16 or null, x [B*T, d] f32 out)
 *   x[b*T + t] = tok_emb[tokens[b*T + t]] + pos_emb[pos_offset[b] + t]   (pos_emb when given)
 * A token or position outside its table writes NaN to the row (the host checks them first). */
typedef struct pt_embedding_params {
    int32_t batch;
    int32_t seq;
    int32_t d_model;
    int32_t vocab;
    /* rows of pos_emb; 0 when there is no position table (Llama) */
    int32_t n_positions;
} pt_embedding_params;

/* pt_add_norm_fwd(p, x [rows, d] f32 in/out, y [rows, d] f16 or null, y_bias [d] f16 or null,
 *                 w [d] f16, b [d] f16 or null, x_save [rows, d] f16 or null,
 *                 h [rows, d] f16 out, mean [rows] f32 or null, rstd [rows] f32 out)
 *   if y:        x += y (+ y_bias)                  (the residual add of the previous branch)
 *   if x_save:   x_save = fp16(x)                   (what the backward reads)
 *   LayerNorm:   h = (x - mean) * rstd * w + b,  rstd = 1/sqrt(var(x) + eps)
 *   RMSNorm:     h = x * rstd * w,               rstd = 1/sqrt(mean(x^2) + eps)
 *
 * pt_norm_bwd(p, dy [rows, d] f16, x [rows, d] f16, w [d] f16, mean [rows] f32 (LayerNorm),
 *             rstd [rows] f32, dx [rows, d] f32 in/out, dx16 [rows, d] f16 out or null)
 *   g = dy * w, xhat = (x - mean) * rstd (RMSNorm: x * rstd)
 *   LayerNorm:   dn = rstd * (g - mean(g) - xhat * mean(g * xhat))
 *   RMSNorm:     dn = rstd * (g - xhat * mean(g * xhat))
 *   dx = (accumulate ? dx : 0) + dn;  dx16 = fp16(dx)  (the residual gradient and its fp16 copy)
 * One warp per row: launch grid (ceil(rows / PT_NORM_ROWS_PER_BLOCK), 1), PT_NORM_THREADS. */
typedef struct pt_norm_params {
    int32_t rows;
    int32_t d;
    float eps;
    /* PT_NORM_LAYER or PT_NORM_RMS */
    int32_t kind;
    /* pt_norm_bwd: 1 adds to dx, 0 overwrites it */
    int32_t accumulate;
} pt_norm_params;

/* Activations, element-wise over [rows, width]:
 * pt_gelu_fwd(p, a [rows, width] f16 in/out, bias [width] f16 or null, out [rows, width] f16)
 *   a += bias (written back: the backward's input), out = gelu_tanh(a)
 * pt_gelu_bwd(p, dy [rows, width], a [rows, width], da [rows, width])
 *   da = dy * gelu_tanh'(a)
 * pt_swiglu_fwd(p, gu [rows, 2*width] (gate | up per row), out [rows, width])
 *   out = silu(gate) * up
 * pt_swiglu_bwd(p, dy [rows, width], gu [rows, 2*width], dgu [rows, 2*width] out)
 *   d_gate = dy * up * s * (1 + gate * (1 - s)), d_up = dy * silu(gate), s = sigmoid(gate) */
typedef struct pt_act_params {
    int64_t rows;
    int32_t width;
} pt_act_params;

/* Layout changes between token rows and heads, with bias and RoPE (HF rotate-half):
 * pt_rows_to_heads(p, src [rows, row_stride] f16, bias [heads*D] f16 or null,
 *                  pos_offset [B] int32, cos [n_positions, D/2] f32, sin [n_positions, D/2] f32,
 *                  dst [B, heads, T, D] f16)
 *   v = src[b*T + t, col_offset + h*D + i] (+ bias[h*D + i]); with rope, for i < D/2 and
 *   angle a = pos * theta^(-2i/D) tabulated at pos = pos_offset[b] + t:
 *     dst[i] = v[i] cos a - v[i + D/2] sin a,   dst[i + D/2] = v[i + D/2] cos a + v[i] sin a
 * pt_heads_to_rows(p, src [B, heads, T, D] f16, pos_offset, cos, sin,
 *                  dst [rows, row_stride] f16 (columns col_offset .. col_offset + heads*D))
 *   the transpose back; with rope, the inverse rotation (the backward of RoPE).
 * cos/sin and pos_offset may be null when rope == 0. Grid-stride over B*T*heads*D/2. */
typedef struct pt_heads_params {
    int32_t batch;
    int32_t seq;
    int32_t heads;
    int32_t head_dim;
    /* elements between two token rows of the row-major side */
    int32_t row_stride;
    /* first column of this tensor within a row of the row-major side */
    int32_t col_offset;
    /* 1: apply RoPE (pt_rows_to_heads) / its inverse (pt_heads_to_rows) */
    int32_t rope;
    /* rows of the cos/sin tables (positions outside give NaN) */
    int32_t n_positions;
} pt_heads_params;

/* Rows of a matrix selected by an index list (the LM head runs on target rows only):
 * pt_gather_rows(p, src [*, d] f16, index [n] int32, dst [n, d] f16):   dst[i] = src[index[i]]
 * pt_scatter_rows(p, src [n, d] f16, index [n] int32, dst [*, d] f16):  dst[index[i]] = src[i]
 * (the indices are distinct; rows of dst not named are left as they are). Grid-stride. */
typedef struct pt_rows_params {
    int32_t n;
    int32_t d;
} pt_rows_params;

/* pt_cross_entropy(p, logits [rows, vocab] f16 in/out, targets [rows] int32, loss [rows] f32)
 *   per row with a target (targets[r] >= 0): loss = logsumexp(z) - z[target], in fp32 from the
 *   fp16 logits; with write_grad the row is overwritten by grad_scale * (softmax(z) - onehot).
 *   Rows with targets[r] < 0: loss 0 and (with write_grad) a zero gradient row.
 * Launch grid (rows, 1), PT_CE_THREADS threads, PT_CE_SMEM bytes of dynamic shared memory. */
typedef struct pt_ce_params {
    int32_t rows;
    int32_t vocab;
    /* the upstream gradient of each row's loss, e.g. loss_scale / n_targets */
    float grad_scale;
    int32_t write_grad;
} pt_ce_params;

#endif /* PT_ABI_MODEL_OPS_H */
