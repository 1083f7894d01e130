/* NVRTC only (src/cuda/rtc.rs): NVRTC has no C library headers, so run-time compilation gets
 * this stand-in for <stdint.h> with the fixed-width types the kernels and kernels/abi use
 * (LP64, as on every Linux CUDA target). nvcc never sees it: it is not on nvcc's include path. */
#pragma once
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef long long intptr_t;
typedef unsigned long long uintptr_t;
