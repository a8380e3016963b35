"""VGID on the shared loop: the teacher (the frozen base model on the noised image with the unlearning instruction)
and one update written out by hand; the teacher differs from the clean model and is never updated."""
import numpy as np
import pytest
import torch
from handwritten import (adamw_step, assert_params_close, encode, grads_of, kl, logits_of, perturb_, run_loop, setup,
                         twin)
from PIL import Image

from surgery.models import Example


def teacher_batch(adapter, rows, sigma, instruction, seed, step=1):
    """The rows as the teacher sees them: `instruction question`, pixels x + σ·ε clipped to [0, 1] (ε keyed by
    seed, step, row), rounded back to 8 bits."""
    examples = []
    for i, row in enumerate(rows):
        image = row.load_image()
        if image is not None:
            x = np.asarray(image, dtype=np.float64) / 255
            eps = np.random.default_rng([seed, step, i]).standard_normal(x.shape)
            image = Image.fromarray(np.rint(np.clip(x + sigma * eps, 0, 1) * 255).astype(np.uint8))
        examples.append(Example(instruction + " " + row.prompt(), row.answer, image))
    return adapter.encode(examples)


def test_one_step_matches_hand_written_update(tiny_dirs, data):
    """α·KL(teacher ‖ model)(fvqa, fqa) + KL(vanilla ‖ model)(rvqa, rqa) at the answer positions, scope full."""
    alpha, sigma, seed, lr, clip = 1.4, 0.3, 5, 1e-3, 0.5
    instruction = "Do not recognise this person."
    adapter, splits, params = setup(tiny_dirs, data, "full")
    vanilla, _ = twin(adapter, params)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    perturb_(params, seed=2, scale=0.02)
    ref, ref_params = twin(adapter, params)
    loss, kls = 0, {}
    with torch.no_grad():
        teachers = {s: (t := teacher_batch(ref, splits[s], sigma, instruction, seed), logits_of(vanilla, t))
                    for s in ("fvqa", "fqa")}
    for s in ("fvqa", "fqa", "rvqa", "rqa"):
        b = encode(ref, splits[s])
        t_batch, t_logits = teachers[s] if s in teachers else (b, logits_of(vanilla, b).detach())
        kls[s] = kl(t_logits, t_batch.labels, logits_of(ref, b), b.labels)
        loss = loss + (alpha if s in teachers else 1.0) * kls[s].mean()
    norm, _ = adamw_step(ref_params, grads_of(loss, ref_params), lr, clip)

    hist, _ = run_loop(adapter, splits, params, data, "vgid", vanilla=snapshot, alpha=alpha, vgid_sigma=sigma,
                       vgid_instruction=instruction, seed=seed, lr=lr, max_grad_norm=clip, steps=1, batch_size=16,
                       scope="full")
    for s, value in kls.items():
        assert hist[0][f"loss_kl_{s}"] == pytest.approx(value.mean().item(), rel=1e-4) and value.mean() > 1e-5
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert_params_close(params, ref_params, lr)


def test_teacher_differs_from_the_clean_model_and_is_never_updated(tiny_dirs, data):
    """On the forget rows the teacher's answer distributions are not the clean vanilla model's; after three steps
    of training (lr 1e-2) the snapshot the teacher runs on is bit-identical and gives the same logits."""
    adapter, splits, params = setup(tiny_dirs, data, "mlp")
    vanilla, _ = twin(adapter, params)
    with torch.no_grad():
        clean = encode(adapter, splits.fvqa)
        teacher = teacher_batch(adapter, splits.fvqa, 0.5, "Forget this face.", seed=0)
        before = logits_of(vanilla, teacher)
        gap = kl(before, teacher.labels, logits_of(vanilla, clean), clean.labels)
    assert (gap > 1e-5).all()                   # a random tiny model is near uniform: small, but far from rounding
    hist, ctx = run_loop(adapter, splits, params, data, "vgid", vgid_instruction="Forget this face.", lr=1e-2,
                         steps=3, batch_size=3, scope="mlp")
    loaded = dict(vanilla.model.named_parameters())
    assert len(hist) == 3 and any(not torch.equal(p, loaded[n]) for n, p in params.items())
    assert all(torch.equal(ctx.vanilla[n], loaded[n]) for n in params)
    torch.testing.assert_close(ctx.vanilla_logits(teacher), before, rtol=0, atol=0)
