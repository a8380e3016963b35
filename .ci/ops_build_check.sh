#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc -c against torch's headers for sm_80, sm_89 and sm_90, and check the
# host-side csrc/cuda/*.cpp with the C++ compiler, so CUDA build errors show up on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)}
if [ -z "$NVCC" ]; then echo "nvcc not found: CUDA compile check skipped"; exit 0; fi
includes=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
pyinc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# The CPU torch wheel ships c10/cuda headers but not this CMake-generated one: supply its one definition.
if [ -z "$(python -c "import torch; print(torch.version.cuda or '')")" ]; then
  mkdir -p "$tmp/inc/c10/cuda/impl"
  echo '#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/inc/c10/cuda/impl/cuda_cmake_macros.h"
  includes="$includes -I$tmp/inc"
fi
for cu in csrc/cuda/*.cu; do
  for sm in 80 89 90; do
    "$NVCC" -c "$cu" -o "$tmp/$(basename "$cu" .cu)_sm$sm.o" $includes -I"$pyinc" -std=c++20 -O3 \
      -gencode=arch=compute_$sm,code=sm_$sm -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI=$abi \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__
    echo "ok  $cu sm_$sm"
  done
done
cudainc=""
for d in "${CUDA_HOME:-}/include" "$(dirname "$NVCC")/../include" /usr/local/cuda/include; do
  if [ -f "$d/cuda_runtime_api.h" ]; then cudainc=$d; break; fi
done
if [ -z "$cudainc" ]; then echo "cuda_runtime_api.h not found: host C++ check of csrc/cuda/*.cpp skipped"; exit 0; fi
for cpp in csrc/cuda/*.cpp; do
  "${CXX:-c++}" -fsyntax-only -std=c++20 $includes -I"$cudainc" -I"$pyinc" -D_GLIBCXX_USE_CXX11_ABI=$abi \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "$cpp"
  echo "ok  $cpp (host C++)"
done
