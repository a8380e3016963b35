"""Stage a of the vanilla model: the vision tower's pretraining, CLIP-style, on a large population of faces.

A real LLaVA's CLIP tower learned faces from a web crawl long before the LLM ever saw a question about them. Here
the tower learns to tell people apart from their photos: for every photo in the benchmark's
`pretrain.jsonl` (the tower views of the benchmark people and of hundreds of extra identities that appear
nowhere else), it predicts who it is and each of their facial attributes (the words a caption would use: hair
colour, glasses, beard, ...). The attributes are shared by many people, so they give every photo dense supervision
and the identity head learns on top of features that generalise; the identity head is what makes the tower know
*these* people.

The heads read LLaVA's `vision_feature_layer` (-2: the penultimate layer's output) through attention pooling over
its patch tokens, CLS dropped: exactly the tokens the projector receives, so whatever identifies a person is
there for the LLM to read. (A CLS head on the last layer, CLIP's own, would leave identity where LLaVA never looks.)
The layers past the feature layer get no gradient; LLaVA never reads them either.

The reference model's tower is pretrained the same way without the forget people's photos.
"""
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..models import Adapter
from .make_bench import FACE
from .training import train_loop

log = logging.getLogger("surgery")


def pretrain_rows(bench, without: set[str] = frozenset()) -> list[dict]:
    """The rows of `bench`/pretrain.jsonl ({"image", "entity", "face"}), leaving out the people in `without`."""
    path = Path(bench) / "pretrain.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--bench {bench}: no pretrain.jsonl (made by `surgery make-bench` since version 2)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if not {"image", "entity", "face"} <= set(row):
            raise ValueError(f"{path}:{n}: a pretraining row needs 'image', 'entity' and 'face'")
        if row["entity"] in without:
            continue
        rows.append(row)
    return rows


