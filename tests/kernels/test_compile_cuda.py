"""The Triton kernels' CUDA path compiles (Triton -> PTX -> cubin with Triton's bundled ptxas) for sm_80 and sm_90
at the launch shapes the dispatcher uses, without a GPU. The interpreter tests cannot catch a kernel that only
fails to compile for a real target; this can. Runs in a subprocess: the test session runs triton interpreted."""
import os
import subprocess
import sys

import pytest

CODE = r'''
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import surgery.kernels
A = importlib.import_module("surgery.kernels.activation_stats")
F = importlib.import_module("surgery.kernels.fisher")
target = GPUTarget("cuda", int(sys.argv[1]), 32)

def build(fn, sig, consts, num_warps):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": num_warps})
    assert k.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)

c, m, fl = A.CUDA_CONFIG, F.MULTI_CONFIG, F.FLAT_CONFIG
for dt in ("*bf16", "*fp16", "*fp32"):
    for has_mask in (False, True):
        build(A._stats_partial_kernel,
              dict(z_ptr=dt, mask_ptr="*i8", part_ptr="*fp32", n_rows="i32", H="i32", stride_row="i64",
                   rows_per_prog="i32", HAS_MASK="constexpr", BLOCK_R="constexpr", BLOCK_H="constexpr",
                   UNROLL="constexpr", NUM_STAGES="constexpr"),
              dict(HAS_MASK=has_mask, BLOCK_R=c["block_r"], BLOCK_H=c["block_h"], UNROLL=c["unroll"],
                   NUM_STAGES=c["num_stages"]), c["num_warps"])
    for align in (1, 8):
        build(F._fisher_multi_kernel,
              dict(f_base="*fp32", g_base=dt, table_ptr="*i64", n_tensors="i32", scale="fp32", ALIGN="constexpr",
                   CHUNK="constexpr", BLOCK="constexpr", TBLOCK="constexpr"),
              dict(ALIGN=align, CHUNK=m["block"] * m["chunk_blocks"], BLOCK=m["block"], TBLOCK=128), m["num_warps"])
    build(F._fisher_flat_kernel, dict(f_ptr="*fp32", g_ptr=dt, n="i32", scale="fp32", BLOCK="constexpr"),
          dict(BLOCK=fl["block"]), fl["num_warps"])
for acc in (False, True):
    build(A._stats_finish_kernel, dict(part_ptr="*fp32", out_ptr="*fp32", n_parts="i32", n_out="i32",
                                       ACCUMULATE="constexpr", BLOCK="constexpr", PARTS="constexpr"),
          dict(ACCUMULATE=acc, BLOCK=c["finish_block"], PARTS=c["finish_parts"]), 4)
'''


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_cuda(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", CODE, str(arch)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 3 * (2 + 2 + 1) + 2
