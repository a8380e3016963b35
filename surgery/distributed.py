"""Many processes (torchrun): which process this is, the few collectives the method needs, and how the model is laid
out across processes.

- Rows are sharded by rank deterministically: collection gives batch i of a split to rank i mod N; training gives each
  rank a contiguous part of every global batch (`World.shard`).
- The trainable weights are replicated with DDP (`replicate`), built after the LLM is frozen and after the pruning
  step; parameters no loss reaches (dead layers) are left out of its gradient sync, so no find_unused_parameters.
- `--shard-llm`: the frozen language model is sharded with FSDP2 (`shard_llm`): one unit per decoder layer, its
  embeddings, final norm and LM head in the root unit; the vision tower and projector are ignored by FSDP (replicated).
- `--checkpoint-llm`: the LLM's decoder layers recompute their activations in backward (`checkpoint_llm`);
  `--checkpoint-vision` the same for the vision tower's blocks (`checkpoint_vision`).

One process is `World()`: every operation is the identity and nothing above changes the model.
"""
import hashlib
import logging
import math
import os
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.utils import logging as hf_logging

log = logging.getLogger("surgery")


class Stopped(RuntimeError):
    """This rank was told to stop (SIGTERM): torchrun stops every rank once one has failed, or when it is stopped."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "World":
        """The torchrun job this process has joined (`launch`), or World() when it has joined none."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list) -> list:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        n = len(rows)
        return rows[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def rounds(self, n: int) -> list[int | None]:
        """Items 0..n-1 dealt round-robin (item i to rank i mod N), one per round; None where this rank has no item in
        the last round. Every rank gets the same number of rounds, so collectives inside a forward (FSDP's) match."""
        return [i if i < n else None for i in range(self.rank, math.ceil(n / self.size) * self.size, self.size)]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a CPU tensor under nccl travels through this rank's GPU)."""
        if self.size == 1:
            return tensor
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            on_device = tensor.to(torch.device("cuda", self.local_rank))
            dist.all_reduce(on_device)
            return tensor.copy_(on_device)
        dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, what: str, tensors: dict[str, torch.Tensor]) -> None:
        """Raise unless every rank holds the same `tensors` (bit for bit): one SHA-256 per rank, compared on all."""
        if self.size == 1:
            return
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        digests = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(f"rank {differ[0]} holds other {what} than rank 0: every rank must derive the same "
                               "(non-deterministic selection?)")

    def check_same_settings(self, settings: dict, skip=("device",)) -> None:
        """Raise unless every rank runs with the same `settings` (a run's config; `skip`: what differs by rank),
        naming the first field that differs: ranks that disagree on the step count or a batch size would wait on
        each other's collectives until the timeout, or train on what no rank asked for."""
        if self.size == 1:
            return
        mine = {k: v for k, v in settings.items() if k not in skip}
        every = [None] * self.size
        dist.all_gather_object(every, mine)
        for r, theirs in enumerate(every):
            differ = sorted(k for k in mine.keys() | theirs.keys() if theirs.get(k) != every[0].get(k))
            if differ:
                k = differ[0]
                raise ValueError(f"rank {r} was started with other settings than rank 0: {k} {theirs.get(k)!r} "
                                 f"against {every[0].get(k)!r} (every rank must get the same command)")

    def no_sync(self, model):
        """DDP's no_sync when `model` is DDP-wrapped: gradients accumulate locally until the next synced backward.
        The forward must run inside it too (DDP decides at forward time whether the backward syncs)."""
        return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}: torchrun stops every rank when one fails (then see that rank's "
                  "message) or when torchrun itself is stopped")


