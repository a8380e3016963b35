import pytest
import torch

import surgery.ops as ops
from surgery.ops import reference

SHAPES = [(1,), (7, 33), (129, 5), (3, 4, 17), (3, 4111)]  # the last: several 4096-entry runs per CPU thread
HP = dict(lr=3e-3, beta1=0.9, beta2=0.995, eps=1e-8)


def fresh(device, dtype, seed, density):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, dtype) for s in SHAPES]
    masks = [(torch.rand(s, generator=g) < density).to(device) for s in SHAPES]
    grads = [[torch.randn(s, generator=g).to(device, dtype) for s in SHAPES] for _ in range(7)]
    return params, masks, grads


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_all_true_mask_matches_torch_adamw(device, wd):
    params, _, grads = fresh(device, torch.float32, 1, 1.0)
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(ref, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=wd,
                            foreach=False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    for step, gs in enumerate(grads, 1):
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        opt.step()
        ops.masked_adamw_(params, gs, m, v, masks, step=step, weight_decay=wd, **HP)
    for p, r, mi, vi in zip(params, ref, m, v):
        st = opt.state[r]
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mi, st["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(vi, st["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_default_betas_match_torch_adamw_closely(device):
    """β2 = 0.999: every factor (1 − β2, 1 − lr·wd, lr / (1 − β1^t)) must be formed in double and rounded once, as
    torch does; forming 1 − β2 from a float β2 puts every exp_avg_sq off by 1.3e-5 relative."""
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(4099, generator=g).to(device)]
    ref = [params[0].clone().requires_grad_(True)]
    opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01, foreach=False)
    m, v = [torch.zeros_like(params[0])], [torch.zeros_like(params[0])]
    for step in range(1, 6):
        grad = torch.randn(4099, generator=g).to(device)
        ref[0].grad = grad.clone()
        opt.step()
        ops.masked_adamw_(params, [grad], m, v, [torch.ones(4099, dtype=torch.bool, device=device)], step=step,
                          lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    st = opt.state[ref[0]]
    torch.testing.assert_close(v[0], st["exp_avg_sq"], rtol=1e-6, atol=0)
    torch.testing.assert_close(m[0], st["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(params[0], ref[0].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.3, 0.55), (0.5, 0.9)])
def test_small_beta1_matches_torch_adamw(device, betas):
    """m = lerp(m, g, 1 − β1) as ATen computes it, from the nearer end when 1 − β1 ≥ 0.5: at β1 = 0 the moment is
    exactly g. m + (1 − β1)(g − m) instead loses m's low bits against a much larger g (1e-3 relative here)."""
    g = torch.Generator().manual_seed(9)
    n = 517
    scales = torch.logspace(-4, 3, n).to(device)
    p = torch.randn(n, generator=g).to(device)
    twin = p.clone()
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=0.05, betas=betas, eps=1e-6, weight_decay=0.1, foreach=False)
    m, v, rm, rv = (torch.zeros(n, device=device) for _ in range(4))
    hp = dict(lr=0.05, beta1=betas[0], beta2=betas[1], eps=1e-6, weight_decay=0.1)
    keep = [torch.ones(n, dtype=torch.bool, device=device)]
    for step in range(1, 6):
        grad = torch.randn(n, generator=g).to(device) * scales.flip(0) if step % 2 else \
            torch.randn(n, generator=g).to(device) * scales
        ref.grad = grad.clone()
        opt.step()
        ops.masked_adamw_([p], [grad], [m], [v], keep, step=step, **hp)
        reference.masked_adamw_([twin], [grad], [rm], [rv], keep, step=step, **hp)
        gmax = grad.abs() if step == 1 else torch.maximum(gmax, grad.abs())
    st = opt.state[ref]
    if betas[0] == 0.0:  # lerp with weight 1 is exactly its end point
        assert torch.equal(m, grad) and torch.equal(rm, grad) and torch.equal(st["exp_avg"], grad)
    for got in (m, rm):  # to fp32 rounding of the terms (ATen's CPU lerp fuses a multiply-add, ours does not)
        assert ((got - st["exp_avg"]).abs() <= 2e-6 * st["exp_avg"].abs() + 1e-7 * gmax).all()
    for got in (v, rv):
        torch.testing.assert_close(got, st["exp_avg_sq"], rtol=2e-6, atol=0)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)


def test_backend_of_a_device_without_kernels():
    assert ops.backend("meta") == "reference" and ops.backend("cpu", "prune_neurons_") == ops.backend("cpu")


def test_empty_lists_are_a_no_op(device):
    ops.masked_adamw_([], [], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    ops.sparse_adamw_([], [], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_out_entries_bit_identical_and_matches_reference(device, dtype):
    params, masks, grads = fresh(device, dtype, 2, 0.3)
    before = [p.clone() for p in params]
    twin = [p.clone() for p in params]
    torch.manual_seed(20)
    m, v = ([torch.rand(p.shape).to(device) for p in params] for _ in range(2))
    rm, rv = [x.clone() for x in m], [x.clone() for x in v]
    m0, v0 = [x.clone() for x in m], [x.clone() for x in v]
    for step, gs in enumerate(grads * 3, 1):
        ops.masked_adamw_(params, gs, m, v, masks, step=step, weight_decay=0.1, **HP)
        reference.masked_adamw_(twin, gs, rm, rv, masks, step=step, weight_decay=0.1, **HP)
    for p, b, t, k, mi, vi, mi0, vi0 in zip(params, before, twin, masks, m, v, m0, v0):
        assert torch.equal(p[~k], b[~k]) and torch.equal(mi[~k], mi0[~k]) and torch.equal(vi[~k], vi0[~k])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(p.float(), t.float(), rtol=tol, atol=tol)
        if dtype == torch.float32:  # in bf16 a few small steps can round back to the start
            assert not torch.equal(p[k], b[k]) or k.sum() == 0


def test_compact_equals_dense_on_masked_entries(device):
    params, masks, grads = fresh(device, torch.float32, 3, 0.1)
    dense = [p.clone() for p in params]
    idx = [torch.nonzero(k.reshape(-1)).flatten().int() for k in masks]
    m = [torch.zeros(i.numel(), device=device) for i in idx]
    v = [torch.zeros(i.numel(), device=device) for i in idx]
    dm = [torch.zeros_like(p) for p in params]
    dv = [torch.zeros_like(p) for p in params]
    for step, gs in enumerate(grads, 1):
        ops.sparse_adamw_(params, gs, m, v, idx, step=step, weight_decay=0.01, **HP)
        ops.masked_adamw_(dense, gs, dm, dv, masks, step=step, weight_decay=0.01, **HP)
    for p, d, mi, dmi, i in zip(params, dense, m, dm, idx):
        assert torch.equal(p, d)
        assert torch.equal(mi, dmi.reshape(-1)[i.long()])


def test_opcheck(device):
    params, masks, grads = fresh(device, torch.float32, 4, 0.5)
    state = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    torch.library.opcheck(torch.ops.surgery.masked_adamw_.default,
                          (params, grads[0], *state, masks, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0))
    idx = [torch.nonzero(k.reshape(-1)).flatten().int() for k in masks]
    sstate = [torch.zeros(i.numel(), device=device) for i in idx], [torch.zeros(i.numel(), device=device) for i in idx]
    torch.library.opcheck(torch.ops.surgery.sparse_adamw_.default,
                          (params, grads[0], *sstate, idx, 1, 1e-3, 0.9, 0.999, 1e-8, 0.01))


def test_bad_calls_raise(device):
    params, masks, grads = fresh(device, torch.float32, 5, 0.5)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    call = lambda *a, **k: ops.masked_adamw_(*a, **{**dict(step=1, weight_decay=0.0, **HP), **k})  # noqa: E731
    with pytest.raises(RuntimeError, match="lists differ in length"):
        call(params, grads[0][:-1], m, v, masks)
    with pytest.raises(RuntimeError, match="grads\\[1\\] must match"):
        call(params, [grads[0][0], grads[0][1].t().contiguous(), *grads[0][2:]], m, v, masks)
    with pytest.raises(RuntimeError, match="must be bool"):
        call(params, grads[0], m, v, [k.float() for k in masks])
    with pytest.raises(RuntimeError, match="must be fp32"):
        call(params, grads[0], [x.double() for x in m], v, masks)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        call(params, grads[0], m, v, masks, step=0)
    for betas in ((1.0, 0.999), (0.9, 1.0), (-0.1, 0.999)):  # 1 - beta**step divides: beta = 1 gives inf or nan
        with pytest.raises(RuntimeError, match="beta1 and beta2 must lie in \\[0, 1\\)"):
            call(params, grads[0], m, v, masks, beta1=betas[0], beta2=betas[1])
        with pytest.raises(RuntimeError, match="beta1 and beta2 must lie in \\[0, 1\\)"):
            ops.reference.masked_adamw_(params, grads[0], m, v, masks, step=1, lr=1e-3, beta1=betas[0],
                                        beta2=betas[1], eps=1e-8, weight_decay=0.0)
    # separate moment lists: one list for both would alias them, an error that CUDA's op reports first
    zm, zv = ([torch.zeros(2 if i == 2 else 1, device=device) for i in range(len(params))] for _ in range(2))
    before = [p.clone() for p in params]
    # out of range above and below; a duplicate (two updates of one entry would race); descending order
    for bad in ([0, params[2].numel()], [-1, 3], [5, 5], [5, 4]):
        idx = [torch.tensor([0], dtype=torch.int32, device=device) for _ in params]
        idx[2] = torch.tensor(bad, dtype=torch.int32, device=device)
        with pytest.raises(RuntimeError, match="indices\\[2\\] must be strictly increasing and in range"):
            ops.sparse_adamw_(params, grads[0], zm, zv, idx, step=1, weight_decay=0.0, **HP)
        with pytest.raises(RuntimeError, match="indices\\[2\\] must be strictly increasing and in range"):
            ops.reference.sparse_adamw_(params, grads[0], zm, zv, idx, step=1, weight_decay=0.0, **HP)
        assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_multi_tensor_launch_matches_cpu():
    """More tensors than one launch holds, sizes around the vector width and the block chunk, misaligned views
    (the scalar path), three dtypes in one call: the CUDA kernels against the CPU kernels."""
    g = torch.Generator().manual_seed(6)
    sizes = [1, 3, 4, 5, 8, 9, 4095, 4096, 4097, 8193, 20001] + torch.randint(1, 3000, (30,), generator=g).tolist()
    dtypes = [(torch.float32, torch.bfloat16, torch.float16)[i % 3] for i in range(len(sizes))]
    full = [[], [], [], [], []]  # params, grads, exp_avgs, exp_avg_sqs, masks, each with `off` extra entries
    offs = [1 if i % 4 == 3 else 0 for i in range(len(sizes))]  # a view 1 entry in: not 16-byte aligned
    for n, dt, off in zip(sizes, dtypes, offs):
        for lst, t in zip(full, (torch.randn(n + off, generator=g).to(dt), torch.randn(n + off, generator=g).to(dt),
                                 torch.randn(n + off, generator=g) * 0.1, torch.rand(n + off, generator=g) * 0.1,
                                 torch.rand(n + off, generator=g) < 0.4)):
            lst.append(t)
    params, grads, m, v, masks = ([t[off:] for t, off in zip(ts, offs)] for ts in full)
    cpu = [[t.clone() for t in ts] for ts in (params, grads, m, v, masks)]
    gpu = [[t.cuda()[off:] for t, off in zip(ts, offs)] for ts in full]
    for step in (1, 2, 3):
        ops.masked_adamw_(*cpu, step=step, weight_decay=0.1, **HP)
        ops.masked_adamw_(*gpu, step=step, weight_decay=0.1, **HP)
    for c_list, g_list, before in zip(cpu[:4:2] + cpu[3:4], gpu[:4:2] + gpu[3:4], (params, m, v)):
        for c, gp, b, k in zip(c_list, g_list, before, masks):
            gp = gp.cpu()
            assert torch.equal(gp[~k], b[~k])  # masked-out entries untouched
            tol = 1e-5 if c.dtype == torch.float32 else 1e-2  # FMA contraction on the GPU; 1 ulp in 16-bit
            torch.testing.assert_close(gp, c, rtol=tol, atol=tol)
    idx = [torch.nonzero(k).flatten().int().cuda() for k in masks]
    sp = [p.cuda() for p in params]
    sm, sv = ([x.cuda()[k.cuda()] for x, k in zip(xs, masks)] for xs in (m, v))
    for step in (1, 2, 3):
        ops.sparse_adamw_(sp, gpu[1], sm, sv, idx, step=step, weight_decay=0.1, **HP)
    for s, d, mi, dmi, k in zip(sp, gpu[0], sm, gpu[2], masks):
        assert torch.equal(s, d) and torch.equal(mi, dmi[k.cuda()])
