"""The unlearning loop (paper Eq. 3-5), LLM frozen:

    L = −α·m⊙L_fvqa + L_fqa + L_rvqa + L_rqa + β·L_VKD

The mask m acts on the gradient of the forget term only; the other terms update every trainable entry
except pruned ones, which MaskedAdamW leaves untouched (exactly zero). Gradients are clipped after masking.
"""
import inspect
import logging
import random

import torch
from tqdm import tqdm

from .data import Row, Splits
from .models import Adapter, answer_loss
from .optim import MaskedAdamW
from .saliency import batches, examples

log = logging.getLogger("surgery")


def projector_features(adapter: Adapter, rows: list[Row], batch_size: int = 8) -> list[torch.Tensor]:
    """The projector output for each row's image ([tokens, D] per row), from the vision tower and projector
    only. Used once on the vanilla model to cache the VKD teacher."""
    feats = []
    image_features = adapter.model.model.get_image_features
    accepted = set(inspect.signature(image_features).parameters) - {"input_ids", "attention_mask"}
    with torch.no_grad(), capture(adapter.projector) as out:
        for chunk in batches(rows, batch_size):
            batch = adapter.encode(examples(chunk)).to(adapter.device)
            image_features(**{k: v for k, v in batch.inputs.items() if k in accepted})
            feats += split_rows(out.pop(), batch.feature_counts)
    return feats


class capture:
    """Context manager: a forward hook that keeps the module's outputs in a list."""

    def __init__(self, module):
        self.module, self.outputs = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, a, o: self.outputs.append(o))
        return self.outputs

    def __exit__(self, *exc):
        self.handle.remove()


def split_rows(features: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    flat = features.reshape(-1, features.shape[-1])
    return [t.cpu() for t in torch.split(flat, counts)]


def cycle(rows: list[Row], size: int, rng: random.Random):
    """Endless shuffled batches of (indices, rows)."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order), size):
            idx = order[i:i + size]
            yield idx, [rows[j] for j in idx]


def unlearn(adapter: Adapter, splits: Splits, params: dict[str, torch.nn.Parameter], mask: dict[str, torch.Tensor],
            pruned: dict[str, torch.Tensor], teacher: list[torch.Tensor], *, alpha: float, beta: float, lr: float,
            weight_decay: float, steps: int, batch_size: int, max_grad_norm: float, seed: int,
            progress: bool = True) -> list[dict]:
    """Run `steps` updates; returns per-step losses. `teacher[i]` is the vanilla projector output of rvqa row i."""
    rng = random.Random(seed)
    names = list(params)
    opt = MaskedAdamW([params[n] for n in names], masks=[~pruned[n] for n in names], lr=lr,
                      weight_decay=weight_decay)
    forget_scale = {n: mask[n].to(params[n].dtype) * -alpha for n in names}   # −α·m
    streams = {s: cycle(splits[s], batch_size, rng) for s in ("fvqa", "fqa", "rvqa", "rqa") if splits[s]}
    no_path: set[str] = set()

    def loss_of(split):
        _, chunk = next(streams[split])
        batch = adapter.encode(examples(chunk)).to(adapter.device)
        return answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()

    history = []  # the model stays in eval mode: no dropout, the same function the teacher computed
    for step in tqdm(range(1, steps + 1), desc="unlearn", disable=not progress):
        loss_fvqa = loss_of("fvqa")
        grads_fvqa = torch.autograd.grad(loss_fvqa, [params[n] for n in names], allow_unused=True)

        idx, chunk = next(streams["rvqa"])
        batch = adapter.encode(examples(chunk)).to(adapter.device)
        with capture(adapter.projector) as feats:
            loss_rvqa = answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()
        student = feats[0].reshape(-1, feats[0].shape[-1]).float()
        target = torch.cat([teacher[i] for i in idx]).to(student.device, torch.float32)
        loss_vkd = (student - target).pow(2).mean()  # MSE: β means the same at any feature width
        loss = loss_rvqa + beta * loss_vkd

        losses = {"fqa": torch.zeros(()), "rqa": torch.zeros(())}
        for split in ("fqa", "rqa"):
            if split not in streams or split in no_path:
                continue
            term = loss_of(split)
            if not term.requires_grad:  # text rows never reach the trainable (vision) weights
                no_path.add(split)
                log.info("L_%s has no gradient path to the trainable weights (LLM frozen): skipped from now on", split)
                continue
            losses[split] = term
            loss = loss + term
        loss.backward()

        with torch.no_grad():
            for n, g_f in zip(names, grads_fvqa):
                p = params[n]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if g_f is not None:
                    p.grad.addcmul_(g_f, forget_scale[n])        # grad += −α·m⊙∇L_fvqa
                p.grad.masked_fill_(pruned[n], 0)                # pruned entries carry no gradient
            # clip after masking: masked-out forget gradients must not shrink the norm of the rest
            grad_norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step, "loss_fvqa": loss_fvqa.item(), "loss_fqa": float(losses["fqa"]),
                        "loss_rvqa": loss_rvqa.item(), "loss_rqa": float(losses["rqa"]),
                        "loss_vkd": loss_vkd.item(), "grad_norm": grad_norm.item()})
    return history
