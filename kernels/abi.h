/* The kernels' ABI: every struct and enum passed from Rust to a kernel, by value.
 *
 * build.rs runs bindgen on this file (types and constants named pt_* / PT_* only) to produce
 * src/cuda/abi.rs, and every kernel family's .cu file includes its own header below, so the two
 * sides cannot drift apart. Plain C (no C++ features), fixed-width types, no pointers: pointers are
 * separate kernel arguments.
 *
 * One header per kernel family, included here explicitly. Adding a family: create
 * kernels/abi/<family>.h and add one `#include "abi/<family>.h"` line below.
 */
#ifndef PT_ABI_H
#define PT_ABI_H

#include "abi/convert.h"
#include "abi/optim.h"
#include "abi/attention.h"
#include "abi/model_ops.h"
#include "abi/decode.h"

#endif /* PT_ABI_H */
