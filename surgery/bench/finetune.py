"""The vanilla model: a small LLaVA-architecture model fine-tuned (all weights) on the benchmark's training rows,
so that it knows every person, by face and by name. Unlearning starts from it.

Two stages: the vision tower learns more slowly than the text side at this scale, so a first stage teaches
image -> name only ("Who is the person in the image?"); the second trains on every row.
"""
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_jsonl
from ..models import Adapter, Example, answer_loss, save
from ..models.tiny import tiny_llava
from .make_bench import bench_texts

log = logging.getLogger("surgery")


@dataclass
class FinetuneConfig:
    seed: int = 0
    epochs: int = 12             # stage 2: every training row
    name_epochs: int = 4         # stage 1: image -> name rows only
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup_steps: int = 30
    vision_layers: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 256
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 2
    vocab_size: int = 1024
    threads: int = 0             # 0: torch's default
    without_forget_images: bool = False  # the reference model: forget people known by name, faces never seen


def bench_rows(path) -> list[tuple]:
    """(Row, raw JSON object) pairs of a benchmark file: the raw object keeps our extra keys (task, attribute)."""
    rows = load_jsonl(path)
    raw = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(zip(rows, raw))


def training_rows(bench: Path, without_forget_images: bool = False) -> list[tuple]:
    """train.jsonl as (Row, raw) pairs; optionally without the forget people's image rows. That gives the
    reference model unlearning aims at (the "retrained" model of unlearning papers): it learns the forget people's
    facts from the QA rows but never sees their faces."""
    rows = bench_rows(bench / "train.jsonl")
    if not without_forget_images:
        return rows
    forget = {raw.get("entity") for _, raw in bench_rows(bench / "forget.jsonl")}
    kept = [(r, raw) for r, raw in rows if not (r.is_vqa and raw.get("entity") in forget)]
    log.info("without the forget people's images: %d of %d training rows (%d forget people)", len(kept), len(rows),
             len(forget))
    return kept


def to_examples(rows, images=None) -> list[Example]:
    """Examples with each image decoded once (`images`: an `evaluate.ImageCache` shared across calls)."""
    from .evaluate import ImageCache
    images = images or ImageCache()
    return [Example(r.prompt(), r.answer, images(r)) for r in rows]


def train_epochs(adapter: Adapter, examples: list[Example], params, *, epochs: int, lr: float, batch_size: int,
                 seed: int, weight_decay: float = 0.0, warmup_steps: int = 0, desc: str = "train",
                 on_epoch=None) -> list[float]:
    """AdamW over `params` for `epochs` shuffled passes, linear warmup then cosine decay. Returns the mean
    loss per epoch; `on_epoch(epoch)` is called after each epoch (for per-epoch evaluation)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1))
                                              * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    losses = []
    adapter.model.train()
    for epoch in range(1, epochs + 1):
        order = list(range(len(examples)))
        rng.shuffle(order)
        total, bar = 0.0, tqdm(range(0, len(order), batch_size), desc=f"{desc} {epoch}/{epochs}", leave=False)
        for i in bar:
            batch = adapter.encode([examples[j] for j in order[i:i + batch_size]]).to(adapter.device)
            loss = answer_loss(adapter.model(**batch.inputs).logits, batch.labels).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item() * len(batch.labels)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total / len(examples))
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch, epochs, losses[-1])
        if on_epoch is not None:
            adapter.model.eval()
            on_epoch(epoch)
            adapter.model.train()
    adapter.model.eval()
    return losses


def train_accuracy(adapter: Adapter, bench: Path) -> dict:
    """Option-likelihood accuracy (%) on the multiple-choice training rows of the forget and retain people."""
    from .evaluate import percent, score_likelihood
    out = {}
    for split in ("forget", "retain"):
        rows = [r for r in load_jsonl(bench / f"{split}.jsonl") if r.options]
        for kind, group in (("vqa", [r for r in rows if r.is_vqa]), ("qa", [r for r in rows if not r.is_vqa])):
            out[f"{split}_{kind}"] = percent(score_likelihood(adapter, group)) if group else None
    log.info("training-row accuracy: %s", {k: round(v, 1) for k, v in out.items() if v is not None})
    return out


def build_model(bench, cfg: FinetuneConfig) -> Adapter:
    """A fresh tiny LLaVA whose tokenizer is trained on the benchmark's own text (short sequences)."""
    params = json.loads((Path(bench) / "bench.json").read_text())["params"]
    corpus = bench_texts(bench) + ["USER: <image>\n ASSISTANT:"]
    model, tok, ip = tiny_llava(seed=cfg.seed, corpus=corpus, image_size=params["image_size"],
                                patch_size=cfg.patch_size, vision_layers=cfg.vision_layers,
                                vision_hidden=cfg.vision_hidden, vision_intermediate=cfg.vision_intermediate,
                                text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, vocab_size=cfg.vocab_size)
    return Adapter(model, tok, ip, None)


def check_bench(bench) -> Path:
    bench = Path(bench)
    missing = [f for f in ("bench.json", "train.jsonl", "forget.jsonl") if not (bench / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--bench {bench}: not a benchmark directory (missing {', '.join(missing)}; "
                                "create one with `surgery make-bench`)")
    return bench


def finetune(bench, out, cfg: FinetuneConfig | None = None, overwrite: bool = False) -> dict:
    """Train the vanilla model on `bench`/train.jsonl and save it to `out` (atomically). Returns a report."""
    from ..pipeline import atomic_dir, seed_everything
    cfg = cfg or FinetuneConfig()
    bench, out = check_bench(bench), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    rows = training_rows(bench, cfg.without_forget_images)
    adapter = build_model(bench, cfg)
    everything = to_examples([r for r, _ in rows])
    names = [e for e, (_, raw) in zip(everything, rows) if raw.get("attribute") == "name" and e.image is not None]
    params = [p for p in adapter.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    losses = {}
    if cfg.name_epochs:
        losses["names"] = train_epochs(adapter, names, params, epochs=cfg.name_epochs, lr=cfg.lr,
                                       batch_size=cfg.batch_size, seed=cfg.seed, weight_decay=cfg.weight_decay,
                                       warmup_steps=cfg.warmup_steps, desc="finetune names")
    losses["all"] = train_epochs(adapter, everything, params, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                 seed=cfg.seed + 1, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                 desc="finetune")
    for p in params:
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    report = {"config": asdict(cfg), "bench": str(bench), "rows": len(everything), "name_rows": len(names),
              "losses": losses, "seconds": seconds, "train_accuracy": train_accuracy(adapter, bench),
              "weights": sum(p.numel() for p in params), "vocab": len(adapter.tokenizer)}
    with atomic_dir(out, overwrite) as tmp:
        save(adapter, tmp)
        (tmp / "finetune.json").write_text(json.dumps(report, indent=2))
    log.info("vanilla model: %s (trained in %.0fs)", out, seconds)
    return report
