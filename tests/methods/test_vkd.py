"""VKD on the shared loop against updates written out by hand with torch.optim.AdamW."""
import copy
import json

import pytest
import torch

from surgery.config import Config
from surgery.data import DataError, load_images, load_jsonl, load_splits
from surgery.methods import Context, train
from surgery.models import answer_loss, load
from surgery.prune import prune, pruned_entries
from surgery.saliency import examples
from surgery.methods.vkd import projector_features
from surgery.pipeline import resolve

from handwritten import perturb_
from rowdata import write_split


def setup(tiny_dirs, data, **cfg):
    adapter = load(str(tiny_dirs["tiny-llava"]))
    splits = load_splits(*data)
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    cfg = Config(forget=str(data[0]), retain=str(data[1]), **cfg)
    return adapter, splits, params, cfg


def mean_loss(adapter, rows):
    batch = adapter.encode(examples(rows))
    return answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()


def vkd_loss(adapter, rows, teacher):
    """mean over rows of the mean squared error between the projector output and the cached teacher."""
    feats = []
    h = adapter.projector.register_forward_hook(lambda m, a, o: feats.append(o))
    batch = adapter.encode(examples(rows))
    adapter.model(**batch.inputs)
    h.remove()
    out = feats[0].reshape(len(rows), -1, feats[0].shape[-1])
    return torch.stack([(out[i] - teacher[i]).pow(2).mean() for i in range(len(rows))]).mean()


def hand_step(ref, names, grads, lr, clip, opt=None):
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    params = [dict(ref.model.named_parameters())[n] for n in names]
    opt = opt or torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    for p, x in zip(params, grads):
        p.grad = x * min(1.0, clip / (norm.item() + 1e-6))
    opt.step()
    return norm.item(), opt


def context(adapter, splits, params, cfg, mask, pruned, teacher):
    cfg, method = resolve(cfg)
    method.teacher = teacher
    ctx = Context(cfg, adapter, splits, params, [m.layer for m in adapter.mlps], pruned=pruned, mask=mask)
    return ctx, method


@pytest.mark.parametrize("schedule", ["combined", "alternating"])
def test_one_step_matches_hand_written_update(tiny_dirs, data, schedule):
    """−α·m⊙∇L_fvqa + ∇L_rvqa + β·∇L_VKD, clipped after masking, one AdamW step (alternating: a forget update then a
    retain update). Neurons are pruned after the teacher is cached, so the VKD term has a gradient."""
    alpha, beta, lr, clip = 1.25, 0.7, 1e-3, 0.05
    adapter, splits, params, cfg = setup(tiny_dirs, data, alpha=alpha, beta=beta, lr=lr, max_grad_norm=clip,
                                         steps=1, batch_size=16, schedule=schedule)
    names = list(params)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}
    teacher = projector_features(adapter, splits.rvqa)
    neurons = {0: torch.tensor([3, 9])}
    prune(adapter, neurons)
    pruned = pruned_entries(adapter, neurons, params)
    ref = copy.deepcopy(adapter)
    ref_params = [dict(ref.model.named_parameters())[n] for n in names]

    g_f = torch.autograd.grad(mean_loss(ref, splits.fvqa), ref_params)
    forget = [-alpha * mask[n] * ~pruned[n] * gf for n, gf in zip(names, g_f)]
    norms = []
    if schedule == "alternating":
        norm, opt = hand_step(ref, names, forget, lr, clip)
        norms.append(norm)
    g_r = torch.autograd.grad(mean_loss(ref, splits.rvqa) + beta * vkd_loss(ref, splits.rvqa, teacher), ref_params)
    retain = [gr * ~pruned[n] for n, gr in zip(names, g_r)]
    if schedule == "alternating":
        norms.append(hand_step(ref, names, retain, lr, clip, opt)[0])
    else:
        norms.append(hand_step(ref, names, [a + b for a, b in zip(forget, retain)], lr, clip)[0])

    # batches of 16 cover each split whole, so the order of rows cannot matter
    ctx, method = context(adapter, splits, params, cfg, mask, pruned, teacher)
    hist = train(ctx, method, progress=False)
    keys = ["grad_norm"] if schedule == "combined" else ["grad_norm_forget", "grad_norm_retain"]
    for key, norm in zip(keys, norms):
        torch.testing.assert_close(hist[0][key], norm, rtol=1e-4, atol=0)
    assert hist[0]["loss_vkd"] > 0
    for n, p in zip(names, ref_params):
        # Adam divides g by |g|+eps: near-zero gradients amplify rounding, so tolerance is 1% of the step lr
        torch.testing.assert_close(params[n], p, rtol=1e-5, atol=1e-5)


