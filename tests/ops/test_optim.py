import pytest
import torch

from surgery.optim import MaskedAdamW


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_parity_with_adamw_and_state_dict_round_trip(device, compact, wd):
    g = torch.Generator().manual_seed(11)
    shapes = [(23, 9), (5,), (2, 3, 31)]
    params = [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=wd, compact=compact)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=wd, foreach=False)
    for step in range(7):
        if step == 3:  # round trip mid-run
            state = opt.state_dict()
            opt = MaskedAdamW(params, lr=1e-2, weight_decay=wd, compact=compact)
            opt.load_state_dict(state)
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            r.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_compact_state_bytes_scale_with_mask():
    p = torch.nn.Parameter(torch.randn(1000, 100))
    mask = torch.zeros(1000, 100, dtype=torch.bool)
    mask[:10] = True                                 # 1% density
    opt = MaskedAdamW([p], masks=[mask])
    assert "indices" in opt.state[p] and opt.state_bytes() == 12 * 1000 + 8 * 2   # and the param's shape, int64
    assert MaskedAdamW([p], masks=[mask], compact=False).state_bytes() == 9 * 100_000


def test_masked_entries_untouched_by_decay():
    p = torch.nn.Parameter(torch.randn(50, 7))
    mask = torch.rand(50, 7) < 0.5
    before = p.detach().clone()
    opt = MaskedAdamW([p], masks=[mask], lr=0.1, weight_decay=0.5)
    for _ in range(10):
        p.grad = torch.randn(50, 7)
        opt.step()
    assert torch.equal(p[~mask], before[~mask]) and not torch.equal(p[mask], before[mask])
    with pytest.raises(ValueError, match="mask of shape"):
        MaskedAdamW([p], masks=[mask.t()])


def test_strided_param_matches_adamw_and_failed_step_does_not_count(device):
    """A transposed param is stepped through a contiguous copy; a step that raises leaves the step count as it was."""
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(9, 14, generator=g).to(device).t())
    ref = torch.nn.Parameter(p.detach().clone())
    mask = torch.rand(14, 9, generator=g).to(device) < 0.4
    for compact in (False, True):
        opt = MaskedAdamW([p], masks=[mask], lr=1e-2, compact=compact)
        torch_opt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
        for _ in range(3):
            p.grad = torch.randn(14, 9, generator=g).to(device)
            ref.grad = p.grad.clone()
            opt.step()
            before = ref.detach().clone()
            torch_opt.step()
            with torch.no_grad():
                ref.copy_(torch.where(mask, ref, before))
        assert not p.is_contiguous() and int(opt.state[p]["step"]) == 3
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"][:-1]  # a bad state: the op refuses the call
    with pytest.raises(RuntimeError, match="exp_avgs"):
        opt.step()
    assert int(opt.state[p]["step"]) == 3


