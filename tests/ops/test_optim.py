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
