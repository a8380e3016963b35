"""VKD: Visual Knowledge Distillation unlearning (arXiv 2512.11325), paper Eq. 3-5, LLM frozen:

    L = −α·m⊙L_fvqa + L_fqa + L_rvqa + L_rqa + β·L_VKD

prepare: collect activation statistics and Fisher diagonals, cache the teacher's projector features, prune the
neurons with the highest forget importance I_u, and set the Fisher mask m = F_fvqa / F_{fqa∪rvqa∪rqa} ≥ d_F.
The mask gates only the forget gradient; L_VKD = mean ‖f − t‖² between the student's projector output on
retain-VQA images and the vanilla model's, cached before pruning.

`--distill-images` (ours, not the paper's): photos without labels (faces beyond the retain set, none of a forget
person) whose projector features are distilled too, with the same β: each step adds a batch of them, as many as the
retain batch, to the retain-VQA forward (one forward, so DDP and a sharded LLM see nothing new), and their rows get
no cross-entropy. The retain term protects the retain people's faces only; this protects faces in general.
"""
import inspect
import logging
import time

import torch
from safetensors.torch import save_file

from ..data import load_images
from ..models import Adapter, answer_loss
from ..prune import prune, pruned_entries
from ..saliency import batches, collect_or_load, examples
from ..select import fisher_mask, neuron_importance, select_neurons, union_splits
from . import teacher
from .loop import Context, Method, Term, batches as row_batches

log = logging.getLogger("surgery")


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
    """The projector output ([B, T, D] or [ΣT, D]) as one [T_i, D] tensor per image."""
    return list(torch.split(features.reshape(-1, features.shape[-1]), counts))


def projector_features(adapter: Adapter, rows, batch_size: int = 8) -> list[torch.Tensor]:
    """The projector output for each row's image ([tokens, D] per row, on the CPU), from the vision tower and
    projector only. Used once on the vanilla model to cache the VKD teacher."""
    feats = []
    image_features = adapter.model.model.get_image_features
    accepted = set(inspect.signature(image_features).parameters) - {"input_ids", "attention_mask"}
    with torch.no_grad(), capture(adapter.projector) as out:
        for chunk in batches(rows, batch_size):
            batch = adapter.encode(examples(chunk)).to(adapter.device)
            image_features(**{k: v for k, v in batch.inputs.items() if k in accepted})
            feats += [t.cpu() for t in split_rows(out.pop(), batch.feature_counts)]
    return feats


def select_and_mask(ctx: Context, sal, prune_neurons: bool = True) -> dict:
    """Prune by I_u (when `prune_neurons`) and set ctx.mask from the Fisher ratio; write masks.safetensors.
    Returns the pruned neurons per layer."""
    cfg, adapter = ctx.cfg, ctx.adapter
    importance = neuron_importance(sal, ctx.layers, cfg.eps)
    frac = None if cfg.prune_threshold is not None else cfg.prune_frac
    neurons = select_neurons(importance, cfg.prune_threshold, frac, cfg.prune_per_layer) if prune_neurons \
        else {l: torch.empty(0, dtype=torch.long) for l in ctx.layers}
    t = time.perf_counter()
    prune(adapter, neurons)
    ctx.timings["prune_s"] = time.perf_counter() - t
    ctx.pruned = pruned_entries(adapter, neurons, ctx.params)
    union = union_splits(sal, ctx.reaches_param)
    for splits in sorted({tuple(u) for u in union.values()}):
        log.info("Fisher union F_{fqa∪rvqa∪rqa}: %d parameters average %s (the splits that reach them)",
                 sum(tuple(u) == splits for u in union.values()), "+".join(splits) or "no split")
    ctx.mask = {n: m & ~ctx.pruned[n] for n, m in
                fisher_mask(sal, ctx.reaches_param, cfg.mask_threshold, cfg.mask_frac, cfg.eps).items()}
    if ctx.out is not None:
        save_file({**{f"neurons.{l}": idx.contiguous() for l, idx in neurons.items()},
                   **{f"importance.{l}": imp.contiguous().cpu() for l, imp in importance.items()},
                   **{f"mask.{n}": m.contiguous().cpu() for n, m in ctx.mask.items()}}, str(ctx.out / "masks.safetensors"))
    log.info("pruned %d neurons %s; Fisher mask keeps %d of %d weights", sum(i.numel() for i in neurons.values()),
             {l: int(i.numel()) for l, i in neurons.items()}, sum(int(m.sum()) for m in ctx.mask.values()),
             sum(m.numel() for m in ctx.mask.values()))
    ctx.info.update({"pruned_neurons": {str(l): int(i.numel()) for l, i in neurons.items()},
                     "masked_weights": {n: int(m.sum()) for n, m in ctx.mask.items()},
                     "fisher_union_splits": {n: u for n, u in union.items()}})
    return neurons


