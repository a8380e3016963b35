"""GA_Diff on the shared loop against an update written out by hand (torch.optim.AdamW)."""
import pytest
from handwritten import adamw_step, assert_params_close, ce, encode, grads_of, logits_of, run_loop, setup, twin


@pytest.mark.parametrize("scope", ["mlp", "full"])
def test_one_step_matches_hand_written_update(tiny_dirs, data, scope):
    """−α·CE(forget) + CE(retain); text splits only when the scope reaches the language model."""
    alpha, lr, clip = 0.7, 1e-3, 0.5
    adapter, splits, params = setup(tiny_dirs, data, scope)
    ref, ref_params = twin(adapter, params)
    text = scope == "full"
    weights = {"fvqa": -alpha, "rvqa": 1.0, **({"fqa": -alpha, "rqa": 1.0} if text else {})}
    loss = sum(w * ce(logits_of(ref, b := encode(ref, splits[s])), b.labels).mean() for s, w in weights.items())
    norm, _ = adamw_step(ref_params, grads_of(loss, ref_params), lr, clip)

    hist, _ = run_loop(adapter, splits, params, data, "ga_diff", alpha=alpha, lr=lr, max_grad_norm=clip, steps=1,
                       batch_size=16, scope=scope)
    assert {k for k in hist[0] if k.startswith("loss_")} == {f"loss_{s}" for s in weights}
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_params_close(params, ref_params, lr)
