"""The extension and the reference twin on the same calls: both refuse the same bad calls with the same message and
write nothing; both tell autograd about their in-place writes; the wrappers trace under torch.compile."""
import pytest
import torch

import surgery.ops as ops
from surgery.ops import reference

HP = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
PATHS = ["extension", "reference"]


def op(path, name):
    if path == "extension" and ops.backend("cpu", name) != "extension":
        pytest.skip("surgery._C is not built")
    return getattr(ops if path == "extension" else reference, name)


def adamw_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in [(4, 6), (9,)]]
    return dict(params=params, grads=[torch.randn(p.shape, generator=g) for p in params],
                exp_avgs=[torch.rand(p.shape, generator=g) for p in params],
                exp_avg_sqs=[torch.rand(p.shape, generator=g) for p in params],
                masks=[torch.rand(p.shape, generator=g) < 0.5 for p in params])


def sparse(a):
    idx = [torch.nonzero(m.flatten()).flatten().int() for m in a.pop("masks")]
    a["exp_avgs"], a["exp_avg_sqs"] = [m.flatten()[i.long()] for m, i in zip(a["exp_avgs"], idx)], \
        [v.flatten()[i.long()] for v, i in zip(a["exp_avg_sqs"], idx)]
    return dict(a, indices=idx)


def bad_adamw_calls():
    """(name, change to the arguments, exception, message): each call is wrong in one way."""
    def set_(key, i, fn):
        return lambda a: a[key].__setitem__(i, fn(a[key][i]))
    return [
        ("strided param", set_("params", 0, lambda p: p.t().contiguous().t()), RuntimeError,
         r"params\[0\] must be contiguous"),
        ("strided exp_avg_sq", set_("exp_avg_sqs", 0, lambda v: v.t().contiguous().t()), RuntimeError,
         r"exp_avg_sqs\[0\] must be contiguous"),
        ("fp64 param", lambda a: [a[k].__setitem__(1, a[k][1].double()) for k in ("params", "grads")], RuntimeError,
         r"params\[1\] must be fp32, bf16 or fp16, got Double"),
        ("uint8 mask", set_("masks", 0, lambda m: m.to(torch.uint8)), RuntimeError, r"masks\[0\] must be bool"),
        ("broadcastable mask", set_("masks", 0, lambda m: m[:1]), RuntimeError, r"masks\[0\] must be bool of shape"),
        ("short list", lambda a: a["masks"].pop(), RuntimeError, "lists differ in length"),
        ("grad of another shape", set_("grads", 1, lambda g: g[:-1]), RuntimeError, r"grads\[1\] must match"),
        ("exp_avg_sq is exp_avg", lambda a: a["exp_avg_sqs"].__setitem__(1, a["exp_avgs"][1]), RuntimeError,
         "shares memory"),
        ("exp_avg is the param", lambda a: a["exp_avgs"].__setitem__(0, a["params"][0]), RuntimeError,
         "shares memory"),
        ("grad overlaps a moment", lambda a: a["grads"].__setitem__(1, a["exp_avgs"][0].view(-1)[:9]), RuntimeError,
         "shares memory"),
        ("a param twice", lambda a: [a[k].__setitem__(1, a[k][0]) for k in a], RuntimeError, "shares memory"),
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", bad_adamw_calls(), ids=lambda c: c[0])
def test_bad_adamw_calls_raise_alike_and_write_nothing(path, case):
    _, change, exc, match = case
    a = adamw_args()
    change(a)
    before = [t.clone() for k in ("params", "exp_avgs", "exp_avg_sqs") for t in a[k]]
    with pytest.raises(exc, match=match):
        op(path, "masked_adamw_")(*a.values(), **HP)
    assert all(torch.equal(x, y) for x, y in zip(before, [t for k in ("params", "exp_avgs", "exp_avg_sqs")
                                                            for t in a[k]]))


@pytest.mark.parametrize("path", PATHS)
def test_bad_sparse_calls_and_arguments_raise_alike(path):
    a = sparse(adamw_args())
    with pytest.raises(RuntimeError, match=r"indices\[0\] must be int32"):
        op(path, "sparse_adamw_")(*dict(a, indices=[a["indices"][0].long(), a["indices"][1]]).values(), **HP)
    with pytest.raises(RuntimeError, match="shares memory"):
        op(path, "sparse_adamw_")(*dict(a, exp_avg_sqs=a["exp_avgs"]).values(), **HP)
    with pytest.raises(TypeError, match="step must be an int"):
        op(path, "sparse_adamw_")(*a.values(), **dict(HP, step=2.0))
    with pytest.raises(RuntimeError, match="step must be >= 1"):  # checked with empty lists too
        op(path, "sparse_adamw_")([], [], [], [], [], **dict(HP, step=0))
    with pytest.raises(RuntimeError, match="lists differ in length"):
        op(path, "sparse_adamw_")([], a["grads"], [], [], [], **HP)


def test_the_wrappers_take_any_sequence_but_not_a_tensor():
    a, b = adamw_args(1), adamw_args(1)
    ops.masked_adamw_(*(iter(x) for x in a.values()), **HP)  # generators
    reference.masked_adamw_(*b.values(), **HP)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    with pytest.raises(TypeError, match="params must be a list of tensors, got Tensor"):
        ops.masked_adamw_(*[x[0] for x in a.values()], **HP)


@pytest.mark.parametrize("path", PATHS)
def test_bad_prune_calls_raise_alike_and_write_nothing(path):
    prune = op(path, "prune_neurons_")
    g = torch.Generator().manual_seed(3)
    w, b, fo = torch.randn(8, 5, generator=g), torch.randn(8, generator=g), torch.randn(5, 8, generator=g)
    n = torch.tensor([1, 6])
    for args, match in (((w[:7], b, fo, n), r"fc_in\[0\] must be a contiguous \[8, D\] matrix"),
                        ((w, b[:7], fo, n), r"fc_in_bias\[0\] must be a contiguous \[8\] Float vector"),
                        ((w, b.double(), fo, n), r"fc_in_bias\[0\] must be a contiguous \[8\] Float vector"),
                        ((w, b, fo.t(), n), r"fc_out must be a contiguous \[D, H\] matrix, got \[8, 5\] \(not contig"),
                        ((w.t().contiguous().t(), b, fo, n),
                         r"fc_in\[0\] must be a contiguous \[8, D\] matrix, got \[8, 5\] \(not contiguous\)$"),
                        ((w, b, fo, n[None]), "neurons must be a contiguous int64 \\[n\\]"),
                        (([w, w.clone(), w.clone()], [b, b.clone()], fo, n), "2 biases for 3 input projections"),
                        ((w, b, fo, torch.tensor([8])), r"out of range \[0, 8\)")):
        before = [t.clone() for t in (w, b, fo)]
        with pytest.raises(RuntimeError, match=match):
            prune(*args)
        assert all(torch.equal(x, y) for x, y in zip(before, (w, b, fo)))


@pytest.mark.parametrize("path", PATHS)
def test_autograd_is_told_of_the_in_place_writes(path):
    """A backward that saved a tensor the op then wrote raises, as after any in-place torch op (before, the extension
    wrote silently and the backward used the new values); an inference tensor is refused outside inference mode."""
    w = torch.randn(8, 5, requires_grad=True)
    y = w * 1
    loss = (y * y).sum()
    op(path, "prune_neurons_")(y, None, torch.randn(5, 8), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    a = adamw_args(2)
    p = a["params"][0].requires_grad_()
    loss = (p * p).sum()
    with torch.no_grad():
        op(path, "masked_adamw_")(*a.values(), **HP)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():
        q = torch.zeros(3)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        op(path, "masked_adamw_")([q], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)],
                                  [torch.ones(3, dtype=torch.bool)], **HP)
    assert torch.equal(q, torch.zeros(3))