def test_param_groups_match_adamw_with_masks_and_round_trip(device):
    """Groups with their own lr, betas, weight decay and state kind; masks given across groups, in a group, and in
    a group added later; a state_dict round trip mid-run. Against torch.optim.AdamW on the same groups, with the
    masked-out entries put back after each of its steps."""
    g = torch.Generator().manual_seed(23)
    shapes = [(6, 11), (13,), (4, 3, 5), (17, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    masks = [None, torch.rand(13, generator=g).to(device) < 0.3, torch.rand(4, 3, 5, generator=g).to(device) < 0.6,
             torch.rand(17, 2, generator=g).to(device) < 0.5]
    hp = [dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.1), dict(lr=5e-3, eps=1e-6)]

    def make():
        opt = MaskedAdamW([dict(params=params[:2], compact=True, **hp[0]), dict(params=params[2:3], **hp[1])],
                          masks=masks[:3], weight_decay=0.03)
        opt.add_param_group(dict(params=params[3], masks=[masks[3]], lr=1e-2, compact=False))
        return opt

    opt = make()
    torch_opt = torch.optim.AdamW([dict(params=ref[:2], **hp[0]), dict(params=ref[2:3], **hp[1])], weight_decay=0.03,
                                  foreach=False)
    torch_opt.add_param_group(dict(params=ref[3], lr=1e-2))
    assert "indices" in opt.state[params[0]] and "indices" in opt.state[params[1]]
    assert "mask" in opt.state[params[3]]
    for step in range(6):
        if step == 3:
            state = opt.state_dict()
            opt = make()
            opt.load_state_dict(state)
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            r.grad = p.grad.clone()
        opt.step()
        before = [r.detach().clone() for r in ref]
        torch_opt.step()
        with torch.no_grad():
            for r, b, m in zip(ref, before, masks):
                if m is not None:
                    r.copy_(torch.where(m, r, b))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert [int(opt.state[p]["step"]) for p in params] == [6] * 4


def test_bad_arguments_raise_and_leave_the_optimizer_as_it_was():
    p, q = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    for bad, name in ((dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.999)), "betas\\[0\\]"),
                      (dict(betas=(0.9, -0.1)), "betas\\[1\\]"), (dict(eps=-1.0), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=f"invalid {name}"):
            MaskedAdamW([p], **bad)
    with pytest.raises(ValueError, match="both as an argument and in a param group"):
        MaskedAdamW([dict(params=[p], masks=[None])], masks=[None])
    with pytest.raises(ValueError, match="2 masks for 1 params"):
        MaskedAdamW([p], masks=[None, None])
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    with pytest.raises(TypeError, match="not a set"):
        MaskedAdamW({p})
    with pytest.raises(ValueError, match="invalid lr"):  # defaults are checked even where every group sets its own
        MaskedAdamW([dict(params=[p], lr=1e-3)], lr=-1.0)
    with pytest.raises(ValueError, match="invalid compact"):
        MaskedAdamW([p], compact="no")
    with pytest.raises(ValueError, match="maximize not supported"):
        MaskedAdamW([dict(params=[p], maximize=True)])
    with pytest.raises(ValueError, match="lists a param twice"):
        MaskedAdamW([p, p])
    for mask in (torch.tensor([[0, 2, 0, 0]] * 3), [[True] * 4] * 3):  # an index tensor is not cast into a mask
        with pytest.raises(TypeError, match="must be a bool tensor"):
            MaskedAdamW([p], masks=[mask])
    opt = MaskedAdamW([p])
    for group, match in ((dict(params=[q], masks=[None, None]), "2 masks for the 1 params"),
                         (dict(params=[q], masks=[torch.ones(4, dtype=torch.bool)]), "mask of shape"),
                         (dict(params=[q], lr=-1.0), "invalid lr"),
                         (dict(params=[p]), "more than one parameter group")):
        with pytest.raises(ValueError, match=match):
            opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and list(opt.state) == [p]  # a refused group adds nothing
    saved = opt.state_dict()
    adamw = torch.optim.AdamW([p])
    p.grad = torch.ones(3, 4)
    adamw.step()
    with pytest.raises(ValueError, match="not a MaskedAdamW state"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict()["state"].keys() == saved["state"].keys() and "mask" in opt.state[p]
    p.grad = torch.ones(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_closure_named_params_and_state_that_is_not_shared():
    """step(closure) runs the closure's backward; (name, param) pairs as torch takes them; a mask the caller edits
    later and a loaded state_dict are not shared with the optimizer."""
    g = torch.Generator().manual_seed(5)
    lin, ref = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(8, 6, generator=g)
    opt, torch_opt = MaskedAdamW(lin.named_parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    for model, o in ((lin, opt), (ref, torch_opt)):
        for _ in range(3):
            o.zero_grad()
            o.step(lambda: model(x).pow(2).sum().backward())
    torch.testing.assert_close(lin.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.bias, ref.bias, rtol=1e-5, atol=1e-6)

    mask = torch.zeros(8, dtype=torch.bool)
    mask[:4] = True
    results = []
    for compact in (False, True):
        w = torch.nn.Parameter(torch.zeros(8))
        o = MaskedAdamW([w], masks=[mask], lr=0.1, compact=compact)
        mask_before, mask[:] = mask.clone(), False  # the caller reuses its mask tensor
        w.grad = torch.ones(8)
        o.step()
        mask.copy_(mask_before)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1]) and int((results[0] != 0).sum()) == 4

    state = opt.state_dict()
    opt2 = MaskedAdamW(lin.parameters(), lr=1e-2)
    opt2.load_state_dict(state)
    opt2.zero_grad()
    lin(x).sum().backward()
    opt2.step()
    assert [int(st["step"]) for st in opt2.state.values()] == [4, 4]
    assert [int(st["step"]) for st in state["state"].values()] == [3, 3]  # the saved state did not move


@pytest.mark.parametrize("chunk", [1, 3000, 2**30])  # bytes: one param per chunk, a few, all at once
def test_offloaded_state_gives_the_same_update_bit_for_bit(device, chunk, monkeypatch):
    """offload=True: state in pinned host memory (CUDA params), streamed through the device in chunks: the same
    params and moments as offload=False after every step, across a state_dict round trip, dense and compact
    state, fp32 and bf16 params in one group."""
    import surgery.optim as optim
    monkeypatch.setattr(optim, "OFFLOAD_CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(3)
    shapes = [((40, 9), torch.float32, 0.9), ((17,), torch.float32, 0.1), ((6, 33), torch.bfloat16, 0.6),
              ((3, 5, 7), torch.float32, 0.05), ((64,), torch.bfloat16, 1.0)]
    params = [torch.randn(s, generator=g).to(device, dt).requires_grad_(True) for s, dt, _ in shapes]
    masks = [torch.rand(s, generator=g).to(device) < d for s, _, d in shapes]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    opts = [MaskedAdamW(ps, masks=masks, lr=1e-2, weight_decay=0.02, offload=off)
            for ps, off in ((params, True), (twins, False))]
    kinds = ["indices" in opts[0].state[p] for p in params]
    assert kinds == ["indices" in opts[1].state[t] for t in twins] and any(kinds) and not all(kinds)
    if device == "cuda":
        assert all(t.device.type == "cpu" and t.is_pinned() for st in opts[0].state.values()
                   for k, t in st.items() if k != "step")
    for step in range(6):
        if step == 2:  # round trip mid-run: the loaded state goes back to the host
            state = opts[0].state_dict()
            opts[0] = MaskedAdamW(params, masks=masks, lr=1e-2, weight_decay=0.02, offload=True)
            opts[0].load_state_dict(state)
            assert all(t.device.type == "cpu" for st in opts[0].state.values() for k, t in st.items())
        for p, t in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g).to(device, p.dtype)
            t.grad = p.grad.clone()
        for opt in opts:
            opt.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opts[0].state[p][k].to(device), opts[1].state[t][k])


