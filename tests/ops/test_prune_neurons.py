import pytest
import torch

import surgery.ops as ops
from surgery.ops import reference


def weights(device, dtype, H=37, D=11, gated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    fc_in = [torch.randn(H, D, generator=g).to(device, dtype) for _ in range(2 if gated else 1)]
    bias = [torch.randn(H, generator=g).to(device, dtype) for _ in fc_in]
    fc_out = torch.randn(D, H, generator=g).to(device, dtype)
    return fc_in, bias, fc_out


@pytest.mark.parametrize("D", [11, 64])  # 64: rows of whole 16-byte vectors (the CUDA kernel's vector path)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, gated, dtype, D):
    neurons = torch.tensor([0, 5, 36, 17], device=device)
    fast, ref = weights(device, dtype, D=D, gated=gated), weights(device, dtype, D=D, gated=gated)
    ops.prune_neurons_(fast[0] if gated else fast[0][0], fast[1] if gated else fast[1][0], fast[2], neurons)
    reference.prune_neurons_(ref[0], ref[1], ref[2], neurons)
    for a, b in zip([*fast[0], *fast[1], fast[2]], [*ref[0], *ref[1], ref[2]]):
        assert torch.equal(a, b)
    assert (fast[2][:, neurons] == 0).all() and (fast[0][0][neurons] == 0).all()
    keep = torch.ones(37, dtype=torch.bool, device=device)
    keep[neurons] = False
    assert (fast[0][0][keep] != 0).all()


def test_opcheck_and_bad_calls(device):
    fc_in, bias, fc_out = weights(device, torch.float32)
    torch.library.opcheck(torch.ops.surgery.prune_neurons_.default, (fc_in, bias, fc_out, torch.tensor([1, 2], device=device)))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.prune_neurons_(fc_in, bias, fc_out, torch.tensor([37], device=device))
    with pytest.raises(RuntimeError, match=r"must be a contiguous \[37, D\]"):
        ops.prune_neurons_(torch.randn(36, 11, device=device), None, fc_out, torch.tensor([1], device=device))
    with pytest.raises(RuntimeError, match="biases for"):
        ops.prune_neurons_(fc_in, bias * 2, fc_out, torch.tensor([1], device=device))
    for prune in (ops.prune_neurons_, reference.prune_neurons_):
        before = [t.clone() for t in (*fc_in, *bias, fc_out)]
        with pytest.raises(TypeError, match="neurons must be an integer index tensor"):
            prune(fc_in, bias, fc_out, torch.zeros(37, dtype=torch.bool, device=device))  # a mask, not indices
        with pytest.raises(TypeError, match="neurons must be an integer index tensor"):
            prune(fc_in, bias, fc_out, torch.tensor([1.7], device=device))
        with pytest.raises(RuntimeError, match=r"out of range \[0, 37\): min -1"):
            prune(fc_in, bias, fc_out, torch.tensor([-1, 3], device=device))
        assert all(torch.equal(a, b) for a, b in zip(before, (*fc_in, *bias, fc_out)))


def test_strided_or_byte_arguments_raise(device):
    """A bias or index view with a stride, or a 1-byte weight dtype, would make the kernels write the wrong bytes."""
    fc_in, bias, fc_out = weights(device, torch.float32)
    strided_bias = torch.ones(37, 2, device=device)[:, 0]
    with pytest.raises(RuntimeError, match=r"fc_in_bias\[0\] must be a contiguous"):
        ops.prune_neurons_(fc_in, [strided_bias], fc_out, torch.tensor([3], device=device))
    assert (strided_bias == 1).all()
    with pytest.raises(RuntimeError, match=r"fc_in_bias\[0\] must be a contiguous \[37\] Float"):
        ops.prune_neurons_(fc_in, [bias[0].double()], fc_out, torch.tensor([3], device=device))
    strided = torch.tensor([0, 10**6, 1, 10**6], device=device)[::2]   # the op itself, not the wrapper
    with pytest.raises(RuntimeError, match="neurons must be a contiguous int64"):
        torch.ops.surgery.prune_neurons_(fc_in, bias, fc_out, strided)
    with pytest.raises(RuntimeError, match="must be fp32, fp64, bf16 or fp16"):
        ops.prune_neurons_([fc_in[0].to(torch.int8)], None, fc_out.to(torch.int8), torch.tensor([1], device=device))
