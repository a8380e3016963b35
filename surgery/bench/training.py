"""How the benchmark's models are trained: one loop (AdamW, linear warmup then cosine decay, gradients clipped to
norm 1) for every stage, and rows turned into LLM batches once, with a frozen tower's features standing in for the
images."""
import logging
import math
import random
import warnings
from dataclasses import replace

import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..data import Row
from ..models import Adapter, Example
from ..progress import progress_bar
from .evaluate import option_answer

log = logging.getLogger("surgery")
_BLANK = Image.new("RGB", (8, 8), (128, 128, 128))  # stands in for a photo where only the token layout matters


class NonFiniteLoss(RuntimeError):
    """A benchmark model's training loss (a stage, or the relearning attack) became inf or NaN."""


def train_loop(params, n: int, loss, *, epochs: int, lr: float, batch_size: int, seed: int,
               weight_decay: float = 0.0, warmup_steps: int = 0, groups: list[int] | None = None,
               desc: str = "train", on_epoch=None, skip=frozenset()) -> list[float]:
    """AdamW over `params` for `epochs` shuffled passes over items 0..n-1. `loss(indices)` gives a batch's mean
    loss. `groups` (one id per item): batches never mix groups (rows of similar length pad less). `skip`: items
    never shown: the batches, the steps and the learning-rate schedule are drawn over all n items, and each batch
    then drops its skipped items, so a run that skips some items sees every other item in the same batch at the
    same step as the run over all of them (a paired run; a batch left empty is not stepped). Returns the mean loss
    per epoch over the items shown; `on_epoch(epoch)` runs after each epoch."""
    rng = random.Random(seed)
    groups = groups or [0] * n
    members = {g: [i for i in range(n) if groups[i] == g] for g in sorted(set(groups))}
    steps = epochs * sum(math.ceil(len(m) / batch_size) for m in members.values())
    # foreach: the same update, op for op, as the per-tensor loop torch picks on the CPU (a test checks the weights
    # bit for bit), with less Python per step
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1))
                                              * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    losses = []
    for epoch in range(1, epochs + 1):
        batches = []
        for m in members.values():
            m = m[:]
            rng.shuffle(m)
            batches += [m[i:i + batch_size] for i in range(0, len(m), batch_size)]
        rng.shuffle(batches)
        if skip:
            batches = [[i for i in b if i not in skip] for b in batches]
        total, bar = 0.0, progress_bar(batches, f"{desc} {epoch}/{epochs}", leave=False)
        for number, batch in enumerate(bar, 1):
            if not batch:                           # the schedule goes on as in the run over every item
                with warnings.catch_warnings():         # (torch warns of a schedule step before any update)
                    warnings.simplefilter("ignore", UserWarning)
                    sched.step()
                continue
            value = loss(batch)
            if not torch.isfinite(value):   # AdamW would carry it into every weight, and a model of NaN still scores
                raise NonFiniteLoss(f"{desc}: the loss became {value.item()} at epoch {epoch}, batch {number} of "
                                    f"{len(batches)} (lr {lr:g} too large?); nothing is kept")
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += value.item() * len(batch)
            bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)   # drawn with the bar's next redraw
        losses.append(total / max(n - len(skip), 1))
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch, epochs, losses[-1])
        if on_epoch is not None:
            on_epoch(epoch)
    return losses