def test_offloaded_step_that_raises_keeps_each_param_whole(device, monkeypatch):
    """offload, one param per chunk: a chunk the op refuses leaves its params, state and step counts as they were;
    the chunk before it has stepped and counts its step."""
    import surgery.optim as optim
    monkeypatch.setattr(optim, "OFFLOAD_CHUNK_BYTES", 1)
    params = [torch.nn.Parameter(torch.randn(6, 5).to(device)) for _ in range(3)]
    opt = MaskedAdamW(params, lr=1e-2, offload=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"][:-1]  # the op refuses the second chunk
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="exp_avgs"):
        opt.step()
    assert [int(opt.state[p]["step"]) for p in params] == [1, 0, 0]
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    assert not opt.state[params[2]]["exp_avg"].any()


def test_offloaded_state_is_one_block_per_param():
    """The offloaded state's layout (here unpinned): copies and zero moments as aligned views of one buffer."""
    from surgery.optim import _pinned
    mask = torch.rand(7, 3) < 0.5
    indices = torch.tensor([1, 4, 6], dtype=torch.int32)
    out = _pinned({"mask": mask, "indices": indices}, zeros={"exp_avg": 5, "exp_avg_sq": 5}, pin=False)
    assert torch.equal(out["mask"], mask) and torch.equal(out["indices"], indices)
    assert all(torch.equal(out[k], torch.zeros(5)) for k in ("exp_avg", "exp_avg_sq"))
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(storages) == 1 and all(t.data_ptr() % 16 == 0 for t in out.values())
    out["exp_avg"] += 1                                          # views that do not overlap
    assert torch.equal(out["exp_avg_sq"], torch.zeros(5)) and torch.equal(out["indices"], indices)
    assert out["mask"].data_ptr() != mask.data_ptr()             # a copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_state_leaves_the_device():
    """The device holds the params and grads, not the 9 bytes per entry of dense state."""
    p = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))
    mask = torch.ones_like(p, dtype=torch.bool)
    before = torch.cuda.memory_allocated()
    on_device = MaskedAdamW([p], masks=[mask])
    assert torch.cuda.memory_allocated() - before == 9 * p.numel()
    del on_device
    before = torch.cuda.memory_allocated()
    opt = MaskedAdamW([p], masks=[mask], offload=True)
    assert torch.cuda.memory_allocated() == before
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.cuda.memory_allocated() == before + 4 * p.numel()  # the grad
    torch.cuda.reset_peak_memory_stats()
    again = MaskedAdamW([p], masks=[mask], offload=True)
    again.load_state_dict(opt.state_dict())                       # straight to pinned host memory
    assert torch.cuda.max_memory_allocated() <= torch.cuda.memory_allocated() + p.numel()  # the mask's copy at most
    assert all(t.is_pinned() for k, t in again.state[p].items() if k != "step")


