"""A run as library calls: load and validate -> the method's prepare step -> the shared loop -> save, atomically,
with report.json. The CLI is a thin shell over `run` (any method) and `prune_and_mask` (VKD)."""
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from . import __version__, distributed, methods, ops
from .config import Config
from .data import SPLITS, check_placeholder, hold_back, load_splits
from .methods.loop import check_run
from .models import load, save
from .saliency import Saliency, collect_or_load, halfway, merge

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
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: surgery runs on cpu or cuda (cuda:1, ...), not on {dev.type}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA device on this machine "
                         f"({torch.cuda.device_count()} visible)")


@contextmanager
def torch_threads(n: int):
    """Run the block on `n` torch CPU threads (0: leave as set). Small models are sensitive to how float reductions
    are split over threads: a trained model (and the benchmark's numbers) is reproducible only at a fixed count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def atomic_dir(out: Path, overwrite: bool, inputs=None, keep=None):
    """Yield a temporary sibling of `out`; rename it to `out` only when the block completes. `out` is checked first
    (`check_out`, with the run's `inputs` and the directories to `keep`)."""
    check_out(out, overwrite, inputs, keep)
    out = Path(out).resolve()  # "." and ".." have no name to make a sibling from
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
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),     # None: oneDNN picks by the CPU (not pinned)
           "device": str(device), "ops_backend": ops.backend(device) if hasattr(ops, "backend") else "reference"}
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def provenance(cfg: Config, device) -> dict:
    """What every report.json records of how it was made: the config, seed, dtype and environment."""
    return {"config": cfg.to_dict(), "seed": cfg.seed, "dtype": str(resolve_dtype(cfg)).replace("torch.", ""),
            "environment": environment(device)}


def resolve(cfg: Config) -> tuple[Config, "methods.Method"]:
    """The method named by cfg.method, and cfg with the method's defaults in the fields left None."""
    method = methods.get(cfg.method)
    filled = {"scope": method.default_scope, **method.defaults}
    return replace(cfg, **{k: v for k, v in filled.items() if getattr(cfg, k) is None}), method


