"""pytest-benchmark: fisher_accumulate_ over every CLIP-L MLP parameter, public function (Triton on CUDA) vs the
per-tensor reference loop and torch._foreach_addcmul_.

    pytest benchmarks/test_bench_fisher.py            # CPU: small shapes; CUDA cases skip without a GPU
For bandwidth and % of peak on a GPU, use benchmarks/bench_kernels.py."""
import pytest
import torch

import surgery.kernels as K
from surgery.kernels import reference

CUDA = torch.cuda.is_available()


def mlp_tensors(layers, d, h, dtype, device):
    shapes = [s for _ in range(layers) for s in [(h, d), (h,), (d, h), (d,)]]
    fisher = [torch.rand(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return fisher, grads


IMPLS = {
    "kernels": lambda f, g: K.fisher_accumulate_(f, g, 0.5),
    "reference_loop": lambda f, g: reference.fisher_accumulate_(f, g, 0.5),
    "foreach_addcmul": lambda f, g: torch._foreach_addcmul_(f, g, g, value=0.5),
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_cpu_small(benchmark, impl):
    torch.manual_seed(0)
    fisher, grads = mlp_tensors(2, 32, 128, torch.float32, "cpu")
    benchmark.group = "fisher_accumulate_ cpu 2 layers d=32 h=128 fp32"
    benchmark(IMPLS[impl], fisher, grads)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", list(IMPLS) + ["kernels_flat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_clip_l(benchmark, impl, dtype):
    torch.manual_seed(0)
    fisher, grads = mlp_tensors(24, 1024, 4096, dtype, "cuda")
    if impl == "foreach_addcmul" and dtype != torch.float32:
        grads = [g.float() for g in grads]  # the fast foreach path needs one dtype (conversion not timed)
    if impl == "kernels_flat":
        n = sum(f.numel() for f in fisher)
        fisher, grads = [torch.rand(n, device="cuda")], [torch.randn(n, device="cuda").to(dtype)]
        fn = lambda f, g: K.fisher_accumulate_flat_(f[0], g[0], 0.5)  # noqa: E731
    else:
        fn = IMPLS[impl]

    def run():
        fn(fisher, grads)
        torch.cuda.synchronize()

    benchmark.group = f"fisher_accumulate_ cuda CLIP-L MLPs (24 layers, 201M params) {dtype}"
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
