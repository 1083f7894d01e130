/* ABI of kernels/convert.cu: precision conversions between fp32 and fp16 buffers. */
#ifndef PT_ABI_CONVERT_H
#define PT_ABI_CONVERT_H

#include <stdint.h>

/* Parameters of the conversion kernels (pt_f32_to_f16, pt_f16_to_f32, pt_f16_to_f32_scaled). */
typedef struct pt_convert_params {
    /* number of elements of input and output */
    int64_t n;
    /* multiplier applied after widening (pt_f16_to_f32_scaled only; e.g. 1/loss_scale) */
    float scale;
} pt_convert_params;

#endif /* PT_ABI_CONVERT_H */