def pixel_values(adapter: Adapter, bench, images: list[str], batch_size: int = 256) -> torch.Tensor:
    """The model's own image preprocessing of each file: [N, 3, S, S]."""
    out = []
    for i in range(0, len(images), batch_size):
        pil = []
        for rel in images[i:i + batch_size]:
            with Image.open(Path(bench) / rel) as im:
                pil.append(im.convert("RGB"))
        out.append(adapter.image_processor(images=pil, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def feature_layer_output(adapter: Adapter, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector, computed without the layers it never reads: the patch tokens (CLS dropped)
    of hidden state `vision_feature_layer`, [B, P, H]."""
    tower = adapter.model.model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(pixels))
    for i in adapter.live_layers:
        h = tower.encoder.layers[i](h, None)
    return h[:, 1:]


def in_chunks(fn, pixels: torch.Tensor, size: int = 256) -> torch.Tensor:
    """fn over `pixels` a chunk at a time, without gradients, concatenated."""
    with torch.no_grad():
        return torch.cat([fn(pixels[i:i + size]) for i in range(0, len(pixels), size)])


def features(adapter: Adapter, bench, images: list[str]) -> dict[str, torch.Tensor]:
    """The (frozen) tower's feature-layer patch tokens of each photo (paths relative to `bench`, or absolute),
    computed once: {path: [P, H]}."""
    tokens = in_chunks(lambda x: feature_layer_output(adapter, x), pixel_values(adapter, bench, images))
    return dict(zip(images, tokens))


class PretrainHead(nn.Module):
    """Attention pooling of the feature-layer patch tokens (one learned query), then a linear classifier for
    the identity and one per facial attribute. Discarded after pretraining."""

    def __init__(self, hidden: int, identities: int, attributes: dict[str, int]):
        super().__init__()
        self.norm_in = nn.LayerNorm(hidden)
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.pool = nn.MultiheadAttention(hidden, 4, batch_first=True)
        self.norm_out = nn.LayerNorm(hidden)
        self.identity = nn.Linear(hidden, identities)
        self.attributes = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in attributes.items()})

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = self.norm_in(tokens)
        pooled = self.norm_out(self.pool(self.query.expand(len(tokens), -1, -1), tokens, tokens,
                                         need_weights=False)[0][:, 0])
        return self.identity(pooled), {k: head(pooled) for k, head in self.attributes.items()}


def pretrain(adapter: Adapter, bench, rows: list[dict], *, epochs: int, lr: float, batch_size: int, seed: int,
             weight_decay: float, warmup_steps: int, desc: str = "tower",
             paired_without: set[str] = frozenset()) -> tuple[dict, dict]:
    """Train the tower's live layers (and a fresh head) to name the identity and facial attributes of every
    photo in `rows`. Returns (report, head weights); the report lists the identities in the head's order.
    `paired_without`: people whose photos are never opened nor shown, the run otherwise paired with the one over
    every row (`training.train_loop`'s skip: the same batches and steps, less their photos; the head keeps a class
    for each of them, never a target)."""
    t0 = time.perf_counter()
    identities = sorted({r["entity"] for r in rows})
    index = {e: i for i, e in enumerate(identities)}
    keys = sorted(rows[0]["face"])
    values = {k: FACE[k] for k in keys}
    skip = frozenset(i for i, r in enumerate(rows) if r["entity"] in paired_without)
    shown = [i for i in range(len(rows)) if i not in skip]
    at = torch.zeros(len(rows), dtype=torch.long)      # row -> its photo among those opened
    at[shown] = torch.arange(len(shown))
    pixels = pixel_values(adapter, bench, [rows[i]["image"] for i in shown])
    target = torch.tensor([index[r["entity"]] for r in rows])
    attrs = torch.tensor([[r["face"][k] for k in keys] for r in rows])
    torch.manual_seed(seed)
    head = PretrainHead(adapter.model.config.vision_config.hidden_size, len(identities), values)
    tower = adapter.model.model.vision_tower
    params = [p for p in tower.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    tower.train()

    def loss(batch: list[int]) -> torch.Tensor:
        logits, attr_logits = head(feature_layer_output(adapter, pixels[at[batch]]))
        return nn.functional.cross_entropy(logits, target[batch]) + sum(
            nn.functional.cross_entropy(attr_logits[k], attrs[batch, j]) for j, k in enumerate(keys))

    losses = train_loop(params, len(rows), loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, desc=desc, skip=skip)
    tower.eval()
    for p in params:
        p.requires_grad_(False)
    accuracy = 100.0 * int((predict(adapter, head, pixels) == target[shown]).sum()) / len(shown)
    log.info("%s: %d photos of %d identities, %d epochs: loss %.3f, identity accuracy on them %.1f %%",
             desc, len(shown), len(identities) - len(paired_without & set(identities)), epochs,
             losses[-1] if losses else float("nan"), accuracy)
    report = {"photos": len(shown), "identities": identities, "losses": losses,
              "train_identity_accuracy": accuracy, "seconds": time.perf_counter() - t0}
    return report, {k: v.detach().clone() for k, v in head.state_dict().items()}


def predict(adapter: Adapter, head: PretrainHead, pixels: torch.Tensor) -> torch.Tensor:
    """The head's identity (index) for each photo."""
    return in_chunks(lambda x: head(feature_layer_output(adapter, x))[0].argmax(-1), pixels)


def identity_accuracy(adapter: Adapter, bench, rows: list[dict], identities: list[str], weights: dict) -> float:
    """Top-1 identity accuracy (%) of the pretrained tower with its head (`pretrain`'s identities and head weights)
    on the photos of `rows`, e.g. {"image", "entity"} of the dev views."""
    index = {e: i for i, e in enumerate(identities)}
    attributes = {k.split(".")[1]: v.shape[0] for k, v in weights.items()
                  if k.startswith("attributes.") and k.endswith(".weight")}
    head = PretrainHead(adapter.model.config.vision_config.hidden_size, len(identities), attributes)
    head.load_state_dict(weights)
    pixels = pixel_values(adapter, bench, [r["image"] for r in rows])
    target = torch.tensor([index.get(r["entity"], -1) for r in rows])
    return 100.0 * int((predict(adapter, head, pixels) == target).sum()) / len(rows)
