"""GA on the shared loop against a gradient-ascent step written out by hand (torch.optim.AdamW)."""
import pytest
from handwritten import adamw_step, assert_params_close, ce, encode, grads_of, logits_of, run_loop, setup, twin


@pytest.mark.parametrize("scope", ["mlp", "full"])
def test_one_step_matches_hand_written_update(tiny_dirs, data, scope):
    """−α·CE(forget); forget is fvqa, plus fqa once the scope reaches the language model."""
    alpha, lr, clip = 1.5, 1e-3, 0.5
    adapter, splits, params = setup(tiny_dirs, data, scope)
    ref, ref_params = twin(adapter, params)
    forget = ["fvqa"] + (["fqa"] if scope == "full" else [])
    loss = sum(-alpha * ce(logits_of(ref, b := encode(ref, splits[s])), b.labels).mean() for s in forget)
    norm, _ = adamw_step(ref_params, grads_of(loss, ref_params), lr, clip)

    hist, _ = run_loop(adapter, splits, params, data, "ga", alpha=alpha, lr=lr, max_grad_norm=clip, steps=1,
                       batch_size=16, scope=scope)
    assert set(hist[0]) == {"step", "grad_norm", *(f"loss_{s}" for s in forget)}
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_params_close(params, ref_params, lr)
