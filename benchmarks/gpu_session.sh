#!/usr/bin/env bash
# Everything the GPU checks need, in two calls of at most 10 minutes each on the lent machine (see its
# METHOD.md): results and logs go to $OUT (default gpu_out/).
#   bash benchmarks/gpu_session.sh test    # build surgery._C with CUDA, the bad-call diagnosis, every test
#   bash benchmarks/gpu_session.sh bench   # kernel launch-shape sweep + kernel and op benchmarks (JSON)
# `test` must run first on a machine (it builds the extension in place).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  ${CXX:-c++} --version | head -1; } > "$OUT/environment.txt" 2>&1
case "${1:-}" in
  test)
    # A/B for the open TORCH_CHECK crash: the CPU-only build on this machine first (does it crash too?)
    SURGERY_CUDA=0 $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build_cpu_only.log" 2>&1 \
      && timeout 300 $PY benchmarks/diagnose_raise.py > "$OUT/diagnose_raise_cpu_only_build.txt" 2>&1
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    SURGERY_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
      > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    $PY -c "import surgery.ops as o; print('cuda backend:', o.backend('cuda'), o.backend('cuda', 'sparse_adamw_'), o.backend('cuda', 'prune_neurons_'))" | tee "$OUT/backend.txt"
    timeout 300 $PY benchmarks/diagnose_raise.py > "$OUT/diagnose_raise.txt" 2>&1
    SURGERY_REQUIRE_EXTENSION=1 $PY -m pytest -q -rs tests -p no:cacheprovider > "$OUT/tests.txt" 2>&1
    tail -15 "$OUT/tests.txt"; head -20 "$OUT/diagnose_raise_cpu_only_build.txt" "$OUT/diagnose_raise.txt"
    tail -4 "$OUT/diagnose_raise.txt" ;;  # the minimal-extension A/B
  bench)
    $PY benchmarks/bench_kernels.py --sweep --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2> "$OUT/kernels.err"
    $PY benchmarks/bench_ops.py --device cuda --json "$OUT/ops.json" > "$OUT/ops.txt" 2> "$OUT/ops.err"
    cat "$OUT/kernels.txt" "$OUT/ops.txt" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh test|bench" >&2; exit 2 ;;
esac