def saliency_of(ctx: Context, fisher: bool = True):
    """Collect (or reuse --saliency) on the model as loaded, and keep a copy in the output directory."""
    cfg = ctx.cfg
    sal = collect_or_load(ctx.adapter, ctx.splits, ctx.params, cfg.forget, cfg.retain, cfg.collect_batch_size,
                          cfg.saliency, ctx.timings, fisher=fisher, world=ctx.world)
    if ctx.out is not None:
        sal.save(ctx.out / "saliency.safetensors")
    return sal


def teachers(ctx: Context, rows) -> "teacher.Features":
    """The vanilla model's projector output for `rows` (VKD's t), cached as `teacher.cache` decides."""
    size = ctx.cfg.collect_batch_size
    return teacher.cache(ctx, rows, lambda chunk: projector_features(ctx.adapter, chunk, size), size)


def _distilled_per_step(cfg, splits) -> int:
    """--distill-images photos a step distils: as many as the retain batch, so that one mean weighs both alike."""
    return min(cfg.batch_size, len(splits.rvqa))


class VKD(Method):
    name = "vkd"
    reads = ("prune_threshold", "prune_frac", "prune_per_layer", "mask_threshold", "mask_frac", "beta", "saliency",
             "teacher_memory_gb", "teacher_cache", "distill_images")
    paper = "Robust MLLM Unlearning via Visual Knowledge Distillation (arXiv 2512.11325)"
    default_scope = "mlp"
    defaults = {"alpha": 1.25, "schedule": "combined"}
    forget_splits = ("fvqa",)
    retain_splits = ("fqa", "rvqa", "rqa")   # the forget people's facts in text are kept: L_fqa has a + sign
    pool: list = []                          # --distill-images rows (`distil_images`)
    drawn: list = []                         # the indices of them in the retain batch `encode` made last

    def check_inputs(self, cfg, splits) -> None:
        super().check_inputs(cfg, splits)
        self.pool = self.distil_pool(cfg, splits)   # --distill-images: decoded and counted once, kept for prepare

    def distil_pool(self, cfg, splits) -> list:
        """The --distill-images rows (none without it); refused if a photo is a forget photo or they are fewer
        than a retain batch."""
        if not cfg.distill_images:
            return []
        forget = {r.image for r in (*splits.fvqa, *splits.held_back)}
        pool = load_images(cfg.distill_images, exclude=forget)
        per_step = _distilled_per_step(cfg, splits)
        if len(pool) < per_step:
            raise ValueError(f"--distill-images {cfg.distill_images}: {len(pool)} photos, fewer than "
                             f"the {per_step} of a retain batch (each step distils as many of them)")
        return pool

    def prepare(self, ctx: Context) -> None:
        sal = saliency_of(ctx)
        t = time.perf_counter()
        self.teacher = teachers(ctx, ctx.splits.rvqa)   # before pruning; in memory or memory-mapped (--teacher-memory)
        self.distil_images(ctx)   # --distill-images, before pruning too
        ctx.timings["teacher_s"] = time.perf_counter() - t
        select_and_mask(ctx, sal)

    def distil_images(self, ctx: Context) -> None:
        """--distill-images: load the photos, cache their teacher features, and start their batch stream."""
        self.pool, self.pool_teacher = self.pool or self.distil_pool(ctx.cfg, ctx.splits), None
        if not self.pool:
            return
        per_step = _distilled_per_step(ctx.cfg, ctx.splits)
        self.pool_teacher = teachers(ctx, self.pool)
        self.pool_stream = row_batches(len(self.pool), per_step, ctx.cfg.seed * 1000 + 7)
        ctx.info["distill_images"] = len(self.pool)
        log.info("VKD: also distilling %d photos from %s (%d per step)", len(self.pool), ctx.cfg.distill_images,
                 per_step)

    def encode(self, ctx: Context, split: str, rows: list[int]):
        """The retain-VQA rows, then this rank's share of the next batch of photos to distil: one forward for both."""
        self.drawn = ctx.world.shard(next(self.pool_stream)) if split == "rvqa" and self.pool else []
        if not self.drawn:
            return ctx.encode(split, rows)
        return ctx.encode_rows([ctx.splits.rvqa[i] for i in rows] + [self.pool[j] for j in self.drawn])

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        if split != "rvqa":
            ce = answer_loss(ctx.forward(batch), batch.labels)
            return {split: Term(ce, -ctx.cfg.alpha if split == "fvqa" else 1.0)}
        pool = self.drawn
        with capture(ctx.adapter.projector) as feats:
            ce = answer_loss(ctx.forward(batch), batch.labels)[:len(rows)]
        student = split_rows(feats[0], batch.feature_counts)
        targets = [self.teacher[i] for i in rows] + [self.pool_teacher[j] for j in pool]
        # per-row mean squared error: β means the same at any feature width
        vkd = torch.stack([(s.float() - t.to(s.device, torch.float32)).pow(2).mean() for s, t in zip(student, targets)])
        terms = {"rvqa": Term(ce), "vkd": Term(vkd[:len(rows)], ctx.cfg.beta)}
        if pool:
            terms["vkd_images"] = Term(vkd[len(rows):], ctx.cfg.beta)
        return terms


METHOD = VKD()