@pytest.mark.parametrize("compact", [False, True])
def test_load_state_dict_refuses_state_that_does_not_fit(compact):
    """State saved for params of other shapes is refused, naming the param, and nothing is loaded; before, compact
    indices of a (4, 4) param were applied to a (2, 8) one without a word."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 4), (2, 8)))
    masks = [torch.rand(4, 4, generator=g) < 0.5, torch.rand(2, 8, generator=g) < 0.5]
    opt = MaskedAdamW([a, b], masks=masks, lr=0.1, compact=compact)
    a.grad, b.grad = torch.randn(4, 4, generator=g), torch.randn(2, 8, generator=g)
    opt.step()
    x, y = torch.nn.Parameter(torch.randn(2, 8, generator=g)), torch.nn.Parameter(torch.randn(4, 4, generator=g))
    other = MaskedAdamW([x, y], lr=0.1, compact=compact)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"param 0 \(shape \[2, 8\]\)"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    assert all(torch.equal(after["state"][i][k], t) for i, st in before["state"].items() for k, t in st.items())
    broken = opt.state_dict()
    broken["state"][1] = dict(broken["state"][1], exp_avg=broken["state"][1]["exp_avg"][:-1])
    with pytest.raises(ValueError, match="param 1 .* saved exp_avg"):
        MaskedAdamW([a, b], masks=masks, lr=0.1, compact=compact).load_state_dict(broken)
    with pytest.raises(ValueError, match="2 param groups saved, 1 here"):
        MaskedAdamW([a]).load_state_dict({"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]})


def test_load_state_dict_without_a_params_state_starts_it_afresh_and_runs_the_hooks():
    """A param with no saved state starts at step 0 under this optimizer's mask (before: KeyError 'step' in step);
    a pre-hook's returned state_dict is what loads, and a post-hook sees the loaded state."""
    g = torch.Generator().manual_seed(4)
    p, q = torch.nn.Parameter(torch.randn(6, generator=g)), torch.nn.Parameter(torch.randn(6, generator=g))
    keep = torch.tensor([True, False] * 3)
    opt = MaskedAdamW([p, q], masks=[None, keep], lr=0.1, compact=True)
    p.grad, q.grad = torch.randn(6, generator=g), torch.randn(6, generator=g)
    opt.step()
    saved = opt.state_dict()
    fresh = MaskedAdamW([p, q], masks=[None, keep], lr=0.1, compact=True)
    seen = []
    fresh.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "state": {0: sd["state"][0]}})
    fresh.register_load_state_dict_post_hook(lambda o: seen.append({k: int(o.state[t]["step"]) for k, t in
                                                                    (("p", p), ("q", q))}))
    fresh.load_state_dict(saved)
    assert seen == [{"p": 1, "q": 0}]
    assert torch.equal(fresh.state[q]["indices"], torch.tensor([0, 2, 4], dtype=torch.int32))
    assert not fresh.state[q]["exp_avg"].any()
    before = q.detach().clone()
    fresh.step()                                          # q: its first step, masked-out entries untouched
    assert torch.equal(q[~keep], before[~keep]) and not torch.equal(q[keep], before[keep])
    assert int(fresh.state[q]["step"]) == 1 and int(fresh.state[p]["step"]) == 2


def test_masks_as_one_tensor_and_hyperparameters_that_are_not_numbers_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="one bool tensor .* per param, got a tensor"):
        MaskedAdamW([p], masks=torch.ones(3, 4, dtype=torch.bool))
    for bad in (dict(lr="0.1"), dict(eps=None), dict(weight_decay=True)):
        with pytest.raises(ValueError, match=f"invalid {next(iter(bad))}"):
            MaskedAdamW([p], **bad)


def test_pinned_layout_of_dense_state_and_a_loaded_strided_moment():
    """Dense offloaded state asks _pinned for zeros of the param's shape (a torch.Size, not a length: it raised); a
    saved moment with strides loads contiguous (the ops take contiguous tensors)."""
    from surgery.optim import _pinned
    block = _pinned({"mask": torch.ones(3, 4, dtype=torch.bool)}, zeros={"exp_avg": torch.Size([3, 4]), "v": 5},
                    pin=False)
    assert block["exp_avg"].shape == (3, 4) and block["v"].shape == (5,) and not block["exp_avg"].any()
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = MaskedAdamW([p], compact=False)
    p.grad = torch.randn(4, 3)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].t().contiguous().t()
    other = MaskedAdamW([p], compact=False)
    other.load_state_dict(saved)
    assert other.state[p]["exp_avg"].is_contiguous()
    other.step()