def answer_loss_from_features(adapter: Adapter, inputs: dict, labels: torch.Tensor,
                              features: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row mean answer-token cross-entropy [B], as `answer_loss(model(**inputs).logits, labels)`, but the
    vision tower is replaced by `features` (its feature-layer patch tokens of the rows' images, in row order:
    [images, P, H]) and the LM head runs on the answer positions only."""
    model = adapter.model.model
    extra = {}
    if features is not None:
        projected = model.multi_modal_projector(features)
        extra["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
    # no KV cache: training reads none back (building one only copies every layer's keys and values)
    hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                   **extra).last_hidden_state
    target = labels[:, 1:]
    where = target != -100
    tokens = nn.functional.cross_entropy(adapter.model.lm_head(hidden[:, :-1][where]).float(), target[where],
                                         reduction="none")
    row = where.nonzero()[:, 0]
    return torch.zeros(len(labels)).index_add(0, row, tokens) / where.sum(1).clamp(min=1)


def reshuffled(row: Row, rng: random.Random) -> Row:
    """The multiple-choice `row` with its options in a fresh order drawn from `rng`, the answer naming the correct
    value's new letter (`evaluate.option_answer`: what make_bench writes); any other row as it is."""
    if not row.options:
        return row
    letters = sorted(row.options)
    values = [row.options[k] for k in letters]
    rng.shuffle(values)
    moved = replace(row, options=dict(zip(letters, values)), correct=letters[values.index(row.options[row.correct])])
    return replace(moved, answer=option_answer(moved, moved.correct))


class Encoded:
    """Training rows tokenised once: ids and labels per row (unpadded), and the photo each VQA row shows."""

    def __init__(self, adapter: Adapter, rows):
        # the image tokens are all that matters here (the features come from elsewhere): any image marks them
        ids, labels = adapter.token_ids([Example(r.prompt(), r.answer, _BLANK if r.is_vqa else None) for r in rows])
        self.ids, self.labels = [torch.tensor(x) for x in ids], [torch.tensor(x) for x in labels]
        self.image = [str(r.image) if r.is_vqa else None for r in rows]
        self.pad = adapter.tokenizer.pad_token_id

    def batch(self, idx: list[int]) -> tuple[dict, torch.Tensor]:
        width = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for k, i in enumerate(idx):
            n = len(self.ids[i])
            ids[k, :n], labels[k, :n], mask[k, :n] = self.ids[i], self.labels[i], 1
        return {"input_ids": ids, "attention_mask": mask}, labels


def train_llm(adapter: Adapter, rows, params, *, features: dict | None = None, epochs: int, lr: float,
              batch_size: int, weight_decay: float, warmup_steps: int, seed: int, desc: str,
              reshuffle: bool = False, skip=frozenset()) -> list[float]:
    """Train `params` on `rows` (Rows) for `epochs` epochs; a VQA row reads `features[str(row.image)]` (the
    frozen tower's feature-layer patch tokens of its photo) instead of running the tower. Batches keep rows of one
    kind (VQA or QA, multiple choice or free-form) together: similar lengths pad less. Only `params` gather
    gradients: every other parameter of the model is frozen first (a frozen LLM's gradients, summed over a
    projector-only run, would otherwise enter the next run's first update). `reshuffle`: every epoch after the
    first sees each multiple-choice row with its options in a fresh order (`reshuffled`, seeded by `seed` and the
    epoch), so that the answer's letter must be looked up among the options, not remembered with the row. `skip`:
    indices of `rows` never shown (`train_loop`: a run paired with the one over every row); their photos need no
    features."""
    data = Encoded(adapter, rows)

    def loss(batch):
        inputs, labels = data.batch(batch)
        shown = [features[data.image[i]] for i in batch if data.image[i] is not None]
        return answer_loss_from_features(adapter, inputs, labels, torch.stack(shown) if shown else None).mean()

    def next_order(epoch):
        nonlocal data
        if epoch < epochs:
            rng = random.Random(f"{seed}-{epoch}")
            data = Encoded(adapter, [reshuffled(r, rng) for r in rows])

    adapter.model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    adapter.model.train()
    try:
        return train_loop(params, len(rows), loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          weight_decay=weight_decay, warmup_steps=warmup_steps,
                          groups=[2 * r.is_vqa + bool(r.options) for r in rows], desc=desc,
                          on_epoch=next_order if reshuffle else None, skip=skip)
    finally:
        adapter.model.eval()
        for p in params:
            p.requires_grad_(False)
