"""MMUnlearner on the shared loop: its Fisher mask recomputed by hand, and one alternating step written out with
torch.optim.AdamW."""
import pytest
import torch
from handwritten import adamw_step, assert_params_close, ce, encode, grads_of, logits_of, run_loop, setup, twin

from surgery.config import Config
from surgery.pipeline import resolve


def test_defaults_are_mmunlearners():
    cfg, _ = resolve(Config(method="mmu"))
    assert (cfg.scope, cfg.schedule, cfg.alpha, cfg.mask_threshold) == ("full", "alternating", 1.0, 1.0)


def test_one_alternating_step_matches_hand_written_update(tiny_dirs, data):
    """A forget update −α·m⊙∇CE(fvqa), clipped after masking, then a retain update ∇CE(rvqa) + ∇CE(rqa), both
    clipped, on one AdamW state. The forget people's text (fqa) is not trained on."""
    alpha, lr, clip = 1.3, 1e-3, 0.5
    adapter, splits, params = setup(tiny_dirs, data, "full")
    g = torch.Generator().manual_seed(11)
    mask = {n: torch.rand(p.shape, generator=g) < 0.4 for n, p in params.items()}
    ref, ref_params = twin(adapter, params)
    forget = grads_of(-alpha * ce(logits_of(ref, b := encode(ref, splits.fvqa)), b.labels).mean(), ref_params)
    norm_f, opt = adamw_step(ref_params, [x * mask[n] for x, n in zip(forget, params)], lr, clip)
    retain = sum(ce(logits_of(ref, b := encode(ref, splits[s])), b.labels).mean() for s in ("rvqa", "rqa"))
    norm_r, _ = adamw_step(ref_params, grads_of(retain, ref_params), lr, clip, opt)

    hist, _ = run_loop(adapter, splits, params, data, "mmu", prepare=False, mask=mask, alpha=alpha, lr=lr,
                       max_grad_norm=clip, steps=1, batch_size=16)
    assert {k for k in hist[0] if k.startswith("loss_")} == {"loss_fvqa", "loss_rvqa", "loss_rqa"}
    assert hist[0]["grad_norm_forget"] == pytest.approx(norm_f, rel=1e-4)
    assert hist[0]["grad_norm_retain"] == pytest.approx(norm_r, rel=1e-4)
    assert_params_close(params, ref_params, lr)


def test_mask_is_the_fisher_ratio(tiny_dirs, data):
    """m = F_fvqa / (F_rest + eps) >= 1 with F the squared batch-mean gradient averaged over batches (of 3 rows);
    F_rest averages, per weight, the splits whose gradient reaches it: rvqa for vision weights, fqa + rvqa + rqa for
    the language model's. Nothing is pruned. (Trainable: a vision MLP and a language-model MLP, to keep it quick.)"""
    adapter, splits, params = setup(tiny_dirs, data, "full")
    params = {n: p for n, p in params.items() if ".layers.1.mlp." in n}
    adapter.train_only(params)
    assert any(adapter.is_vision(n) for n in params) and not all(adapter.is_vision(n) for n in params)
    ref, ref_params = twin(adapter, params)

    def squared_grads(rows):
        batch = encode(ref, rows)
        return [g.double() ** 2 for g in grads_of(ce(logits_of(ref, batch), batch.labels).mean(), ref_params)]

    fisher, count = {}, {}
    for s in ("fvqa", "fqa", "rvqa", "rqa"):
        chunks = [splits[s][i:i + 3] for i in range(0, len(splits[s]), 3)]
        count[s] = len(chunks)
        fisher[s] = [sum(x) / len(chunks) for x in zip(*map(squared_grads, chunks))]
    _, ctx = run_loop(adapter, splits, params, data, "mmu", collect_batch_size=3, steps=1, batch_size=16, lr=0.0)
    checked = 0
    for k, n in enumerate(params):
        rest = ["rvqa"] if adapter.is_vision(n) else ["fqa", "rvqa", "rqa"]
        union = sum(fisher[s][k] * count[s] for s in rest) / sum(count[s] for s in rest)
        ratio = fisher["fvqa"][k] / (union + 1e-8)
        clear = (ratio - 1).abs() > 1e-3
        assert torch.equal(ctx.mask[n][clear], (ratio >= 1)[clear]), n
        checked += int(clear.sum())
    assert checked > 0.99 * sum(p.numel() for p in params.values())
    assert not any(p.any() for p in ctx.pruned.values())