@contextmanager
def launch(device: str):
    """Join the torchrun job this process was started in (WORLD_SIZE, RANK, LOCAL_RANK; gloo on CPU, nccl on CUDA with
    this rank on cuda:LOCAL_RANK). Yields (world, device): this rank's World and device. Without torchrun (or with one
    process) it yields World() and `device` unchanged.

    A failure on a rank is logged with its rank before it propagates. The other ranks then fail too, promptly: a
    collective with a dead peer raises (gloo: "Connection closed by peer"), and torchrun's SIGTERM raises `Stopped`, so
    their clean-up (the temporary output directory) runs instead of hanging. Within a job that is already initialized
    (a test driving several runs) it joins that job and leaves it open."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(), device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index not in (None, local):
            raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ValueError(f"--device cuda: rank {os.environ.get('RANK')} needs cuda:{local}, but "
                             f"{torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: torchrun runs on cpu (gloo) or cuda (nccl)")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    world = World.current()
    handler = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if handler else None
    level, bars = log.level, hf_logging.is_progress_bar_enabled()
    if not world.main:   # rank 0 speaks for the job
        log.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        hf_logging.disable_progress_bar()
    try:
        yield world, str(dev)
    except BaseException as e:
        log.error("rank %d of %d failed: %s: %s", world.rank, world.size, type(e).__name__, e)
        raise
    else:
        if started:
            dist.destroy_process_group()
    finally:
        log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
        if handler:
            signal.signal(signal.SIGTERM, previous)


# ----- the model across processes -----

def decoder_layers(adapter) -> list[torch.nn.Module]:
    """The language model's decoder layers (transformers marks each repeated block a GradientCheckpointingLayer)."""
    return _blocks(adapter, vision=False)


def vision_layers(adapter) -> list[torch.nn.Module]:
    """The vision tower's encoder blocks (CLIP encoder layers, Qwen2-VL vision blocks), each holding one MLP."""
    return _blocks(adapter, vision=True)


def _blocks(adapter, vision: bool) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for name, m in adapter.model.named_modules()
              if isinstance(m, GradientCheckpointingLayer) and adapter.is_vision(name + ".") == vision]
    if not layers:   # --checkpoint-vision, --checkpoint-llm and --shard-llm need them
        where = "vision tower" if vision else "language model"
        raise ValueError(f"{adapter.model_type}'s {where} has no repeated blocks (transformers' "
                         "GradientCheckpointingLayer) to checkpoint or shard")
    return layers


_state = threading.local()


def recomputing() -> bool:
    """Whether a checkpointed layer is running again in backward: forward hooks that count something (the
    activation statistics of collection) return at once then, or they would count the batch twice."""
    return getattr(_state, "recomputing", False)


@contextmanager
def _recompute():
    before = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


def checkpoint_llm(adapter) -> int:
    """Activation checkpointing of the LLM's decoder layers (`checkpoint_layers`). Returns the number of layers."""
    return checkpoint_layers(decoder_layers(adapter))


def checkpoint_vision(adapter) -> int:
    """Activation checkpointing of the vision tower's blocks (`checkpoint_layers`): each keeps its input, not the
    activations of its attention and MLP, until backward (benchmarks/tower_activations.py counts both). Returns the
    number of blocks."""
    return checkpoint_layers(vision_layers(adapter))


