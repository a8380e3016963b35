"""Hand-written references for the method tests: per-row losses in plain torch (no surgery loss code), the clip and
torch.optim.AdamW step the loop must match, and the setup every method test shares."""
import copy

import torch

from surgery.config import Config
from surgery.data import load_splits
from surgery.methods import Context, train
from surgery.models import load
from surgery.pipeline import resolve
from surgery.saliency import examples


def setup(tiny_dirs, data, scope="mlp", name="tiny-llava"):
    """(adapter, splits, trainable params) with everything outside `scope` frozen."""
    adapter = load(str(tiny_dirs[name]))
    splits = load_splits(*data)
    params = adapter.scope_params(scope)
    adapter.train_only(params)
    return adapter, splits, params


@torch.no_grad()
def perturb_(params: dict, seed: int, scale: float = 0.05) -> None:
    """Move the trainable weights away from the vanilla ones (a KL to the vanilla model is 0 with 0 gradient there)."""
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.add_(scale * torch.randn(p.shape, generator=g))


def logits_of(adapter, batch):
    return adapter.model(**batch.inputs).logits


def encode(adapter, rows):
    return adapter.encode(examples(rows))


def answer_logp(logits, labels):
    """Per row: (log-softmax at the positions that predict its answer tokens [A, V], those tokens [A])."""
    out = []
    for b in range(labels.shape[0]):
        pos = (labels[b, 1:] != -100).nonzero().flatten()
        out.append((torch.log_softmax(logits[b, pos].double(), -1), labels[b, pos + 1]))
    return out


def ce(logits, labels):
    """Mean answer-token cross-entropy per row."""
    return torch.stack([-lp.gather(1, t[:, None]).mean() for lp, t in answer_logp(logits, labels)])


def seq_logprob(logits, labels):
    """log π(answer | prompt) per row: the sum over its tokens."""
    return torch.stack([lp.gather(1, t[:, None]).sum() for lp, t in answer_logp(logits, labels)])


def kl(teacher_logits, teacher_labels, student_logits, student_labels):
    """Per row, the mean over its answer positions of Σ_v p_t (log p_t − log p_s)."""
    rows = []
    pairs = zip(answer_logp(teacher_logits, teacher_labels), answer_logp(student_logits, student_labels))
    for (lt, tt), (ls, ts) in pairs:
        assert torch.equal(tt, ts)
        rows.append((lt.exp() * (lt - ls)).sum(-1).mean())
    return torch.stack(rows)


def grads_of(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def adamw_step(params, grads, lr, clip, opt=None):
    """Clip the global norm to `clip` (as clip_grad_norm_: scale by clip / (norm + 1e-6) when below 1), then one
    torch.optim.AdamW step (weight decay 0). Returns (norm, optimizer)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    opt = opt or torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    for p, g in zip(params, grads):
        p.grad = (g * min(1.0, clip / (norm + 1e-6))).to(p.dtype)
    opt.step()
    return norm, opt


def twin(adapter, params):
    """A deep copy of the adapter and its copies of `params`, in the same order."""
    ref = copy.deepcopy(adapter)
    named = dict(ref.model.named_parameters())
    return ref, [named[n] for n in params]


def run_loop(adapter, splits, params, data, method: str, prepare=True, vanilla=None, mask=None, **cfg):
    """One run of `method` on the shared loop; returns (history, context). `vanilla`: the weights the method's
    vanilla snapshot holds (default: the weights as they are); `mask`: a forget-gradient mask set instead of the
    method's prepare step."""
    cfg, m = resolve(Config(method=method, forget=str(data[0]), retain=str(data[1]), **cfg))
    ctx = Context(cfg, adapter, splits, params, [x.layer for x in adapter.select_layers(None)], mask=mask)
    if m.needs_vanilla:
        ctx.vanilla = {n: p.detach().clone() for n, p in (vanilla or params).items()}
    if prepare:
        m.prepare(ctx)
    return (train(ctx, m, progress=False) if m.trains else []), ctx


def assert_params_close(params, ref_params, lr):
    """The loop's weights equal the hand-updated ones. Adam's first step is lr·g/(|g| + 1e-8): where the clipped
    gradient is within 100× of that eps, rounding moves the step by up to lr, elsewhere by under 1% of lr."""
    for (n, p), r in zip(params.items(), ref_params):
        stable = r.grad.abs() > 1e-6
        torch.testing.assert_close(p[stable], r[stable], rtol=1e-5, atol=1e-2 * lr, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(p[~stable], r[~stable], rtol=0, atol=lr, msg=lambda m, n=n: f"{n}: {m}")
