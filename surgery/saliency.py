"""Streaming saliency collection: one pass per split. Forward pre-hooks on each vision MLP's output
projection feed the post-activation hidden z to `activation_stats`; post-accumulate-grad hooks fold each
gradient into its Fisher buffer as backward produces it and free it, so no full set of gradients is held."""
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import kernels
from .data import SPLITS, Row, Splits
from .distributed import World, recomputing
from .models import Adapter, Example, answer_loss
from .progress import progress_bar

log = logging.getLogger("surgery")


@dataclass
class Saliency:
    """stats[split][layer]: [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0); tokens[split][layer]: token count;
    fisher[split][param]: mean over batches of the squared batch-mean gradient; batches[split]: batch count."""
    stats: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    fisher: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # what it was collected from: see `source_of`
    records: dict = field(default_factory=dict)  # collect(record=True): per split, per batch {"stats", "grads"}

    def save(self, path) -> None:
        tensors, meta = {}, {"tokens": self.tokens, "batches": self.batches, "source": self.source}
        for s, per_layer in self.stats.items():
            for layer, t in per_layer.items():
                tensors[f"stats.{s}.{layer}"] = t.contiguous().cpu()
        for s, per_param in self.fisher.items():
            for name, t in per_param.items():
                tensors[f"fisher.{s}.{name}"] = t.contiguous().cpu()
        save_file(tensors, str(path), metadata={"surgery": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "Saliency":
        """A saliency.safetensors written by `save`; anything else is refused with the file named."""
        from safetensors import SafetensorError, safe_open
        if not Path(path).is_file():
            raise FileNotFoundError(f"--saliency {path}: file not found")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["surgery"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise ValueError(f"--saliency {path}: not a saliency file written by `surgery collect` or a run "
                             f"({type(e).__name__}: {e})") from None
        sal = cls(tokens={s: {int(k): v for k, v in d.items()} for s, d in meta["tokens"].items()},
                  batches=meta["batches"], source=meta.get("source", {}))
        for key, t in load_file(str(path)).items():
            kind, s, rest = key.split(".", 2)
            if kind == "stats":
                sal.stats.setdefault(s, {})[int(rest)] = t
            else:
                sal.fisher.setdefault(s, {})[rest] = t
        return sal


def source_of(forget, retain, params: dict[str, torch.nn.Parameter], batch_size: int, held_back=(),
              images=()) -> dict:
    """What a saliency file depends on: the two data files (SHA-256), the photos their rows name (`images`: one
    SHA-256 over the sorted SHA-256s of their bytes, so a photo changed in place is seen and a moved copy is not), the
    collection batch size, the photos held back from the forget rows (--stop-forget-accuracy), and per trainable
    parameter its shape and fp64 Σθ, Σ|θ| (a cheap fingerprint of the weights it was taken on, before pruning)."""
    digest = {k: hashlib.sha256(Path(f).read_bytes()).hexdigest() for k, f in (("forget", forget), ("retain", retain))}
    photos = sorted(hashlib.sha256(Path(i).read_bytes()).hexdigest() for i in {str(i) for i in images})
    digest["images"] = hashlib.sha256("".join(photos).encode()).hexdigest()
    weights = {n: [list(p.shape), float(p.detach().double().sum()), float(p.detach().double().abs().sum())]
               for n, p in params.items()}
    photos = sorted({os.path.relpath(r.image, Path(forget).parent) for r in held_back})
    return {**digest, "collect_batch_size": batch_size, **({"held_back": photos} if photos else {}),
            "weights": weights}


def check_source(sal: Saliency, expected: dict, path, fisher: bool = True) -> None:
    """Refuse a saliency file collected from other data, another batch size or other weights, or without the Fisher
    diagonals the method needs (`fisher`)."""
    got = sal.source
    if not got:
        raise ValueError(f"--saliency {path}: records no source (written by an older surgery); collect it again")
    if fisher and not any(sal.fisher.values()):
        raise ValueError(f"--saliency {path}: holds activation statistics only, no Fisher diagonals (a manu run's); "
                         f"this method needs both: use `surgery collect`'s, or a vkd or mmu run's")
    for key, what in (("forget", "forget file"), ("retain", "retain file"),
                      ("images", "set of photos (one the rows name has changed, or the file was written before "
                                 "surgery recorded them)"),
                      ("collect_batch_size", f"collect batch size ({got.get('collect_batch_size')}, now "
                                             f"{expected['collect_batch_size']})"),
                      ("held_back", "set of held-back forget photos (--stop-forget-accuracy, --stop-holdout, --seed): "
                                    "reuse the saliency.safetensors of a run with the same --stop-forget-accuracy, "
                                    "--stop-holdout and --seed, or leave --saliency out")):
        if got.get(key) != expected.get(key):
            raise ValueError(f"--saliency {path}: collected with another {what}")
    if set(got["weights"]) != set(expected["weights"]):
        raise ValueError(f"--saliency {path}: collected for other parameters (scope or --layers differ)")
    for name, (shape, *sums) in expected["weights"].items():
        theirs = got["weights"][name]
        if theirs[0] != shape or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(theirs[1:], sums)):
            raise ValueError(f"--saliency {path}: collected on other weights ({name} differs): another model, or "
                             f"another --dtype?")


def examples(rows: list[Row]) -> list[Example]:
    return [Example(r.prompt(), r.answer, r.load_image()) for r in rows]


def batches(rows: list[Row], size: int):
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def collect(adapter: Adapter, splits: Splits, params: dict[str, torch.nn.Parameter], batch_size: int = 8,
            progress: bool = True, fisher: bool = True, world: World | None = None, start: tuple[int, int] = (0, 0),
            stop: tuple[int, int] | None = None, record: bool = False) -> Saliency:
    """Activation statistics of every vision MLP and the Fisher diagonal of `params`, per split
    (`fisher=False`: statistics only, forward passes without gradients).

    Under torchrun (`world`, default: the job this process has joined) batch i of a split runs on rank i mod N, on the
    plain model: each rank squares its own batches' gradients (DDP's averaged gradient squared is not the Fisher), and
    the sums (statistics, token counts, Fisher) are all-reduced once per split, in a fixed order. Every rank runs the
    same number of batches (a rank without a batch in the last round runs batch 0 of the split and discards it), so
    the collectives of an FSDP-sharded LLM stay matched.

    One process may take part of the pass: the batches at positions (index in SPLITS, batch index) in [start, stop)
    (`halfway`), summed, or with `record` kept one by one in `records` (each batch's statistics and gradients: the
    gradients of every batch are held) for `merge` to add onto the sums of the batches before them."""
    device = adapter.device
    world = world or World.current()
    whole = start == (0, 0) and stop is None
    if world.size > 1 and (record or not whole):
        raise ValueError("collect: start, stop and record are for one process (under torchrun every rank takes a "
                         "share of each split's batches)")
    sal = Saliency()
    current: dict = {"skip": False, "record": None}
    hooks = []
    for mlp in adapter.mlps:
        def stats_hook(module, args, layer=mlp.layer):
            if current["skip"] or recomputing():  # a checkpointed block running again in backward: counted once
                return
            z = args[0].detach()
            if current["record"] is not None:
                current["record"]["stats"][layer] = kernels.activation_stats(z)
            else:
                kernels.activation_stats(z, out=current["stats"][layer])
            current["tokens"][layer] += z.numel() // z.shape[-1]
        hooks.append(mlp.fc_out.register_forward_pre_hook(stats_hook))
    for name, p in params.items() if fisher else ():
        def fisher_hook(p, name=name):
            if current["record"] is not None:
                current["record"]["grads"][name] = p.grad
            elif not current["skip"]:
                kernels.fisher_accumulate_([current["fisher"][name]], [p.grad], scale=current["scale"])
            p.grad = None
        hooks.append(p.register_post_accumulate_grad_hook(fisher_hook))
    try:
        for k, split in enumerate(SPLITS):
            rows = splits[split]
            current["stats"] = {m.layer: torch.zeros(4, m.hidden, device=device) for m in adapter.mlps}
            current["tokens"] = {m.layer: 0 for m in adapter.mlps}
            current["fisher"] = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if fisher \
                else {}
            chunks = list(batches(rows, batch_size))
            n_batches = len(chunks)
            current["scale"] = 1.0 / max(n_batches, 1)
            mine = world.rounds(n_batches) if whole else \
                [i for i in range(n_batches) if start <= (k, i) and (stop is None or (k, i) < stop)]
            records = sal.records.setdefault(split, []) if record else None
            for i in progress_bar(mine, f"collect {split}", show=progress and world.main, leave=False):
                current["skip"] = i is None
                if record:
                    current["record"] = {"stats": {}, "grads": {}}
                    records.append(current["record"])
                batch = adapter.encode(examples(chunks[0 if i is None else i])).to(device)
                if not fisher:
                    with torch.no_grad():
                        adapter.model(**batch.inputs)
                    continue
                loss = answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()
                if not loss.requires_grad:
                    if world.main:
                        log.info("%s: no gradient path to the trainable weights (rows without an image never reach "
                                 "the vision encoder): its Fisher and vision activation statistics are zero", split)
                    break
                loss.backward()
            current["skip"], current["record"] = False, None
            _all_reduce_split(world, current, device)
            sal.stats[split], sal.tokens[split] = current["stats"], current["tokens"]
            sal.fisher[split], sal.batches[split] = current["fisher"], n_batches
    finally:
        for h in hooks:
            h.remove()
    return sal


def halfway(splits: Splits, batch_size: int) -> tuple[int, int]:
    """The position (index in SPLITS, batch index) before which half of the batches with images lie: where a pass
    split over two processes is cut (text-only splits cost one forward each)."""
    sizes = [math.ceil(sum(r.image is not None for r in splits[s]) / batch_size) for s in SPLITS]
    half = sum(sizes) // 2
    for k, n in enumerate(sizes):
        if half < n:
            return k, half
        half -= n
    return len(SPLITS), 0


def merge(head: Saliency, tail: Saliency) -> Saliency:
    """The saliency of one pass from its two parts: `head` summed the batches before a position, `tail` recorded
    those from it on (collect(start=..., record=True)). Each recorded batch is added onto head's sums in order, by
    the additions one pass makes: the result is bit-identical to it wherever a batch's statistics go into their sums
    in one addition (the reference path of `activation_stats`, on the CPU; test_saliency.py)."""
    if head.source != tail.source or head.batches != tail.batches:
        raise ValueError("merge: the two parts were collected from different data, weights or batch sizes")
    sal = Saliency(tokens={}, batches=dict(head.batches), source=head.source)
    for split in head.stats:
        stats = {layer: t.clone() for layer, t in head.stats[split].items()}
        fisher = {name: t.clone() for name, t in head.fisher[split].items()}
        scale = 1.0 / max(head.batches[split], 1)
        for rec in tail.records.get(split, []):
            for layer, s in rec["stats"].items():
                stats[layer].add_(s)
            for name, g in rec["grads"].items():
                kernels.fisher_accumulate_([fisher[name]], [g], scale=scale)
        sal.stats[split], sal.fisher[split] = stats, fisher
        sal.tokens[split] = {layer: n + tail.tokens[split][layer] for layer, n in head.tokens[split].items()}
    return sal


def _all_reduce_split(world: World, current: dict, device) -> None:
    """Sum one split's statistics, token counts and Fisher over the ranks, in place, in a fixed order."""
    if world.size == 1:
        return
    for layer in sorted(current["stats"]):
        world.all_reduce_(current["stats"][layer])
    for name in current["fisher"]:   # the order of `params`: the same on every rank
        world.all_reduce_(current["fisher"][name])
    layers = sorted(current["tokens"])
    tokens = world.all_reduce_(torch.tensor([current["tokens"][l] for l in layers], dtype=torch.float64, device=device))
    current["tokens"] = {l: int(t) for l, t in zip(layers, tokens.tolist())}


def collect_or_load(adapter: Adapter, splits: Splits, params: dict[str, torch.nn.Parameter], forget, retain,
                    batch_size: int, saliency=None, timings: dict | None = None, fisher: bool = True,
                    world: World | None = None, progress: bool = True, **span) -> Saliency:
    """Collect saliency, or reuse the file `saliency` when it was collected from the same data, batch size and
    weights (refused otherwise). `span`: collect's start, stop and record (a part of the pass)."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    images = [r.image for s in (*SPLITS, "held_back") for r in splits[s] if r.image is not None]
    source = source_of(forget, retain, params, batch_size, splits.held_back, images)
    if saliency:
        sal = Saliency.load(saliency)
        check_source(sal, source, saliency, fisher)
        log.info("saliency reused from %s", saliency)
        timings["saliency_load_s"] = time.perf_counter() - t
        return sal
    sal = collect(adapter, splits, params, batch_size=batch_size, progress=progress, fisher=fisher, world=world,
                  **span)
    sal.source = source
    timings["collect_s"] = time.perf_counter() - t
    return sal
