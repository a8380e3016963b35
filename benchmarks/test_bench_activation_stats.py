"""pytest-benchmark: activation_stats, public function (Triton on CUDA) vs the reference twin.

    pytest benchmarks/test_bench_activation_stats.py            # CPU: small shapes; CUDA cases skip without a GPU
For bandwidth and % of peak on a GPU, use benchmarks/bench_kernels.py."""
import pytest
import torch

import surgery.kernels as K
from surgery.kernels import reference

CUDA = torch.cuda.is_available()
IMPLS = {"kernels": K.activation_stats, "reference": reference.activation_stats}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_small(benchmark, impl, masked):
    torch.manual_seed(0)
    z = torch.randn(4, 33, 256)
    mask = torch.rand(4, 33) < 0.8 if masked else None
    benchmark.group = f"activation_stats cpu [4, 33, 256] fp32 masked={masked}"
    out = benchmark(IMPLS[impl], z, None, mask)
    assert out.shape == (4, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", [(32, 577, 4096), (32 * 1024, 5120)], ids=["clip-l-336", "qwen2-vl"])
def test_cuda_bf16(benchmark, impl, shape):
    torch.manual_seed(0)
    z = torch.randn(shape, device="cuda").to(torch.bfloat16)
    fn = IMPLS[impl]

    def run():
        fn(z)
        torch.cuda.synchronize()

    benchmark.group = f"activation_stats cuda {list(shape)} bf16"
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)


def test_bench_script_cases_run_on_cpu():
    """benchmarks/bench_kernels.py's cases in --quick form (the collection run needs transformers: skipped here)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("bench_kernels.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.stats_case("tiny", (2, 9, 64), torch.float32, "cpu", float("nan"), quick=True)
    assert r["ms"] > 0 and r["speedup"] > 0
    rows = bench.fisher_cases(torch.float32, "cpu", float("nan"), quick=True, layers=1)
    assert [r["ref"] for r in rows] == ["per-tensor loop"] * 2
