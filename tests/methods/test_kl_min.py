"""KL_Min on the shared loop against an update written out by hand: the vanilla model is a separate copy here."""
import pytest
from handwritten import (adamw_step, assert_params_close, ce, encode, grads_of, kl, logits_of, perturb_, run_loop,
                         setup, twin)


@pytest.mark.parametrize("scope", ["mlp", "full"])
def test_one_step_matches_hand_written_update(tiny_dirs, data, scope):
    """−α·CE(forget) + KL(vanilla ‖ model)(retain), the KL at the answer positions. The trainable weights start away
    from the vanilla ones, so the KL and its gradient are not zero."""
    alpha, lr, clip = 1.2, 1e-3, 0.5
    adapter, splits, params = setup(tiny_dirs, data, scope)
    vanilla, _ = twin(adapter, params)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    perturb_(params, seed=7)
    ref, ref_params = twin(adapter, params)
    text = scope == "full"
    forget, retain = ["fvqa"] + (["fqa"] if text else []), ["rvqa"] + (["rqa"] if text else [])
    loss = sum(-alpha * ce(logits_of(ref, b := encode(ref, splits[s])), b.labels).mean() for s in forget)
    kls = {s: kl(logits_of(vanilla, b := encode(ref, splits[s])).detach(), b.labels, logits_of(ref, b), b.labels)
           for s in retain}
    loss = loss + sum(k.mean() for k in kls.values())
    norm, _ = adamw_step(ref_params, grads_of(loss, ref_params), lr, clip)

    hist, _ = run_loop(adapter, splits, params, data, "kl_min", vanilla=snapshot, alpha=alpha, lr=lr,
                       max_grad_norm=clip, steps=1, batch_size=16, scope=scope)
    for s in retain:
        assert hist[0][f"loss_kl_{s}"] == pytest.approx(kls[s].mean().item(), rel=1e-4) and kls[s].mean() > 1e-4
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_params_close(params, ref_params, lr)