def test_pruned_entries_stay_exactly_zero(tiny_dirs, data):
    adapter, splits, params, cfg = setup(tiny_dirs, data, lr=1e-2, weight_decay=0.1, steps=5, batch_size=3, seed=1)
    neurons = {0: torch.tensor([1, 5, 7]), 2: torch.tensor([0, 255])}
    prune(adapter, neurons)
    pruned = pruned_entries(adapter, neurons, params)
    assert sum(int(m.sum()) for m in pruned.values()) == 5 * (64 + 1 + 64)
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    ctx, method = context(adapter, splits, params, cfg, mask, pruned, projector_features(adapter, splits.rvqa))
    train(ctx, method, progress=False)
    for n, p in params.items():
        assert (p[pruned[n]] == 0).all()
        assert not torch.equal(p[~pruned[n]], before[n][~pruned[n]])


def test_distill_images_add_their_distillation_term(tiny_dirs, data, tmp_path):
    """--distill-images: the retain term's step also distils a batch of unlabeled photos, as many as the retain batch,
    with weight β: ∇(L_rvqa + β·L_VKD(retain) + β·L_VKD(photos)), checked against a hand-written AdamW step. The forget
    gradient is masked out entirely, so the distillation terms carry the step."""
    beta, lr, clip = 300.0, 1e-3, 10.0
    pool_file = write_split(tmp_path / "pool.jsonl", 7, 0, seed=3, prefix="x")   # 7 photos, the 7 retain-VQA rows
    adapter, splits, params, cfg = setup(tiny_dirs, data, beta=beta, lr=lr, max_grad_norm=clip, steps=1,
                                         batch_size=16, distill_images=str(pool_file))
    names = list(params)
    photos = load_jsonl(pool_file)       # the same photos, with a question: the projector output does not read it
    teacher, photo_teacher = projector_features(adapter, splits.rvqa), projector_features(adapter, photos)
    mask = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    ctx, method = context(adapter, splits, params, cfg, mask, {}, teacher)
    method.distil_images(ctx)            # before pruning, as prepare does
    assert len(method.pool) == 7 and ctx.info["distill_images"] == 7
    perturb_(params, seed=2, scale=0.1)  # the student moved away from its teachers: the distillation has a gradient
    neurons = {1: torch.tensor([0, 4, 17]), 2: torch.tensor([3, 8, 100])}
    prune(adapter, neurons)
    ctx.pruned = pruned = pruned_entries(adapter, neurons, params)
    ref = copy.deepcopy(adapter)
    ref_params = [dict(ref.model.named_parameters())[n] for n in names]
    photo_loss = vkd_loss(ref, photos, photo_teacher)
    loss = mean_loss(ref, splits.rvqa) + beta * vkd_loss(ref, splits.rvqa, teacher) + beta * photo_loss
    g_r = torch.autograd.grad(loss, ref_params, retain_graph=True)
    g_photos = torch.autograd.grad(beta * photo_loss, ref_params)   # the part of the step the photos give
    norm, _ = hand_step(ref, names, [gr * ~pruned[n] for n, gr in zip(names, g_r)], lr, clip)

    hist = train(ctx, method, progress=False)
    torch.testing.assert_close(hist[0]["loss_vkd_images"], photo_loss.item(), rtol=1e-5, atol=0)
    assert photo_loss.item() > 0 and torch.linalg.vector_norm(torch.cat([g.flatten() for g in g_photos])) > 0.1 * norm
    torch.testing.assert_close(hist[0]["grad_norm"], norm, rtol=1e-4, atol=0)
    # Adam's first step is lr·g/(|g|+eps): where the clipped |g| is within 100 eps of zero but not zero, the rounding
    # of g (summed in another order by the loop) moves the step by up to lr. Those entries (3 to 8 of 16384 in a
    # layer's weight on the machines this was run on) are left out, at most 1 in 1000 over all weights; every other
    # entry, the pruned ones (g = 0) among them, must match.
    steady = {n: (g == 0) | (g.abs() >= 100 * 1e-8)
              for n, g in zip(names, (g * min(1.0, clip / (norm + 1e-6)) * ~pruned[n] for n, g in zip(names, g_r)))}
    assert sum(int((~m).sum()) for m in steady.values()) <= sum(m.numel() for m in steady.values()) // 1000
    for n, p in zip(names, ref_params):
        torch.testing.assert_close(params[n][steady[n]], p[steady[n]], rtol=1e-5, atol=1e-6)


def test_distill_images_refuse_a_forget_photo_and_a_short_pool(tiny_dirs, data, tmp_path):
    adapter, splits, params, _ = setup(tiny_dirs, data)
    forget_photo = splits.fvqa[0].image
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(forget_photo)}) + "\n")
    cfg = Config(forget=str(data[0]), retain=str(data[1]), distill_images=str(bad))
    ctx, method = context(adapter, splits, params, cfg, None, {}, [])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .* is a forget photo"):
        method.distil_images(ctx)
    short = write_split(tmp_path / "short.jsonl", 2, 0, seed=4, prefix="s")
    ctx.cfg.distill_images = str(short)
    with pytest.raises(ValueError, match="2 photos, fewer than the 4 of a retain batch"):
        method.distil_images(ctx)
    (tmp_path / "nofield.jsonl").write_text('{"image": 3}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:1: expected a JSON object with an 'image' path"):
        load_images(tmp_path / "nofield.jsonl")