def prepare(cfg: Config, world: distributed.World | None = None, method: "methods.Method | None" = None):
    """Validate data, load the model, freeze everything outside the scope; then, as asked, shard the frozen LLM over
    the ranks (--shard-llm; the model is loaded on the CPU first) and checkpoint its decoder layers (--checkpoint-llm)
    and the vision tower's blocks (--checkpoint-vision).
    `method`: its check_inputs runs on the settings and data before the model is loaded.
    Returns (splits, adapter, params, layers): the trainable parameters and the vision layers selected."""
    world = world or distributed.World.current()
    check_run(cfg)
    world.check_same_settings(cfg.to_dict())
    seed_everything(cfg.seed)
    check_device(cfg.device)
    splits = load_splits(cfg.forget, cfg.retain)
    if cfg.stop_forget_accuracy is not None:
        splits = hold_back(splits, cfg.stop_holdout, cfg.seed)
        log.info("--stop-forget-accuracy: %d forget-VQA rows (%d photos) held back to measure forgetting on",
                 len(splits.held_back), len({str(r.image) for r in splits.held_back}))
    log.info("splits: %s", splits.counts())
    if method is not None:
        method.check_inputs(cfg, splits)
    adapter = load(cfg.model, device="cpu" if shards_llm(cfg, world) else cfg.device, dtype=resolve_dtype(cfg),
                   trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    check_placeholder([r for name in (*SPLITS, "held_back") for r in splits[name]], adapter.image_placeholder)
    layers = range(cfg.layers[0], cfg.layers[1] + 1) if cfg.layers else None
    mlps = adapter.select_layers(layers)
    params = adapter.scope_params(cfg.scope or "mlp", mlps)
    selected = [m.layer for m in mlps]
    if not params:
        raise ValueError(f"scope {cfg.scope!r} with --layers {cfg.layers} selects no parameters")
    if cfg.layers and (cfg.scope or "mlp") != "mlp":
        log.warning("--layers %d-%d with --scope %s: the layers choose the MLPs whose statistics are collected and "
                    "whose neurons are ranked and pruned; every weight of the scope (%d tensors) trains",
                    *cfg.layers, cfg.scope, len(params))
    adapter.train_only(params)
    lay_out(cfg, adapter, world)
    return splits, adapter, params, selected


def shards_llm(cfg: Config, world: distributed.World) -> bool:
    """Whether --shard-llm shards anything: only over two or more ranks (then the model is loaded on the CPU first)."""
    return cfg.shard_llm and world.size > 1


def lay_out(cfg: Config, adapter, world: distributed.World) -> None:
    """The memory options on a loaded, frozen model: shard the LLM over the ranks (--shard-llm; the model was loaded
    on the CPU), checkpoint its decoder layers (--checkpoint-llm) and the vision tower's blocks (--checkpoint-vision);
    --offload-optimizer is the loop's (MaskedAdamW(offload=True)), only logged here."""
    if shards_llm(cfg, world):
        units = distributed.shard_llm(adapter, world, cfg.device)
        log.info("--shard-llm: the language model in %d FSDP units over %d ranks; vision tower and projector "
                 "replicated", units, world.size)
    elif cfg.shard_llm:
        log.info("--shard-llm: one process, nothing to shard")
    if cfg.checkpoint_llm:
        log.info("--checkpoint-llm: %d decoder layers recompute their activations in backward",
                 distributed.checkpoint_llm(adapter))
    if cfg.checkpoint_vision:
        log.info("--checkpoint-vision: %d vision blocks recompute their activations in backward",
                 distributed.checkpoint_vision(adapter))
    if cfg.offload_optimizer:
        log.info("--offload-optimizer: the optimizer state in pinned host memory, streamed through the GPU in each "
                 "step" if str(cfg.device).startswith("cuda") else "--offload-optimizer: on the CPU the state is "
                 "already in host memory; nothing moves")


def peak_rss() -> int:
    """This process's peak resident memory in bytes. On Linux VmHWM, the high-water mark of its own address space:
    getrusage's ru_maxrss (the fallback elsewhere) survives fork and exec, so a run started by a larger parent
    reported the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(device) -> dict:
    """Peak resident memory of this process (bytes), and the CUDA allocator's peak on a GPU run."""
    peak = {"peak_rss_bytes": peak_rss()}
    if str(device).startswith("cuda"):
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def run(cfg: Config, overwrite: bool = False, progress: bool = True) -> dict:
    """Unlearn with cfg.method: load -> the method's prepare (selection, pruning, masks) -> the shared loop -> save
    the model, the method's files and report.json into cfg.out (atomically: a failure leaves nothing)."""
    cfg, method = resolve(cfg)
    if not method.trains and (cfg.stop_forget_loss is not None or cfg.stop_forget_accuracy is not None):
        raise ValueError(f"{method.name} does not train: --stop-forget-loss / --stop-forget-accuracy do not apply")
    out = Path(cfg.out)
    check_out(out, overwrite, run_inputs(cfg))
    check_teacher_cache(cfg)
    with distributed.launch(cfg.device) as (world, device):
        cfg = replace(cfg, device=device)
        t0 = time.perf_counter()
        splits, adapter, params, layers = prepare(cfg, world, method)
        if str(cfg.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(cfg.device)
        # only rank 0 writes; every rank reaches the final barrier before its directory becomes `out`
        with atomic_dir(out, overwrite, run_inputs(cfg)) if world.main else nullcontext() as tmp, scratch() as dirs:
            ctx = methods.Context(cfg, adapter, splits, params, layers, out=tmp, world=world, scratch=dirs)
            if method.needs_vanilla:
                ctx.snapshot_vanilla()
            t = time.perf_counter()
            method.prepare(ctx)
            ctx.timings["prepare_s"] = time.perf_counter() - t
            world.check_same("pruned neurons and masks", {**{f"pruned.{n}": m for n, m in ctx.pruned.items()},
                                                          **{f"mask.{n}": m for n, m in (ctx.mask or {}).items()}})
            history = methods.train(ctx, method, progress) if method.trains else []
            if not method.trains and (cfg.steps or cfg.epochs):
                log.info("%s is training-free: --steps/--epochs ignored", method.name)
            adapter.train_only({})
            state = distributed.full_state_dict(adapter.model)   # a collective when the LLM is sharded
            ctx.timings["total_s"] = time.perf_counter() - t0
            report = {
                "method": method.name, **provenance(cfg, adapter.device),
                "world_size": world.size, "timings": ctx.timings, "memory": peak_memory(adapter.device),
                "splits": splits.counts(),
                "scope": {"name": cfg.scope, "parameters": len(params),
                          "weights": sum(p.numel() for p in params.values()),
                          "live_layers": [adapter.live_layers.start, adapter.live_layers.stop - 1], "layers": layers},
                "trainable_weights": sum(p.numel() for p in params.values()) if method.trains else 0,
                **ctx.info, "losses": history,
            }
            if world.main:
                report["checkpoint"] = save(adapter, tmp, state_dict=state)
                (tmp / "report.json").write_text(json.dumps(report, indent=2))
            world.barrier()
        log.info("wrote %s in %.1fs", out, ctx.timings["total_s"])
    return report


@contextmanager
def scratch():
    """A list the run adds its scratch directories to (`Context.scratch`); removed at the end, success or not: its
    own (`.surgery-*`) with what they hold, any other (a --teacher-cache the run made for them) only if empty, since
    another run may have put its scratch there meanwhile."""
    dirs = []
    try:
        yield dirs
    finally:
        own = [d for d in dirs if Path(d).name.startswith(".surgery-")]
        for d in own:                                       # the scratch first, then what held it
            shutil.rmtree(d, ignore_errors=True)
        for d in (d for d in dirs if d not in own):
            try:
                Path(d).rmdir()
            except OSError:
                pass


def collect_saliency(cfg: Config, overwrite: bool = False, progress: bool = True) -> dict:
    """Activation statistics and Fisher diagonals per split into cfg.out/saliency.safetensors, with report.json
    (atomically). Under torchrun the batches are spread over the ranks and rank 0 writes. Returns the report."""
    check_out(cfg.out, overwrite, run_inputs(cfg))
    with distributed.launch(cfg.device) as (world, device):
        cfg = replace(cfg, device=device)
        splits, adapter, params, _ = prepare(cfg, world)
        timings = {}
        sal = collect_or_load(adapter, splits, params, cfg.forget, cfg.retain, cfg.collect_batch_size,
                              timings=timings, world=world, progress=progress)
        report = {**provenance(cfg, adapter.device), "world_size": world.size, "timings": timings,
                  "splits": splits.counts()}
        if world.main:
            write_saliency(cfg.out, sal, report, overwrite, run_inputs(cfg))
        world.barrier()
    return report


def saliency_half(cfg: Config, half: str) -> tuple[Saliency, dict]:
    """One half ("head" or "tail", cut at saliency.halfway) of collect_saliency's pass, in this process: the demo runs
    the two in its two processes and `save_saliency` joins them, bit-identical to one pass. Returns the part and the
    split counts."""
    if half not in ("head", "tail"):
        raise ValueError(f"saliency_half: half must be head or tail, not {half!r}")
    world = distributed.World()
    splits, adapter, params, _ = prepare(cfg, world)
    cut = halfway(splits, cfg.collect_batch_size)
    span = {"stop": cut} if half == "head" else {"start": cut, "record": True}
    timings = {}
    sal = collect_or_load(adapter, splits, params, cfg.forget, cfg.retain, cfg.collect_batch_size, timings=timings,
                          world=world, progress=False, **span)
    log.info("saliency %s: the batches %s position %s in %.1fs", half, "before" if half == "head" else "from", cut,
             timings["collect_s"])
    return sal, splits.counts()


def save_saliency(cfg: Config, head: tuple[Saliency, dict], tail: tuple[Saliency, dict],
                  overwrite: bool = False) -> dict:
    """collect_saliency's output from the two halves of its pass (`saliency_half`). Returns the report."""
    t = time.perf_counter()
    sal = merge(head[0], tail[0])
    tail[0].records.clear()    # every tail batch's gradients (hundreds of MB in the demo): added, no longer needed
    report = {**provenance(cfg, cfg.device), "world_size": 1,
              "timings": {"merge_s": time.perf_counter() - t}, "splits": head[1],
              "collected_in": "two halves (saliency_half)"}
    write_saliency(cfg.out, sal, report, overwrite, run_inputs(cfg))
    return report


def check_out(out, overwrite: bool, inputs=None, keep=None) -> None:
    """Refuse an --out that exists (unless `overwrite`), that is a file, that cannot be made (a file on its path), or
    whose replacement would delete the current directory, an input or a directory to keep: an --out that is, or
    holds, the current directory, one of `inputs` or one of `keep` ({option: path} or (option, path) pairs; None is
    skipped, a path not made yet is not: a cache the run creates inside --out would go with it), or that lies inside an
    input directory or a directory to keep (the inputs are never modified; an --out inside the cache would replace
    its entries, even one the run reads), or where nothing can be written."""
    path, here = Path(out).resolve(), Path.cwd().resolve()
    if path == here or path in here.parents:
        raise ValueError(f"--out {out} is {'the current directory' if path == here else 'a directory above the current one'}"
                         f": the run replaces --out, and it would delete what is there; name a directory of its own")

    def pairs(x):
        return [(o, g) for o, g in (x.items() if isinstance(x, dict) else x or ()) if g]  # made later, too

    for option, given in pairs(inputs) + pairs(keep):
        source = Path(given).resolve()
        if path == source or path in source.parents:
            raise ValueError(f"--out {out} holds {option} {given}: the run replaces --out and would delete it; "
                             f"name another directory")
    holder = inside(path, pairs(inputs)) or inside(path, pairs(keep), made_later=True)
    if holder:
        raise ValueError(f"--out {out} is inside {holder[0]} {holder[1]}: the inputs and the cache are never modified "
                         f"by an --out (with --overwrite it would replace what is there); name a directory outside it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")
    blocker = next((a for a in path.parents if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"--out {out}: {blocker} is a file, so the directory cannot be made")
    if blocker is not None:     # found now, not after the run's work: a directory made and removed in the nearest one
        try:                    # that exists (permissions, a read-only file system; os.access says yes to root)
            os.rmdir(tempfile.mkdtemp(prefix=".surgery-probe-", dir=blocker))
        except OSError as e:
            raise PermissionError(f"--out {out}: cannot write in {blocker} ({e.strerror})") from None


def inside(path: Path, pairs, made_later: bool = False):
    """The first (option, directory) of `pairs` that is `path` or holds it; a directory not made yet counts only when
    `made_later` (a cache the run will create)."""
    for option, given in pairs:
        source = Path(given).resolve()
        if (source.is_dir() or made_later) and (path == source or source in path.parents):
            return option, given
    return None


def check_teacher_cache(cfg: Config) -> None:
    """--teacher-cache: scratch files go there, so it must not be (or lie inside) an input directory, nor a file."""
    if not cfg.teacher_cache:
        return
    path = Path(cfg.teacher_cache).resolve()
    holder = inside(path, [(o, g) for o, g in run_inputs(cfg).items() if g])
    if holder:
        raise ValueError(f"--teacher-cache {cfg.teacher_cache} is inside {holder[0]} {holder[1]}: the inputs are "
                         f"never written to; name a directory outside it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--teacher-cache {cfg.teacher_cache} is a file, not a directory")


def run_inputs(cfg: Config) -> dict:
    """The files and directories a run reads, which its --out must not hold (`check_out`)."""
    return {"--model": cfg.model, "--forget": cfg.forget, "--retain": cfg.retain, "--saliency": cfg.saliency,
            "--distill-images": cfg.distill_images}


def write_saliency(out, sal: Saliency, report: dict, overwrite: bool, inputs: dict | None = None) -> None:
    """OUT/saliency.safetensors and OUT/report.json, atomically."""
    with atomic_dir(out, overwrite, inputs) as tmp:
        sal.save(tmp / "saliency.safetensors")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))


def prune_and_mask(cfg: Config, overwrite: bool = False, progress: bool = True) -> dict:
    """VKD: collect -> select -> prune -> unlearn -> save (HF checkpoint, masks, saliency, report.json) into cfg.out."""
    return run(replace(cfg, method="vkd"), overwrite, progress)