def test_wrappers_compile_without_graph_breaks():
    if ops.backend("cpu") != "extension":
        pytest.skip("surgery._C is not built")
    a, b = adamw_args(4), adamw_args(4)
    w, fo = torch.randn(8, 5), torch.randn(5, 8)
    w2, fo2 = w.clone(), fo.clone()

    def step(a, w, fo):
        ops.masked_adamw_(*a.values(), **HP)
        ops.sparse_adamw_(*sparse(dict(a)).values(), **HP)  # on copies of the moments: exercises the call only
        ops.prune_neurons_(w, None, fo, torch.tensor([2, 7]))

    torch.compile(step, fullgraph=True, backend="eager")(a, w, fo)
    step(b, w2, fo2)
    assert all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert torch.equal(w, w2) and torch.equal(fo, fo2)


@pytest.mark.parametrize("path", PATHS)
def test_entries_that_are_not_tensors_raise_alike(path):
    """[None] as "a mask of every entry" (as MaskedAdamW takes it) reached the dispatcher's message, or an
    AttributeError; a bare bias for a gated MLP was taken by the twin as the bias of both projections."""
    a = adamw_args()
    for key in ("masks", "grads", "params"):
        with pytest.raises(TypeError, match="masked_adamw_: entry 1 holds something that is not a tensor"):
            op(path, "masked_adamw_")(*dict(a, **{key: [a[key][0], None]}).values(), **HP)
    with pytest.raises(TypeError, match="step must be an int, got bool"):
        op(path, "masked_adamw_")(*a.values(), **dict(HP, step=True))
    prune = op(path, "prune_neurons_")
    gate, up, b, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6), torch.randn(4, 6)
    before = [t.clone() for t in (gate, up, b, down)]
    with pytest.raises(RuntimeError, match="1 biases for 2 input projections"):
        prune([gate, up], b, down, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match=r"fc_in\[0\] must be a contiguous \[6, D\] matrix, got NoneType"):
        prune([None], None, down, torch.tensor([0]))
    with pytest.raises(TypeError, match="fc_out must be a tensor, got NoneType"):
        prune(gate, None, None, torch.tensor([0]))
    assert all(torch.equal(x, y) for x, y in zip(before, (gate, up, b, down)))
