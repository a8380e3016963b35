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
    assert "indices" in opt.state[p] and opt.state_bytes() == 12 * 1000
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
