#!/usr/bin/env bash
# The FlashAttention-2 anchor of the kernel report: builds FA2's own forward and backward kernels
# (hdim 64 and 128, fp16, causal, even sequence lengths: the instantiations FA2 launches on an
# H100) as sm_80 and sm_90 cubins OUTSIDE the repository, and runs the same report on them
# (cargo run --example kernel_report -- --manifest ...). Nothing of FA2 is ever committed.
#
# Usage: tools/kernel_report/fa2_anchor.sh FA2_SRC CUTLASS_INCLUDE [OUT_DIR]
#   FA2_SRC          a flash-attention checkout (its csrc/flash_attn/src is used)
#   CUTLASS_INCLUDE  CUTLASS's include/ (flash-attention's csrc/cutlass submodule)
#   OUT_DIR          where the build goes (default /tmp/fa2-anchor)
# torch is not needed: three tiny stub headers stand in for the c10/ATen macros FA2 includes.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
SRC=$(cd "$1" && pwd)/csrc/flash_attn/src
CUTLASS=$(cd "$2" && pwd)
OUT=${3:-/tmp/fa2-anchor}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE="${PREFIX_TUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune}"
NVCC=${NVCC:-$CACHE/cuda-13.0.88/nvidia/cu13/bin/nvcc}
[[ -f $SRC/flash_fwd_kernel.h ]] || { echo "no $SRC/flash_fwd_kernel.h" >&2; exit 1; }
mkdir -p "$OUT/stub/c10/cuda" "$OUT/stub/ATen/cuda/detail"
cd "$OUT"
cat > stub/c10/cuda/CUDAException.h <<'H'
#pragma once
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
H
cat > stub/ATen/cuda/PhiloxCudaState.h <<'H'
#pragma once
#include <cstdint>
namespace at { struct PhiloxCudaState { uint64_t seed_ = 0, offset_ = 0; }; }
H
cat > stub/ATen/cuda/detail/UnpackRaw.cuh <<'H'
#pragma once
#include <cstdint>
#include <tuple>
#include <ATen/cuda/PhiloxCudaState.h>
namespace at { namespace cuda { namespace philox {
__host__ __device__ __forceinline__ std::tuple<uint64_t, uint64_t> unpack(at::PhiloxCudaState a) {
  return std::make_tuple(a.seed_, a.offset_);
}
}}}
H
# name | header | kernel template | traits (FA2's choice on H100, flash_*_launch_template.h) | flags
FWD_FLAGS="false, true, false, false, true, true, false, false" # !dropout, causal, !local, !alibi, even MN, even K, !softcap, !return softmax
BWD_FLAGS="false, true, false, false, true, true, false"        # !dropout, causal, !local, !alibi, even MN, even K, !softcap
KERNELS=(
  "fwd_d64|flash_fwd_launch_template.h|flash_fwd_kernel|Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t>|$FWD_FLAGS|Flash_fwd_params|kSmemSize"
  "fwd_d128|flash_fwd_launch_template.h|flash_fwd_kernel|Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::half_t>|$FWD_FLAGS|Flash_fwd_params|kSmemSize"
  "bwd_d64|flash_bwd_launch_template.h|flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel|Flash_bwd_kernel_traits<64, 128, 128, 8, 4, 4, 4, false, false, cutlass::half_t>|$BWD_FLAGS|Flash_bwd_params|kSmemSize1colblock"
  "bwd_d128|flash_bwd_launch_template.h|flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel|Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2, false, false, cutlass::half_t>|$BWD_FLAGS|Flash_bwd_params|kSmemSize1colblock"
)
FLAGS="-O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -lineinfo -I $SRC -I $CUTLASS -I stub"
{
  echo '#include <cstdio>'
  echo '#include "namespace_config.h"'
  echo '#include "kernel_traits.h"'
  echo 'int main() {'
  for k in "${KERNELS[@]}"; do
    IFS='|' read -r name _ _ traits _ _ smem <<<"$k"
    echo "  { using T = $traits; printf(\"$name %d %d %d %d\\n\", T::kNThreads, (int)T::$smem, T::kBlockM, T::kBlockN); }"
  done
  echo '}'
} > sizes.cu
"$NVCC" -std=c++17 --expt-relaxed-constexpr -I "$SRC" -I "$CUTLASS" -I stub sizes.cu \
  -L "$(dirname "$NVCC")/../lib" -o sizes
./sizes > sizes.txt
: > manifest.txt
for k in "${KERNELS[@]}"; do
  IFS='|' read -r name header kernel traits flags params _ <<<"$k"
  cat > "fa2_$name.cu" <<CU
#include "namespace_config.h"
#include "$header"
namespace FLASH_NAMESPACE {
template __global__ void $kernel<$traits, $flags>(KERNEL_PARAM_MODIFIER const $params params);
}
CU
  read -r _ threads smem bm bn < <(grep "^$name " sizes.txt)
  d=${name#*_d}
  warps=$((threads / 32))
  if [[ $name == fwd* ]]; then gemms=2; else gemms=5; fi
  tile=$((gemms * bm * bn * d / 2048 / warps))
  for arch in 80 90; do
    [[ -f fa2_$name.sm_$arch.cubin ]] || "$NVCC" -cubin -arch=sm_$arch $FLAGS -Xptxas -v \
      "fa2_$name.cu" -o "fa2_$name.sm_$arch.cubin" > "fa2_$name.sm_$arch.log" 2>&1
    echo "fa2_$name.sm_$arch.cubin | sm_$arch | FA2 $name (${bm}x$bn, $warps warps) | $kernel | $threads | $smem | $tile" >> manifest.txt
  done
done
cd "$REPO"
cargo run --release --example kernel_report -- --manifest "$OUT/manifest.txt"
