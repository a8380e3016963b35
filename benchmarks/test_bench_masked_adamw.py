"""pytest-benchmark: one masked AdamW step over 12 fp32 tensors (50,331,648 params) at mask densities 1/10/50%:
masked_adamw_ (dense state, surgery._C), sparse_adamw_ (compact state), the reference twin, and torch.optim.AdamW
(foreach on CPU, fused on CUDA) followed by restoring the masked-out entries. extra_info has the optimizer-state
bytes (for torch: its moments, the mask and the saved copy the restore reads).

    pytest benchmarks/test_bench_masked_adamw.py                              # ~30 s on 2 CPU cores
    SURGERY_BENCH_PARAMS=1200000 pytest benchmarks/test_bench_masked_adamw.py # quick run
The CUDA cases skip without a GPU; for GB/s on a GPU, use benchmarks/bench_ops.py."""
import os

import pytest
import torch

import surgery.ops as ops
from surgery.ops import reference

CUDA = torch.cuda.is_available()
N_TENSORS = 12
PARAMS = int(os.environ.get("SURGERY_BENCH_PARAMS", 50_331_648)) // N_TENSORS * N_TENSORS
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
IMPLS = ["dense", "compact", "reference", "torch_adamw+mask"]
EXTENSION_OP = {"dense": "masked_adamw_", "compact": "sparse_adamw_"}


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module", params=[0.01, 0.1, 0.5], ids=["1%", "10%", "50%"])
def inputs(request):
    """(density, params, grads, masks) on the CPU, built once per density: the steps' drift does not change timings."""
    g = torch.Generator().manual_seed(0)
    shape = (PARAMS // N_TENSORS,)
    params = [torch.randn(shape, generator=g) for _ in range(N_TENSORS)]
    grads = [torch.randn(shape, generator=g) for _ in range(N_TENSORS)]
    masks = [torch.rand(shape, generator=g) < request.param for _ in range(N_TENSORS)]
    return request.param, params, grads, masks


def make_step(impl, params, grads, masks, torch_kw):
    """The timed call for `impl`, and a function giving the optimizer-state tensors it keeps."""
    if impl in ("dense", "reference"):
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        op = ops.masked_adamw_ if impl == "dense" else reference.masked_adamw_
        return lambda: op(params, grads, m, v, masks, step=3, **HP), lambda: m + v + masks
    if impl == "compact":
        idx = [torch.nonzero(k).flatten().int() for k in masks]
        m = [torch.zeros(i.numel(), device=i.device) for i in idx]
        v = [torch.zeros_like(t) for t in m]
        return lambda: ops.sparse_adamw_(params, grads, m, v, idx, step=3, **HP), lambda: idx + m + v
    leaves = [p.clone().requires_grad_(True) for p in params]
    for p, gr in zip(leaves, grads):
        p.grad = gr
    opt = torch.optim.AdamW(leaves, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], **torch_kw)
    saved = [p.detach().clone() for p in leaves]  # masked-out entries never change: one copy serves every step

    def step():
        opt.step()
        with torch.no_grad():
            for p, s, k in zip(leaves, saved, masks):
                torch.where(k, p, s, out=p)
    return step, lambda: [st[k] for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq")] + masks + saved


def run_case(benchmark, impl, inputs, device, torch_kw, rounds):
    if impl in EXTENSION_OP:  # checked before timing: the point is to benchmark the compiled op
        if not ops.HAS_EXTENSION:
            pytest.skip("surgery._C is not importable: build it with `pip install --no-build-isolation -e .`")
        if ops.backend(device, EXTENSION_OP[impl]) != "extension":
            pytest.fail(f"surgery._C has no {device} kernel for {EXTENSION_OP[impl]}: the reference would be timed")
    density, *tensors = inputs
    params, grads, masks = [[t.to(device) for t in ts] for ts in tensors]
    step, state = make_step(impl, params, grads, masks, torch_kw)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def run():
        step()
        sync()

    benchmark.group = f"masked AdamW step {device} {PARAMS:,} fp32 params, density {density:.0%}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(density=density, params=PARAMS, state_bytes=nbytes(state()))


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu(benchmark, impl, inputs):
    run_case(benchmark, impl, inputs, "cpu", {"foreach": True}, rounds=5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda(benchmark, impl, inputs):
    run_case(benchmark, impl, inputs, "cuda", {"fused": True}, rounds=30)
