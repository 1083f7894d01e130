/* NVRTC only (src/cuda/rtc.rs): NVRTC has no C library headers, so run-time compilation gets
 * this stand-in for <stdint.h> with the fixed-width types the kernels and kernels/abi use
 * with glibc's LP64 definitions (64-bit types are `long`, as nvcc sees them on Linux). nvcc never
 * sees this file: it is not on nvcc's include path. */
#pragma once
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;
