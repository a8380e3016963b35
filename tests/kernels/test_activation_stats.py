"""activation_stats: Triton kernel vs its reference twin (interpreter on CPU, compiled on CUDA)."""
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgery.kernels as K
from surgery.kernels import reference

kernel_module = sys.modules["surgery.kernels.activation_stats"] if K.HAS_TRITON else None
NO_CUDA = not torch.cuda.is_available()
interp = pytest.mark.skipif(not (K.HAS_TRITON and NO_CUDA) or bool(K.INTERPRETER_PROBLEM),
                            reason=K.INTERPRETER_PROBLEM
                            or "CPU tensors run the Triton interpreter only on machines without CUDA")
gpu = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs CUDA")]


def stats(z, out=None, row_mask=None):
    """The public function, asserting that it took the Triton path."""
    before = K.calls["triton"]
    result = K.activation_stats(z, out=out, row_mask=row_mask)
    assert K.calls["triton"] == before + 1, "activation_stats took the reference path, not the Triton kernel"
    return result


def assert_matches(got, ref, z):
    """Sums agree to fp32 reordering error (scaled by Σ|z| resp. Σz²); counts exactly."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = ref[1].abs() + 1e-6
    tol = 1e-5 * max(1, z.numel() // max(z.shape[-1], 1)) ** 0.5
    assert ((got[0] - ref[0]).abs() <= tol * scale).all(), (got[0] - ref[0]).abs().max()
    assert ((got[1] - ref[1]).abs() <= tol * scale).all()
    assert ((got[2] - ref[2]).abs() <= tol * (ref[2] + 1e-6)).all()
    assert torch.equal(got[3], ref[3])


@pytest.mark.skipif(not (K.HAS_TRITON and NO_CUDA), reason="only without CUDA")
def test_interpreter_path_is_on():
    assert K.INTERPRET, ("TRITON_INTERPRET=1 must be set before triton is first imported "
                         "(tests/conftest.py and tests/kernels/conftest.py do this)")


@interp
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 5, 1000), (41, 129), (2, 3, 4, 17), (0, 8)])
@pytest.mark.parametrize("mask", ["none", "random", "all_false"])
def test_matches_reference(shape, mask):
    torch.manual_seed(sum(shape) + len(mask))
    z = torch.randn(shape) * 3
    row_mask = {"none": None, "random": torch.rand(shape[:-1]) < 0.6,
                "all_false": torch.zeros(shape[:-1], dtype=torch.bool)}[mask]
    got = stats(z, row_mask=row_mask)
    assert_matches(got, reference.activation_stats(z, row_mask=row_mask), z)
    if mask == "all_false":
        assert torch.equal(got, torch.zeros(4, shape[-1]))


@interp
def test_strided_rows_without_copy():
    torch.manual_seed(1)
    base = torch.randn(37, 90)
    z = base[:, 5:68]  # row stride 90 > H = 63
    assert kernel_module.rows_view(z).data_ptr() == z.data_ptr()
    mask = torch.rand(37) < 0.5
    assert_matches(stats(z, row_mask=mask), reference.activation_stats(z, row_mask=mask), z)
    z3 = torch.randn(4, 6, 60)[:, :, 2:50]  # leading dims flatten to one row stride (60)
    assert kernel_module.rows_view(z3).data_ptr() == z3.data_ptr() and kernel_module.rows_view(z3).stride(0) == 60
    assert_matches(stats(z3), reference.activation_stats(z3), z3)
    for odd in (torch.randn(4, 6, 60)[:, :3], torch.randn(33, 20).t()):  # need a copy: still right
        assert_matches(stats(odd), reference.activation_stats(odd), odd)


@interp
def test_accumulates_into_out():
    torch.manual_seed(2)
    z, out = torch.randn(2, 9, 70), torch.rand(4, 70)
    mask = torch.rand(2, 9) < 0.7
    expect = out + reference.activation_stats(z, row_mask=mask)
    assert stats(z, out=out, row_mask=mask) is out
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@interp
def test_deterministic():
    torch.manual_seed(3)
    z = torch.randn(53, 200)
    mask = torch.rand(53) < 0.8
    first = stats(z, row_mask=mask)
    assert torch.equal(first, stats(z, row_mask=mask))
    assert torch.equal(stats(z), stats(z))


@interp
def test_fp16_input():
    torch.manual_seed(4)
    z = torch.randn(19, 40).half()
    assert_matches(stats(z), reference.activation_stats(z), z)


@interp
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(0, 40), h=st.integers(1, 150), pad=st.integers(0, 7), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_shapes(rows, h, pad, masked, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, h + pad, generator=g)[:, pad:]
    mask = torch.rand(rows, generator=g) < 0.5 if masked else None
    assert_matches(stats(z, row_mask=mask), reference.activation_stats(z, row_mask=mask), z)


def reference_path(monkeypatch):
    """The public function with CPU tensors sent down the reference path (as without TRITON_INTERPRET)."""
    monkeypatch.setattr(K, "INTERPRET", False)

    def call(*args, **kwargs):
        before = K.calls["reference"]
        result = K.activation_stats(*args, **kwargs)
        assert K.calls["reference"] == before + 1
        return result
    return call


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_no_autograd_graph(path, monkeypatch):
    """A z that requires grad (a hook in a training forward) gives plain values on both paths: a graph on `out`
    would keep every batch's activations alive."""
    if path == "triton" and not (K.HAS_TRITON and K.INTERPRET and not K.INTERPRETER_PROBLEM):
        pytest.skip(K.INTERPRETER_PROBLEM or "needs triton's interpreter")
    call = stats if path == "triton" else reference_path(monkeypatch)
    z = torch.randn(6, 9, requires_grad=True)
    out = torch.zeros(4, 9)
    for got in (call(z), call(z, out=out)):
        assert got.grad_fn is None and not got.requires_grad
        assert_matches(got, reference.activation_stats(z.detach()), z)
    assert out._version >= 1  # autograd is told of the in-place write, whichever path wrote


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_bad_arguments_raise(path, monkeypatch):
    """The same bad call raises the same error on both paths (the reference path used to compute silently)."""
    if path == "triton" and not K.HAS_TRITON:
        pytest.skip("needs triton")
    z = torch.randn(4, 8)
    call = kernel_module.activation_stats if path == "triton" else reference_path(monkeypatch)
    with pytest.raises(TypeError, match="z must be fp32, fp16 or bf16, got torch.float64"):
        call(z.double())
    with pytest.raises(TypeError, match="z must be fp32, fp16 or bf16"):
        call(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="z must be a tensor"):
        call([1.0, 2.0])
    with pytest.raises(ValueError, match=r"out must be a contiguous fp32 tensor \[4, 8\], got shape \[4, 7\]"):
        call(z, out=torch.zeros(4, 7))
    with pytest.raises(TypeError, match=r"out must be an fp32 tensor \[4, 8\], got torch.float16"):
        call(z, out=torch.zeros(4, 8, dtype=torch.half))
    with pytest.raises(ValueError, match="out is on meta but z is on cpu"):
        call(z, out=torch.zeros(4, 8, device="meta"))
    with pytest.raises(ValueError, match=r"row_mask must have shape z.shape\[:-1\] = \[4\], got \[5\]"):
        call(z, row_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="row_mask must be a bool tensor"):
        call(z, row_mask=torch.ones(4))
    with pytest.raises(ValueError, match="row_mask is on meta but z is on cpu"):
        call(z, row_mask=torch.ones(4, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match=r"row_mask must be a bool tensor \[6\], got torch.int64"):
        call(torch.ones(6, 2), row_mask=torch.tensor([0, 0, 0, 0, 0, 1]))  # not gathered as row indices
    leaf = torch.zeros(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="out is a leaf tensor that requires grad"):
        call(z, out=leaf)
    assert not leaf.detach().any()
    with torch.no_grad():  # as torch's in-place ops: allowed outside grad mode
        call(z, out=leaf)
    assert leaf.detach().any()


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_no_columns(path, monkeypatch):
    """H = 0 gives a [4, 0] result (or returns `out`), not a reshape error."""
    if path == "triton" and not (K.HAS_TRITON and NO_CUDA and not K.INTERPRETER_PROBLEM):
        pytest.skip(K.INTERPRETER_PROBLEM or "the interpreter runs only without CUDA")
    call = stats if path == "triton" else reference_path(monkeypatch)
    z = torch.randn(5, 3, 0)
    assert call(z).shape == (4, 0)
    out = torch.zeros(4, 0)
    assert call(z, out=out, row_mask=torch.ones(5, 3, dtype=torch.bool)) is out


def test_import_without_triton():
    """With triton missing, the package imports and CPU calls take the reference path."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, surgery.kernels as K\n"
            "assert not K.HAS_TRITON\n"
            "z = torch.randn(5, 3); r = K.activation_stats(z)\n"
            "assert torch.equal(r, K.reference.activation_stats(z)) and K.calls['reference'] == 1\n"
            "f = [torch.zeros(3)]; K.fisher_accumulate_(f, [torch.ones(3)], 2.0); assert f[0].tolist() == [2.0] * 3\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 577, 4096 + 37), (16, 577, 4096), (2048, 5120)])
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_matches_reference(dtype, shape):
    torch.manual_seed(5)
    z = (torch.randn(shape, device="cuda") * 2).to(dtype)
    mask = torch.rand(shape[:-1], device="cuda") < 0.9
    for m in (None, mask):
        got = stats(z, row_mask=m)
        assert_matches(got, reference.activation_stats(z, row_mask=m), z)
        assert torch.equal(got, stats(z, row_mask=m))  # same bits on every run
    out = torch.rand(4, shape[-1], device="cuda")
    expect = out + reference.activation_stats(z)
    stats(z, out=out)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_strided_and_small():
    torch.manual_seed(6)
    base = torch.randn(300, 4200, device="cuda", dtype=torch.bfloat16)
    z = base[:, 7:4103]  # misaligned rows, stride 4200
    assert_matches(stats(z), reference.activation_stats(z), z)
    for shape in [(1, 1), (7, 33), (3, 5, 1000), (0, 64)]:
        z = torch.randn(shape, device="cuda")
        assert_matches(stats(z), reference.activation_stats(z), z)
