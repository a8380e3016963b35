"""Sweep activation_stats launch shapes on a GPU (bf16 CLIP-L/14-336 MLP activations); prints GB/s each."""
import itertools
import sys

import torch
import triton.testing

import surgery.kernels  # noqa: F401

mod = sys.modules["surgery.kernels.activation_stats"]

z = torch.randn(32, 577, 4096, device="cuda").to(torch.bfloat16)
moved = z.numel() * 2
ref = mod.activation_stats(z).clone()
best = None
for bh, br, pps, nw in itertools.product([64, 128, 256], [8, 16, 32, 64], [2, 4, 8, 16], [4, 8]):
    mod.CUDA_CONFIG.update(block_h=bh, block_r=br, programs_per_sm=pps, num_warps=nw)
    try:
        out = mod.activation_stats(z)
        assert torch.allclose(out, ref, rtol=1e-3, atol=1e-1)
        t = triton.testing.do_bench(lambda: mod.activation_stats(z), warmup=10, rep=40, return_mode="median")
    except Exception as e:
        print(bh, br, pps, nw, "failed", type(e).__name__)
        continue
    gbs = moved / t / 1e6
    if best is None or gbs > best[0]:
        best = (gbs, bh, br, pps, nw)
print("best GB/s=%.0f block_h=%d block_r=%d programs_per_sm=%d num_warps=%d" % best)
