"""Every method runs at the scope it was not written for: one step at `vision` (encoder + projector), where the text
splits have no gradient path, changes only vision weights and keeps them finite."""
import pytest
import torch

from handwritten import perturb_, run_loop, setup
from surgery.methods import METHODS, get


@pytest.mark.parametrize("method", METHODS)
def test_one_step_at_vision_scope(tiny_dirs, data, method):
    adapter, splits, params = setup(tiny_dirs, data, "vision")
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    perturb_(params, seed=1, scale=0.01)            # the KL terms are not flat at the start
    hist, _ = run_loop(adapter, splits, params, data, method, vanilla=snapshot, scope="vision", steps=1,
                         batch_size=2, lr=1e-2)
    assert len(hist) == (1 if get(method).trains else 0)
    assert all(torch.isfinite(torch.tensor(v)) for h in hist for v in h.values())
    for n, p in adapter.model.named_parameters():
        if n not in params:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, snapshot[n]) for n, p in params.items())
