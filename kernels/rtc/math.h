/* NVRTC only (src/cuda/rtc.rs): the math functions are NVRTC builtins; the kernels need only
 * the two constants of <math.h> besides. nvcc never sees this file. */
#pragma once
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
