"""NPO on the shared loop against an update written out by hand: the vanilla model is a separate copy here."""
import pytest
import torch
from handwritten import (adamw_step, assert_params_close, ce, encode, grads_of, logits_of, perturb_, run_loop,
                         seq_logprob, setup, twin)


@pytest.mark.parametrize("retain_term", [False, True])
def test_one_step_matches_hand_written_update(tiny_dirs, data, retain_term):
    """α·(2/β)·mean log(1 + (π_θ/π_vanilla)^β) over the forget rows, π the answer's likelihood (+ CE(retain) with
    --npo-retain); at scope full the text splits take part."""
    alpha, beta, lr, clip = 0.8, 0.3, 1e-3, 5.0
    adapter, splits, params = setup(tiny_dirs, data, "full")
    vanilla, _ = twin(adapter, params)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    perturb_(params, seed=3, scale=0.02)
    ref, ref_params = twin(adapter, params)
    loss = 0
    for s in ("fvqa", "fqa"):
        b = encode(ref, splits[s])
        ratio = seq_logprob(logits_of(ref, b), b.labels) - seq_logprob(logits_of(vanilla, b), b.labels).detach()
        loss = loss + alpha * (2 / beta * torch.log1p(torch.exp(beta * ratio))).mean()
    if retain_term:
        loss = loss + sum(ce(logits_of(ref, b := encode(ref, splits[s])), b.labels).mean() for s in ("rvqa", "rqa"))
    norm, _ = adamw_step(ref_params, grads_of(loss, ref_params), lr, clip)

    hist, _ = run_loop(adapter, splits, params, data, "npo", vanilla=snapshot, alpha=alpha, npo_beta=beta,
                       npo_retain=retain_term, lr=lr, max_grad_norm=clip, steps=1, batch_size=16, scope="full")
    assert ("loss_rvqa" in hist[0]) == retain_term and "loss_npo_fqa" in hist[0]
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_params_close(params, ref_params, lr)


def test_epochs_count_forget_rows_without_the_retain_term(tiny_dirs, data):
    """Without a retain term an epoch is a pass over the forget-VQA rows (5 rows, batches of 2: 3 steps)."""
    adapter, splits, params = setup(tiny_dirs, data, "mlp")
    hist, _ = run_loop(adapter, splits, params, data, "npo", epochs=1, batch_size=2, scope="mlp")
    assert len(hist) == 3
    hist, _ = run_loop(adapter, splits, params, data, "npo", npo_retain=True, epochs=1, batch_size=2, scope="mlp")
    assert len(hist) == 4                                          # 7 retain-VQA rows
