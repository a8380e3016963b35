"""The CUDA optimizer kernels' block bodies (csrc/cuda/multi_tensor.cuh), compiled for the host and run over
their whole planned grid by tests/ops/cuda_emulation.cpp, under AddressSanitizer: every entry updated once and
exactly as the scalar AdamW update, masked-out entries bit-identical, vector accesses aligned, out-of-range
indices flagged. This checks the multi-tensor indexing and vector paths on machines without a GPU."""
import os
import shutil
import subprocess
from pathlib import Path

from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[2]


def test_cuda_kernel_bodies_on_host(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler: it is also needed to build surgery._C"
    exe = tmp_path / "cuda_emulation"
    cmd = [cxx, "-std=c++17", "-O1", "-g", *(f"-I{p}" for p in include_paths()), f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests/ops/cuda_emulation.cpp"), "-o", str(exe)]
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    build = subprocess.run(cmd + sanitize, capture_output=True, text=True)
    if build.returncode != 0 and "asan" in build.stderr:  # no sanitizer runtime here: the asserts still check
        build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr[-3000:]