def checkpoint_layers(layers: list[torch.nn.Module]) -> int:
    """Each layer keeps only its inputs in forward and runs again in backward (torch.utils.checkpoint, non-reentrant;
    `recomputing()` is True during the second run). Returns the number of layers.

    Set on each layer's `forward` (the instance attribute), so module hooks, FSDP2's all-gather among them, stay
    outside and run once. Not transformers' activation_checkpointing_enable (5.23; gradient_checkpointing_enable
    before): that only checkpoints modules in training mode, and the model stays in eval mode (no dropout) so that
    the loss is the one we evaluate. The recompute must not see a KV cache (it would append to it twice). Without
    gradients (scoring, e.g. the held-back photos of --stop-forget-accuracy) nothing is recomputed: the layer runs as
    it is, KV cache included."""
    from torch.utils.checkpoint import checkpoint

    def contexts():
        return nullcontext(), _recompute()

    def checkpointed(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            if kwargs.get("past_key_values") is not None:
                kwargs["past_key_values"] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
        return run

    for layer in layers:
        layer.forward = checkpointed(layer.forward)
    return len(layers)


def shard_llm(adapter, world: World, device: str) -> int:
    """FSDP2 (fully_shard) on the frozen language model over all ranks: one unit per decoder layer, the rest of the
    LLM (embeddings, final norm, LM head) in the root unit. The vision tower and projector are ignored by FSDP:
    replicated on every rank, moved to `device`; their trainable weights are DDP's (`replicate`). Frozen and trainable
    parameters never share a unit. Returns the number of units. Refuses a scope that trains LLM weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = adapter.model
    vision = {p for name, p in model.named_parameters() if adapter.is_vision(name)}
    trained = [name for name, p in model.named_parameters() if p.requires_grad and p not in vision]
    if trained:
        raise ValueError(f"--shard-llm shards the frozen language model, but the scope trains {len(trained)} of its "
                         f"parameters ({trained[0]}, ...): use --scope mlp or vision")
    dev = torch.device(device)
    mesh = init_device_mesh(dev.type, (world.size,))
    layers = decoder_layers(adapter)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=vision)
    for prefix in adapter.vision_prefixes:
        model.get_submodule(prefix.rstrip(".")).to(dev)
    return len(layers) + 1


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The full state dict of an FSDP-sharded model, on rank 0's CPU ({} on the other ranks); a collective: every rank
    calls it. None for a model that is not sharded (save it as it is)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unreached(ctx, split: str) -> list[str]:
    """Trainable parameters that a row of `split` should reach (`ctx.reaches_param`) but that get no gradient from it:
    dead layers (LLaVA reads the vision tower's second-to-last layer, so its last CLIP layer and post-layernorm never
    reach the loss). Found by one forward and backward of the split's first row on the plain model."""
    from .models import answer_loss
    expected = {n: p for n, p in ctx.params.items() if ctx.reaches_param(split, n)}
    batch = ctx.encode(split, [0])
    loss = answer_loss(ctx.adapter.model(**batch.inputs).logits, batch.labels).sum()
    grads = torch.autograd.grad(loss, list(expected.values()), allow_unused=True)
    return [n for n, g in zip(expected, grads) if g is None]


def replicate(ctx, splits: list[str]) -> tuple[torch.nn.Module, set[str]]:
    """DDP over ctx.adapter.model for the trainable parameters that the losses of `splits` reach, built after the LLM is
    frozen and after the method's prepare step (pruning). Frozen parameters (FSDP's shards among them), parameters no
    split reaches (dead layers) and buffers stay out of DDP: no find_unused_parameters. Returns (the DDP module,
    the names of the parameters it syncs). A backward that cannot reach some of them must still give them a gradient
    (`in_graph`)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    images = [s for s in splits if s in ("fvqa", "rvqa")]
    probe = (images or splits)[0]
    dead = set(unreached(ctx, probe))
    if dead and ctx.world.main:
        layers = ctx.adapter.family.layers + "."
        owners = sorted({layers + n[len(layers):].split(".")[0] if n.startswith(layers) else n.rsplit(".", 1)[0]
                         for n in dead})
        log.warning("%d trainable parameters no loss reaches (dead layers) stay out of DDP's gradient sync: %s",
                    len(dead), ", ".join(owners))
    synced = {n for n in ctx.params if n not in dead}
    keep = {id(ctx.params[n]) for n in synced}
    model = ctx.adapter.model
    ignored = [n for n, p in model.named_parameters() if id(p) not in keep] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = ctx.adapter.device
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, synced


def in_graph(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """loss + 0·Σ p: the same loss and gradients, but every parameter in `params` gets a (zero) gradient. DDP without
    find_unused_parameters waits for all parameters it syncs; text rows never reach the vision weights."""
    if not params:
        return loss
    return loss + sum(p.sum() for p in params) * 0.0
