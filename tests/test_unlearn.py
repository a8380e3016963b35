"""The unlearning loop against a step written out by hand with torch.optim.AdamW."""
import copy

import torch

from surgery.data import load_splits
from surgery.models import answer_loss, load
from surgery.prune import prune, pruned_entries
from surgery.saliency import examples
from surgery.unlearn import projector_features, unlearn


def setup(tiny_dirs, data):
    adapter = load(str(tiny_dirs["tiny-llava"]))
    splits = load_splits(*data)
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    return adapter, splits, params


def full_loss(adapter, rows):
    batch = adapter.encode(examples(rows))
    return answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()


def test_one_step_matches_hand_written_update(tiny_dirs, data):
    adapter, splits, params = setup(tiny_dirs, data)
    names = list(params)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}
    none_pruned = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    teacher = projector_features(adapter, splits.rvqa)
    alpha, lr, clip = 1.25, 1e-3, 0.05

    ref = copy.deepcopy(adapter)
    ref_params = dict(zip(names, [dict(ref.model.named_parameters())[n] for n in names]))
    g_f = torch.autograd.grad(full_loss(ref, splits.fvqa), [ref_params[n] for n in names])
    g_r = torch.autograd.grad(full_loss(ref, splits.rvqa), [ref_params[n] for n in names])
    grads = [-alpha * mask[n] * gf + gr for n, gf, gr in zip(names, g_f, g_r)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    opt = torch.optim.AdamW([ref_params[n] for n in names], lr=lr, weight_decay=0.0, foreach=False)
    for n, x in zip(names, grads):
        ref_params[n].grad = x * min(1.0, clip / (norm.item() + 1e-6))
    opt.step()

    # batches cover each split whole, so batch order cannot matter; beta=0 isolates the two CE terms
    hist = unlearn(adapter, splits, params, mask, none_pruned, teacher, alpha=alpha, beta=0.0, lr=lr,
                   weight_decay=0.0, steps=1, batch_size=16, max_grad_norm=clip, seed=0, progress=False)
    assert hist[0]["loss_vkd"] < 1e-10  # nothing moved yet: student == teacher
    torch.testing.assert_close(hist[0]["grad_norm"], norm.item(), rtol=1e-4, atol=0)
    for n in names:
        # Adam divides g by |g|+eps: near-zero gradients amplify rounding, so tolerance is 1% of the step lr
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-5, atol=1e-5)


def test_pruned_entries_stay_exactly_zero(tiny_dirs, data):
    adapter, splits, params = setup(tiny_dirs, data)
    neurons = {0: torch.tensor([1, 5, 7]), 2: torch.tensor([0, 255])}
    prune(adapter, neurons)
    pruned = pruned_entries(adapter, neurons, params)
    assert sum(int(m.sum()) for m in pruned.values()) == 5 * (64 + 1 + 64)
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    unlearn(adapter, splits, params, mask, pruned, projector_features(adapter, splits.rvqa), alpha=1.25, beta=0.3,
            lr=1e-2, weight_decay=0.1, steps=5, batch_size=3, max_grad_norm=1.0, seed=1, progress=False)
    for n, p in params.items():
        assert (p[pruned[n]] == 0).all()
        assert not torch.equal(p[~pruned[n]], before[n][~pruned[n]])
