import pytest
import torch

import surgery.kernels as K
from surgery.kernels import reference

needs_interp = pytest.mark.skipif(not (K.INTERPRET and K.HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")


def tensors(device, dtype, shapes, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    fisher = [torch.rand(s, device=device, generator=g) for s in shapes]
    grads = [torch.randn(s, device=device, generator=g).to(dtype) for s in shapes]
    return fisher, grads


@needs_interp
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_matches_reference(scale):
    fisher, grads = tensors("cpu", torch.float32, [(1,), (7, 33), (3, 5, 100), (0,), (1025,)], seed=int(scale * 10))
    expect = [f.clone() for f in fisher]
    reference.fisher_accumulate_(expect, grads, scale)
    K.fisher_accumulate_(fisher, grads, scale)
    for f, e in zip(fisher, expect):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-7)


@needs_interp
def test_bad_arguments_raise():
    f, g = tensors("cpu", torch.float32, [(3, 4)], seed=0)
    with pytest.raises(ValueError, match="1 fisher tensors but 2 grads"):
        K.fisher_accumulate_(f, g * 2)
    with pytest.raises(TypeError, match="contiguous fp32"):
        K.fisher_accumulate_([f[0].double()], g)
    with pytest.raises(ValueError, match=r"fisher\[0\] \[3, 4\]"):
        K.fisher_accumulate_(f, [torch.randn(4, 3)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    fisher, grads = tensors("cuda", dtype, [(4096, 1024), (4096,), (1024, 4096), (1024,), (13, 7)], seed=3)
    expect = [f.clone() for f in fisher]
    reference.fisher_accumulate_(expect, grads, 0.25)
    K.fisher_accumulate_(fisher, grads, 0.25)
    for f, e in zip(fisher, expect):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-7)
