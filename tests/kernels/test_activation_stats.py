import pytest
import torch

import surgery.kernels as K
from surgery.kernels import reference

CPU_TRITON = K.INTERPRET and K.HAS_TRITON
needs_interp = pytest.mark.skipif(not CPU_TRITON, reason="needs TRITON_INTERPRET=1 and triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def close(a, b, dtype=torch.float32):
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(a[:3], b[:3], rtol=tol, atol=tol * max(1.0, b[:3].abs().max().item()) * 1e-2)
    assert torch.equal(a[3], b[3])


@needs_interp
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 1000), (41, 129), (2, 3, 4, 17)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(shape, masked):
    g = torch.Generator().manual_seed(hash(shape) % 1000 + masked)
    z = torch.randn(shape, generator=g) * 3
    mask = torch.rand(shape[:-1], generator=g) < 0.6 if masked else None
    assert K.use_triton(z)
    close(K.activation_stats(z, row_mask=mask), reference.activation_stats(z, row_mask=mask))


@needs_interp
def test_strided_rows_accumulate_and_determinism():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(37, 90, generator=g)
    z = base[:, 5:68]                         # row stride 90 > H = 63: no copy needed
    out = torch.rand(4, 63, generator=g)
    expect = out + reference.activation_stats(z)
    got = K.activation_stats(z, out=out)
    assert got is out
    close(out, expect)
    assert torch.equal(K.activation_stats(z), K.activation_stats(z))   # bit-identical repeats
    none = torch.zeros(37, dtype=torch.bool)
    assert torch.equal(K.activation_stats(z, row_mask=none), torch.zeros(4, 63))


@needs_interp
def test_bad_arguments_raise():
    z = torch.randn(4, 8)
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        K.activation_stats(z.double())
    with pytest.raises(ValueError, match="out must be fp32 \\[4, 8\\]"):
        K.activation_stats(z, out=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="row_mask must be bool \\[4\\]"):
        K.activation_stats(z, row_mask=torch.ones(5, dtype=torch.bool))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(3, 577, 4096 + 37, device="cuda", generator=g).to(dtype)
    mask = torch.rand(3, 577, device="cuda", generator=g) < 0.9
    for m in (None, mask):
        got, ref = K.activation_stats(z, row_mask=m), reference.activation_stats(z, row_mask=m)
        close(got, ref, dtype)
        assert torch.equal(got, K.activation_stats(z, row_mask=m))
