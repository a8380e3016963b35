"""fisher_accumulate_: Triton kernels (flat and multi-tensor) vs the reference twin."""
import sys

import pytest
import torch

import surgery.kernels as K
from surgery.kernels import reference

kernel_module = sys.modules["surgery.kernels.fisher"] if K.HAS_TRITON else None
NO_CUDA = not torch.cuda.is_available()
interp = pytest.mark.skipif(not (K.HAS_TRITON and NO_CUDA) or bool(K.INTERPRETER_PROBLEM),
                            reason=K.INTERPRETER_PROBLEM
                            or "CPU tensors run the Triton interpreter only on machines without CUDA")


def tensors(shapes, dtype=torch.float32, device="cpu"):
    fisher = [torch.rand(s, device=device) for s in shapes]
    grads = [(torch.randn(s, device=device) * 3).to(dtype) for s in shapes]
    return fisher, grads


def check_against_reference(fisher, grads, scale, fn=None):
    expect = [f.clone() for f in fisher]
    reference.fisher_accumulate_(expect, grads, scale)
    before = K.calls["triton"]
    (fn or K.fisher_accumulate_)(fisher, grads, scale)
    assert K.calls["triton"] == before + 1, "fisher_accumulate_ took the reference path, not the Triton kernel"
    for f, e in zip(fisher, expect):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)


@interp
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_many_tensors_match_reference(scale):
    torch.manual_seed(int(scale * 10))
    fisher, grads = tensors([(1,), (7, 33), (3, 5, 100), (0,), (1025,), (2, 600)])
    check_against_reference(fisher, grads, scale)
    check_against_reference(fisher, grads, scale)  # second call: the cached table


@interp
def test_one_tensor_and_flat_buffer():
    torch.manual_seed(1)
    fisher, grads = tensors([(9, 31)])
    check_against_reference(fisher, grads, 0.5)
    flat_f, flat_g = torch.rand(3000), torch.randn(3000)
    expect = flat_f + 0.25 * flat_g * flat_g
    before = K.calls["triton"]
    K.fisher_accumulate_flat_(flat_f, flat_g, 0.25)
    assert K.calls["triton"] == before + 1
    torch.testing.assert_close(flat_f, expect, rtol=1e-6, atol=1e-6)


@interp
def test_views_of_one_buffer_and_odd_layouts():
    """Parameters as views of flat buffers at unaligned offsets; a transposed (non-contiguous) grad."""
    torch.manual_seed(2)
    fbuf, gbuf = torch.rand(1000), torch.randn(1000)
    cuts = [(0, 7), (7, 300), (307, 1), (308, 692)]
    fisher = [fbuf[a:a + n] for a, n in cuts]
    grads = [gbuf[a:a + n] for a, n in cuts]
    check_against_reference(fisher, grads, 1.5)
    f, g = tensors([(12, 5)])
    check_against_reference([f[0], torch.rand(4)], [torch.randn(5, 12).t(), torch.randn(4)], 1.0)