def test_a_copy_or_a_pickle_steps_as_the_original():
    """torch's Optimizer.__getstate__ keeps defaults, state and groups: `offload` was lost, and the copy raised."""
    import copy
    import pickle
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(6, generator=g))
    opt = MaskedAdamW([p], masks=[torch.tensor([True, False, True, True, False, True])], lr=0.1)
    p.grad = torch.randn(6, generator=g)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = clone.param_groups[0]["params"][0]
        assert q is not p and torch.equal(q, p) and clone.offload is False
        q.grad = p.grad.clone()
        clone.step()
        twin = MaskedAdamW([r := torch.nn.Parameter(p.detach().clone())], lr=0.1)
        twin.load_state_dict(opt.state_dict())
        r.grad = p.grad.clone()
        twin.step()
        assert torch.equal(q, r) and q[1] == p[1] and int(clone.state[q]["step"]) == 2


def test_one_bad_grad_stops_the_step_before_any_param_moves():
    """A bad grad on a later param used to fail inside a later op call, after earlier params had stepped, and named
    its place in that call (grads[1]) instead of the optimizer's."""
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    m = torch.zeros(8, dtype=torch.bool)
    m[0] = True
    opt = MaskedAdamW([{"params": ps[:1]}, {"params": ps[1:]}], masks=[m, None, None], lr=0.1)
    for p in ps:
        p.grad = torch.ones(8)
    ps[2].grad_dtype = None                             # torch then lets a grad of another dtype be assigned
    ps[2].grad = torch.ones(8, dtype=torch.float16)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=r"MaskedAdamW.step: param 2 \(group 1, shape \[8\], torch.float32\): its "
                                           r"grad is \[8\] torch.float16"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and all(int(st["step"]) == 0 for st in opt.state.values())
    opt.param_groups[1]["lr"] = "fast"
    with pytest.raises(ValueError, match="param group 1: invalid lr: 'fast'"):
        opt.step()


def test_state_replaced_by_hand_is_named_and_reset_state_keeps_the_masks():
    p = torch.nn.Parameter(torch.randn(4))
    mask = torch.tensor([True, False, True, True])
    opt = MaskedAdamW([p], masks=[mask], lr=0.1)
    p.grad = torch.randn(4)
    opt.step()
    opt.state[p] = {}                        # as one resets torch's AdamW
    with pytest.raises(RuntimeError, match="param 0 .*no optimizer state .*new MaskedAdamW with the masks"):
        opt.step()
    with pytest.raises(ValueError, match="param 0 has no state to take its mask from"):
        opt.reset_state()
    opt.state[p] = {"step": torch.tensor(5), "mask": mask.clone(), "exp_avg": torch.ones(4),
                    "exp_avg_sq": torch.ones(4)}
    opt.reset_state()
    st = opt.state[p]
    assert int(st["step"]) == 0 and torch.equal(st["mask"], mask) and not st["exp_avg"].any()
    before = p.detach().clone()
    opt.step()
    assert p[1] == before[1] and not torch.equal(p, before)


def test_load_state_dict_refuses_what_the_constructor_refuses():
    q = torch.nn.Parameter(torch.randn(4))
    saved = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4))], maximize=True, amsgrad=True).state_dict()
    opt = MaskedAdamW([q])
    with pytest.raises(ValueError, match="param group 0 was saved with amsgrad, maximize"):
        opt.load_state_dict(saved)
    assert "maximize" not in opt.param_groups[0]
    p = torch.nn.Parameter(torch.randn(3))
    state = MaskedAdamW([p]).state_dict()
    for step in (float("inf"), torch.tensor(float("inf"))):
        state["state"] = {0: {"step": step, "mask": torch.ones(3, dtype=torch.bool), "exp_avg": torch.zeros(3),
                              "exp_avg_sq": torch.zeros(3)}}
        with pytest.raises(ValueError, match="saved step .* is not a whole number >= 0"):
            MaskedAdamW([torch.nn.Parameter(torch.randn(3))]).load_state_dict(state)


def test_hyperparameters_as_torch_takes_them_and_nothing_else():
    import numpy as np
    p = torch.nn.Parameter(torch.zeros(3))
    MaskedAdamW([p], lr=np.float32(1e-3), betas=(np.float64(0.9), 0.99))        # numpy numbers, as AdamW takes
    for bad, match in ((dict(compact=1), "invalid compact: 1"), (dict(betas=0.9), "invalid betas: 0.9"),
                       (dict(betas=(0.9, 0.99, 0.5)), "invalid betas"), (dict(betas=(0.9, "x")), "invalid betas")):
        with pytest.raises(ValueError, match=match):
            MaskedAdamW([p], **bad)
