"""Cached teacher features: the vanilla model's projector output for each retain-VQA row (VKD's t in ‖f − t‖²),
computed once, before any edit, and once per photo: the features depend on the image alone, and a benchmark asks
several questions about each photo (MLLMU-Bench's VQA rows, ours: 5 per photo), so the rows of one photo share one
entry (that many times less compute, memory and disk).

They stay in memory when they fit `--teacher-memory` (GiB; every rank computes every photo, no exchange). Above it they
go to safetensors files in a fresh directory under `--teacher-cache` (default: beside --out; it must be visible to
every rank, and is removed after the run): rank r computes photos r, r+N, ..., every rank memory-maps every file, so a
machine holds one copy in its page cache and a photo is read when a batch asks for it.
"""
import logging
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("surgery")
FILE_BYTES = 1 << 30     # features per file on disk


class Features:
    """features[i]: row i's teacher features [tokens_i, D] on the CPU: entry photo[i] of one per photo, from memory
    (`photos`) or from memory-mapped files (`files`, keyed by entry)."""

    def __init__(self, photo: list[int], photos: list[torch.Tensor] | None = None, files: list[Path] = ()):
        self.photo, self.photos, self.where = photo, photos, {}
        for path in files:
            handle = safe_open(str(path), framework="pt")
            self.where.update({int(key): handle for key in handle.keys()})

    def __len__(self) -> int:
        return len(self.photo)

    def entries(self) -> int:
        """How many features are held: one per photo."""
        return len(self.photos) if self.photos is not None else len(self.where)

    def __getitem__(self, i: int) -> torch.Tensor:
        j = self.photo[i]
        return self.photos[j] if self.photos is not None else self.where[j].get_tensor(str(j))


def by_photo(rows: list) -> tuple[list[int], list]:
    """(for each row the index of its photo, the first row of each photo), photos in order of first appearance."""
    index, photo, first = {}, [], []
    for r in rows:
        if r.image not in index:
            index[r.image] = len(first)
            first.append(r)
        photo.append(index[r.image])
    return photo, first


def cache(ctx, rows: list, features, batch_size: int) -> Features:
    """Teacher features of `rows` from `features(rows) -> [tensor per row]` (the vanilla model's projector output), one
    per photo (`r.image`), in memory or on disk (see the module docstring). The size is estimated from the first."""
    photo, photos = by_photo(rows)
    if not photos:
        return Features(photo, [])
    first = features(photos[:1])[0]
    need = first.numel() * first.element_size() * len(photos)
    if need <= ctx.cfg.teacher_memory_gb * 2**30:
        return Features(photo, features(photos))
    world = ctx.world
    parent = Path(ctx.cfg.teacher_cache or Path(ctx.cfg.out).resolve().parent).resolve()
    made = [a for a in [parent, *parent.parents] if not a.exists()]    # deepest first: the ones made here
    if world.main:
        parent.mkdir(parents=True, exist_ok=True)
    directory = Path(world.broadcast(tempfile.mkdtemp(prefix=".surgery-teacher-", dir=parent) if world.main else None))
    ctx.scratch.append(directory)
    if world.main:                          # removed too, once empty, after the scratch inside: nothing is left behind
        ctx.scratch.extend(made)
    if world.main:
        log.info("VKD teacher features: about %.1f GiB for %d photos, over --teacher-memory %.1f GiB: memory-mapped "
                 "from %s", need / 2**30, len(photos), ctx.cfg.teacher_memory_gb, directory)
    mine = list(range(world.rank, len(photos), world.size))
    chunk, size, files = {}, 0, 0
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        for i, t in zip(part, features([photos[i] for i in part])):
            chunk[str(i)] = t.contiguous()
            size += t.numel() * t.element_size()
        if size >= FILE_BYTES or start + batch_size >= len(mine):
            save_file(chunk, str(directory / f"rank{world.rank}-{files}.safetensors"))
            chunk, size, files = {}, 0, files + 1
    world.barrier()   # every rank's files are complete
    cached = Features(photo, files=sorted(directory.glob("*.safetensors")))
    if cached.entries() != len(photos):
        raise RuntimeError(f"teacher cache {directory}: {cached.entries()} of {len(photos)} photos found (is the "
                           "directory visible to every rank? pass --teacher-cache on a shared file system)")
    return cached