@interp
def test_mixed_grad_dtypes():
    torch.manual_seed(3)
    fisher = [torch.rand(40), torch.rand(3, 11), torch.rand(17)]
    grads = [torch.randn(40), torch.randn(3, 11, dtype=torch.float64), torch.randn(17).half()]
    check_against_reference(fisher, grads, 0.7)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_bad_arguments_raise(path, monkeypatch):
    """The same bad call raises the same error on both paths (the reference path used to broadcast silently)."""
    if path == "triton" and not K.HAS_TRITON:
        pytest.skip("needs triton")
    if path == "reference":
        monkeypatch.setattr(K, "INTERPRET", False)
    module = kernel_module if path == "triton" else K
    f, g = tensors([(3, 4)])
    before = f[0].clone()
    call = module.fisher_accumulate_
    with pytest.raises(ValueError, match=r"fisher\[0\] has shape \[3, 4\] but grads\[0\] \[4\]"):
        call(f, [torch.ones(4)])  # broadcastable, still refused
    with pytest.raises(ValueError, match="1 fisher tensors but 2 grads"):
        call(f, g * 2)
    with pytest.raises(TypeError, match=r"fisher\[0\] must be a contiguous fp32 tensor, got torch.float64"):
        call([f[0].double()], g)
    with pytest.raises(TypeError, match=r"fisher\[0\] must be a contiguous fp32 tensor, got torch.float32 \(not contiguous\)"):
        call([torch.rand(4, 3).t()], g)
    with pytest.raises(TypeError, match=r"grads\[0\] must be floating point, got torch.int64"):
        call(f, [torch.ones(3, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"fisher\[0\] has shape \[3, 4\] but grads\[0\] \[4, 3\]"):
        call(f, [torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"fisher\[0\] is on cpu but grads\[0\] on meta"):
        call(f, [torch.randn(3, 4, device="meta")])
    with pytest.raises(TypeError, match="must be lists of tensors"):
        call(f[0], g[0])
    with pytest.raises(ValueError, match="fisher has shape"):
        module.fisher_accumulate_flat_(torch.zeros(5), torch.zeros(6))
    with pytest.raises(RuntimeError, match=r"fisher\[0\] is a leaf tensor that requires grad"):
        call([f[0].clone().requires_grad_()], g)
    assert torch.equal(f[0], before)  # no bad call wrote anything


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_no_autograd_graph(path, monkeypatch):
    """Gradients that require grad (a hook on a create_graph backward) add values, not a graph, on both paths: a
    graph on the Fisher buffer would keep every batch's tensors alive."""
    if path == "triton" and not (K.HAS_TRITON and K.INTERPRET):
        pytest.skip("needs triton's interpreter")
    if path == "reference":
        monkeypatch.setattr(K, "INTERPRET", False)
    f, g = tensors([(3, 4), (5,)])
    expect = [x + y.square() for x, y in zip(f, g)]
    K.fisher_accumulate_(f, [x.requires_grad_() for x in g])
    assert all(x.grad_fn is None and not x.requires_grad for x in f)
    torch.testing.assert_close(f, expect)
    assert [x._version for x in f] >= [1, 1]  # autograd is told of the in-place write, whichever path wrote
    flat, before = torch.zeros(5), torch.zeros(5)._version
    K.fisher_accumulate_flat_(flat, g[1].detach())
    assert flat._version > before


@interp
def test_list_across_paths():
    """A list whose tensors take different paths (here CPU through the interpreter, meta through the reference)
    checks every pair before writing, then runs each part on its own path."""
    f, g = tensors([(3, 4), (7,)])
    expect = [x + 0.5 * y.square() for x, y in zip(f, g)]
    fm, start = torch.zeros(6, device="meta"), [x.clone() for x in f]
    before = dict(K.calls)
    with pytest.raises(ValueError, match=r"fisher\[2\] has shape \[6\] but grads\[2\] \[5\]"):
        K.fisher_accumulate_([*f, fm], [*g, torch.zeros(5, device="meta")], 0.5)
    assert dict(K.calls) == before and all(torch.equal(x, y) for x, y in zip(f, start))  # nothing written
    K.fisher_accumulate_([f[0], fm, f[1]], [g[0], torch.zeros(6, device="meta"), g[1]], 0.5)
    torch.testing.assert_close(f, expect)
    assert K.calls["triton"] == before.get("triton", 0) + 1 and K.calls["reference"] == before.get("reference", 0) + 1


@interp
def test_shared_fisher_adds_each_term(monkeypatch):
    """A fisher tensor listed twice (or overlapping views) gets both terms, as in the reference loop: one
    launch would race on the shared entries, so such a list goes out one tensor after another."""
    torch.manual_seed(5)
    fbuf = torch.rand(100)
    fisher = [fbuf[:60], torch.rand(33), fbuf[40:], fbuf[:60]]
    grads = [torch.randn(60), torch.randn(33), torch.randn(60), torch.randn(60)]
    flat = []
    launch = kernel_module._launch_flat
    monkeypatch.setattr(kernel_module, "_launch_flat", lambda f, g, s: (flat.append(f.numel()), launch(f, g, s)))
    expect = fbuf.clone(), fisher[1].clone()
    reference.fisher_accumulate_([expect[0][:60], expect[1], expect[0][40:], expect[0][:60]], grads, 0.5)
    K.fisher_accumulate_(fisher, grads, 0.5)
    assert flat == [60, 33, 60, 60]
    torch.testing.assert_close(fbuf, expect[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fisher[1], expect[1], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    torch.manual_seed(4)
    fisher, grads = tensors([(4096, 1024), (4096,), (1024, 4096), (1024,), (13, 7), (0,)], dtype, "cuda")
    check_against_reference(fisher, grads, 0.25)
    check_against_reference(fisher[:1], grads[:1], 2.0)
    fbuf, gbuf = torch.rand(100_003, device="cuda"), torch.randn(100_003, device="cuda").to(dtype)
    cuts = [(0, 7), (7, 50_000), (50_007, 3), (50_010, 49_993)]  # unaligned views
    check_against_reference([fbuf[a:a + n] for a, n in cuts], [gbuf[a:a + n] for a, n in cuts], 1.0)


@interp
def test_more_tensors_than_one_table_block():
    """300 tensors (the kernel scans its table in blocks of 128), in reverse allocation order."""
    torch.manual_seed(5)
    fisher, grads = tensors([(int(n),) for n in torch.randint(0, 40, (300,))])
    check_against_reference(fisher[::-1], grads[::-1], 0.3)


@pytest.mark.skipif(not K.HAS_TRITON, reason="needs triton")
def test_interpreter_problem_names_the_broken_pairs():
    """Triton < 3.7's interpreter with NumPy >= 2.4 is refused with the way out; other pairs are fine."""
    assert "install triton>=3.7 or numpy<2.4" in K.interpreter_problem("3.6.0", "2.4.6")
    assert "triton 3.0.0's interpreter fails with numpy 2.5.0rc1" in K.interpreter_problem("3.0.0", "2.5.0rc1")
    for ok in (("3.7.0", "2.4.6"), ("3.6.0", "2.3.5"), ("3.9.0+git1a2b", "2.4.0"), ("4.0.0", "1.26.4")):
        assert K.interpreter_problem(*ok) is None, ok
