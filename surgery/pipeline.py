"""The whole method as library calls: collect -> select -> prune -> unlearn -> save. The CLI is a thin shell."""
import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from . import __version__, ops
from .config import Config
from .data import load_splits
from .models import load, save
from .prune import prune, pruned_entries
from .saliency import Saliency, check_source, collect, source_of
from .select import fisher_mask, neuron_importance, select_neurons
from .unlearn import projector_features, unlearn

log = logging.getLogger("surgery")


def resolve_dtype(cfg: Config) -> torch.dtype:
    if cfg.dtype == "auto":  # bf16 autocast on these CPUs is 5-19x slower than fp32
        return torch.bfloat16 if str(cfg.device).startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[cfg.dtype]


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device on this machine "
                         f"({torch.cuda.device_count()} visible)")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary sibling of `out`; rename it to `out` only when the block completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_name() -> str:
    """The processor's model name (training on the CPU is only bit-reproducible on the same kind of CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import numpy
    import PIL
    env = {"surgery": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": numpy.__version__, "pillow": PIL.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
           "device": str(device), "ops_backend": ops.backend(device) if hasattr(ops, "backend") else "reference"}
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def prepare(cfg: Config):
    """Validate data, load the model, freeze everything outside the scope.
    Returns (splits, adapter, params, layers): the trainable parameters and the vision layers selected."""
    seed_everything(cfg.seed)
    check_device(cfg.device)
    splits = load_splits(cfg.forget, cfg.retain)
    log.info("splits: %s", splits.counts())
    adapter = load(cfg.model, device=cfg.device, dtype=resolve_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                   seed=cfg.seed)
    layers = range(cfg.layers[0], cfg.layers[1] + 1) if cfg.layers else None
    mlps = adapter.select_layers(layers)
    params = adapter.scope_params(cfg.scope, mlps)
    selected = [m.layer for m in mlps]
    if not params:
        raise ValueError(f"scope {cfg.scope!r} with --layers {cfg.layers} selects no parameters")
    adapter.train_only(params)
    return splits, adapter, params, selected


def run_collect(cfg: Config, adapter, splits, params, timings: dict) -> Saliency:
    """Collect saliency, or reuse cfg.saliency when it was collected from the same data, batch size and weights."""
    t = time.perf_counter()
    source = source_of(cfg.forget, cfg.retain, params, cfg.collect_batch_size)
    if cfg.saliency:
        sal = Saliency.load(cfg.saliency)
        check_source(sal, source, cfg.saliency)
        log.info("saliency reused from %s", cfg.saliency)
        timings["saliency_load_s"] = time.perf_counter() - t
        return sal
    sal = collect(adapter, splits, params, batch_size=cfg.collect_batch_size)
    sal.source = source
    timings["collect_s"] = time.perf_counter() - t
    return sal


def prune_and_mask(cfg: Config, overwrite: bool = False) -> dict:
    """collect -> select -> prune -> unlearn -> save (HF checkpoint, masks, saliency, report.json) into cfg.out."""
    out = Path(cfg.out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")
    if Path(cfg.model).is_dir() and out.resolve() == Path(cfg.model).resolve():
        raise ValueError("--out must differ from --model: the input checkpoint is never modified")
    t0, timings = time.perf_counter(), {}
    splits, adapter, params, layers = prepare(cfg)
    with atomic_dir(out, overwrite) as tmp:
        sal = run_collect(cfg, adapter, splits, params, timings)
        sal.save(tmp / "saliency.safetensors")

        t = time.perf_counter()
        teacher = projector_features(adapter, splits.rvqa, cfg.collect_batch_size)
        timings["teacher_s"] = time.perf_counter() - t

        importance = neuron_importance(sal, layers, cfg.eps)
        neurons = select_neurons(importance, cfg.prune_threshold, None if cfg.prune_threshold is not None else cfg.prune_frac)
        t = time.perf_counter()
        prune(adapter, neurons)
        timings["prune_s"] = time.perf_counter() - t
        pruned = pruned_entries(adapter, neurons, params)
        mask = {n: m & ~pruned[n] for n, m in fisher_mask(sal, cfg.mask_threshold, cfg.mask_frac, cfg.eps).items()}
        save_file({**{f"neurons.{l}": idx.contiguous() for l, idx in neurons.items()},
                   **{f"importance.{l}": imp.contiguous().cpu() for l, imp in importance.items()},
                   **{f"mask.{n}": m.contiguous().cpu() for n, m in mask.items()}}, str(tmp / "masks.safetensors"))
        log.info("pruned %d neurons; Fisher mask keeps %d of %d weights",
                 sum(i.numel() for i in neurons.values()), sum(int(m.sum()) for m in mask.values()),
                 sum(m.numel() for m in mask.values()))

        t = time.perf_counter()
        history = unlearn(adapter, splits, params, mask, pruned, teacher, alpha=cfg.alpha, beta=cfg.beta, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, steps=cfg.steps, batch_size=cfg.batch_size,
                          max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
        timings["unlearn_s"] = time.perf_counter() - t
        adapter.train_only({})
        save(adapter, tmp)
        timings["total_s"] = time.perf_counter() - t0
        report = {
            "config": cfg.to_dict(), "seed": cfg.seed, "dtype": str(resolve_dtype(cfg)).replace("torch.", ""),
            "environment": environment(adapter.device), "timings": timings, "splits": splits.counts(),
            "scope": {"parameters": len(params), "weights": sum(p.numel() for p in params.values()),
                      "live_layers": [adapter.live_layers.start, adapter.live_layers.stop - 1], "layers": layers},
            "pruned_neurons": {str(l): int(i.numel()) for l, i in neurons.items()},
            "masked_weights": {n: int(m.sum()) for n, m in mask.items()},
            "losses": history,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s in %.1fs", out, timings["total_s"])
    return report
