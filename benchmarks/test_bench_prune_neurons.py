"""pytest-benchmark: prune_neurons_ (surgery._C) vs the reference twin, 30% of the neurons of one fp32 MLP layer:
CLIP-L (fc1 [4096, 1024] + bias, fc2 [1024, 4096]) and a Qwen2-VL-sized gated MLP (gate, up [5120, 1280], no bias;
fc_out [1280, 5120]). Pruning is idempotent, so every round runs on the same tensors.

    pytest benchmarks/test_bench_prune_neurons.py            # CPU; the CUDA cases skip without a GPU"""
import pytest
import torch

import surgery.ops as ops
from surgery.ops import reference

CUDA = torch.cuda.is_available()
IMPLS = {"extension": ops.prune_neurons_, "reference": reference.prune_neurons_}
LAYERS = {"clip-l": (1024, 4096, False), "qwen2-vl-gated": (1280, 5120, True)}  # d, h, gated


def layer(name, device):
    """(fc_in, fc_in_bias, fc_out, neurons) as a model hands them to prune_neurons_: gated MLPs have no bias."""
    d, h, gated = LAYERS[name]
    torch.manual_seed(0)
    fc_in = [torch.randn(h, d, device=device) for _ in range(2)] if gated else torch.randn(h, d, device=device)
    bias = None if gated else torch.randn(h, device=device)
    fc_out = torch.randn(d, h, device=device)
    neurons = torch.randperm(h, device=device)[:round(0.3 * h)]
    return fc_in, bias, fc_out, neurons


def check_extension(impl, device):
    if impl != "extension":
        return
    if not ops.HAS_EXTENSION:
        pytest.skip("surgery._C is not importable: build it with `pip install --no-build-isolation -e .`")
    if ops.backend(device, "prune_neurons_") != "extension":
        pytest.fail(f"surgery._C has no {device} kernel for prune_neurons_: the reference would be timed")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_cpu(benchmark, impl, name):
    check_extension(impl, "cpu")
    args = layer(name, "cpu")
    benchmark.group = f"prune_neurons_ cpu {name} fp32, 30% neurons"
    benchmark(IMPLS[impl], *args)
    assert args[2][:, args[3]].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_cuda(benchmark, impl, name):
    check_extension(impl, "cuda")
    args = layer(name, "cuda")
    fn = IMPLS[impl]

    def run():
        fn(*args)
        torch.cuda.synchronize()

    benchmark.group = f"prune_neurons_ cuda {name} fp32, 30% neurons"
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
