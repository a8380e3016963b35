"""Cached teacher features: the vanilla model's projector output for each retain-VQA row (VKD's t in ‖f − t‖²),
computed once, before any edit.

They stay in memory when they fit `--teacher-memory` (GiB; every rank computes all rows, no exchange). Above it they go
to safetensors files in a fresh directory under `--teacher-cache` (default: beside --out; it must be visible to every
rank, and is removed after the run): rank r computes rows r, r+N, ..., every rank memory-maps every file, so a machine
holds one copy in its page cache and a row is read when a batch asks for it.
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
    """features[i]: row i's teacher features [tokens_i, D] on the CPU, from memory or from memory-mapped files."""

    def __init__(self, rows: list[torch.Tensor] | None = None, files: list[Path] = ()):
        self.rows, self.where = rows, {}
        for path in files:
            handle = safe_open(str(path), framework="pt")
            self.where.update({int(key): handle for key in handle.keys()})

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.where)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i] if self.rows is not None else self.where[i].get_tensor(str(i))


def cache(ctx, rows: list, features, batch_size: int) -> Features:
    """Teacher features of `rows` from `features(rows) -> [tensor per row]` (the vanilla model's projector output), in
    memory or on disk (see the module docstring). The size is estimated from the first row."""
    if not rows:
        return Features([])
    first = features(rows[:1])[0]
    need = first.numel() * first.element_size() * len(rows)
    if need <= ctx.cfg.teacher_memory_gb * 2**30:
        return Features(features(rows))
    world = ctx.world
    parent = Path(ctx.cfg.teacher_cache or Path(ctx.cfg.out).resolve().parent)
    if world.main:
        parent.mkdir(parents=True, exist_ok=True)
    directory = Path(world.broadcast(tempfile.mkdtemp(prefix=".surgery-teacher-", dir=parent) if world.main else None))
    ctx.scratch.append(directory)
    if world.main:
        log.info("VKD teacher features: about %.1f GiB for %d rows, over --teacher-memory %.1f GiB: memory-mapped from "
                 "%s", need / 2**30, len(rows), ctx.cfg.teacher_memory_gb, directory)
    mine = list(range(world.rank, len(rows), world.size))
    chunk, size, files = {}, 0, 0
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        for i, t in zip(part, features([rows[i] for i in part])):
            chunk[str(i)] = t.contiguous()
            size += t.numel() * t.element_size()
        if size >= FILE_BYTES or start + batch_size >= len(mine):
            save_file(chunk, str(directory / f"rank{world.rank}-{files}.safetensors"))
            chunk, size, files = {}, 0, files + 1
    world.barrier()   # every rank's files are complete
    cached = Features(files=sorted(directory.glob("*.safetensors")))
    if len(cached) != len(rows):
        raise RuntimeError(f"teacher cache {directory}: {len(cached)} of {len(rows)} rows found (is the directory "
                           "visible to every rank? pass --teacher-cache on a shared file system)")
    return cached
