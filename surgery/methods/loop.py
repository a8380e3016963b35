"""The one training loop every unlearning method runs on.

A method says which splits it forgets on and which it keeps (`forget_splits`, `retain_splits`), may edit the
model and set a forget-gradient mask before training (`prepare`), and gives per-row losses for one batch of a
split (`terms`). The loop owns everything else: batching, the split streams, the rank's share of each batch,
the order of the backward passes, the mask (it gates only the forget splits' gradient), pruned entries (no
gradient, no update: MaskedAdamW leaves them exactly zero), clipping after masking, the non-finite guard,
progress, history, early stopping and timing.

One step, `schedule="combined"`: every forget split's loss is backpropagated first and its gradient masked, then
every retain split's loss adds its gradient, then one clipped MaskedAdamW update. `schedule="alternating"`
(MMUnlearner's): a clipped update on the forget splits, then one on the retain splits.

Early stopping (`cfg.stop_forget_loss`): the run stops after the first step at which the forget-VQA answer loss
(`loss_fvqa`, the cross-entropy of the right answer on the forget rows each step draws), averaged over the last
`cfg.stop_window` steps, reaches the threshold; --steps/--epochs are then the most it runs. It reads only the batches
the method trains on, so two models that forget at different speeds stop at a like depth. Every rank sees the same
all-reduced loss and stops at the same step. Or (`cfg.stop_forget_accuracy`): a share of each forget person's photos
is held back from training (`data.hold_back`, in `pipeline.prepare`, so saliency never sees them either) and every
`cfg.stop_every` steps the run measures the multiple-choice accuracy (option likelihood) of their rows; it stops at
the first check at or below the threshold. That measures what the training loss cannot: whether the forgetting
reaches photos the run has not trained on.

A term's loss is the mean of its rows over the *global* batch: each rank sums its rows and scales by
world size / global batch size, so DDP's gradient average is exactly the one-process gradient.
"""
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..bench.evaluate import ImageCache, score_likelihood
from ..config import Config
from ..data import SPLITS, Splits
from ..distributed import World, in_graph, replicate
from ..models import Adapter, Batch
from ..optim import MaskedAdamW
from ..progress import progress_bar
from ..saliency import examples
from ..select import check_fraction

log = logging.getLogger("surgery")


class NonFiniteError(RuntimeError):
    """A loss, the gradient or a weight became inf or NaN: the run stops and writes nothing."""


@dataclass
class Term:
    """One loss term on this rank's rows of a batch: `rows` [B_local] per-row losses; the loop minimises
    weight · (mean of rows over the global batch)."""
    rows: torch.Tensor
    weight: float = 1.0


@dataclass
class Context:
    """What a method works with. `model` is what the forward goes through (the DDP wrapper when there is one);
    `adapter.model` is always the plain model."""
    cfg: Config
    adapter: Adapter
    splits: Splits
    params: dict[str, torch.nn.Parameter]        # trainable, by name
    layers: list[int]                            # vision layers in scope
    out: Path | None = None                      # where `prepare` writes its files (a temporary directory)
    world: World = field(default_factory=World)
    model: torch.nn.Module | None = None
    pruned: dict[str, torch.Tensor] = field(default_factory=dict)   # True: entry of a pruned neuron, never updated
    mask: dict[str, torch.Tensor] | None = None  # forget-gradient mask (None: every entry)
    vanilla: dict[str, torch.Tensor] | None = None  # the trainable params as they were loaded
    info: dict = field(default_factory=dict)     # what the method reports (report.json["method_info"])
    timings: dict = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)      # params whose gradient DDP syncs (`distributed.replicate`)
    scratch: list[Path] = field(default_factory=list)  # directories the run removes at its end

    def __post_init__(self):
        self.model = self.model or self.adapter.model
        if not self.pruned:
            self.pruned = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}

    def encode(self, split: str, rows: list[int]) -> Batch:
        """Rows `rows` of `split` as model inputs on the model's device."""
        return self.encode_rows([self.splits[split][i] for i in rows])

    def encode_rows(self, chunk: list) -> Batch:
        """Data rows (`data.Row`, of any split or none) as model inputs on the model's device."""
        return self.adapter.encode(examples(chunk)).to(self.adapter.device)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(**batch.inputs).logits

    def snapshot_vanilla(self) -> None:
        """Keep a copy of the trainable params as loaded (before any edit): `vanilla_logits` runs on it."""
        self.vanilla = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def vanilla_logits(self, batch: Batch, inputs: dict | None = None) -> torch.Tensor:
        """Logits of the input model (frozen): the model itself with the snapshot in place of the trainable params,
        so no second copy of the frozen weights is held."""
        if self.vanilla is None:
            raise RuntimeError("vanilla_logits needs snapshot_vanilla() before the model is edited")
        return torch.func.functional_call(self.adapter.model, self.vanilla, args=(),
                                          kwargs=inputs or batch.inputs).logits

    def reaches_param(self, split: str, name: str) -> bool:
        """Can this split's loss change parameter `name`? Rows without an image never reach the vision tower or the
        projector."""
        return split in ("fvqa", "rvqa") or not self.adapter.is_vision(name)

    def reaches(self, split: str) -> bool:
        """Can this split's loss change any trainable weight? (Text splits only when the scope holds LLM weights.)"""
        return any(self.reaches_param(split, n) for n in self.params)


class Method:
    """Base of every method: override what differs. A method file defines one subclass."""
    name = ""
    paper = ""                      # where the method comes from (README, --help)
    default_scope = "mlp"           # the scope its paper trains
    defaults: dict = {}             # Config fields it fills when left None (e.g. alpha)
    trains = True                   # False: training-free (prepare does everything; steps are ignored)
    needs_vanilla = False           # snapshot the params before prepare, for ctx.vanilla_logits
    forget_splits: tuple = ("fvqa",)
    retain_splits: tuple = ("rvqa",)
    logs_forget_loss = True         # logs loss_fvqa, the forget-VQA answer loss --stop-forget-loss watches
    reads: tuple = ()               # the Config fields of its own it reads, beyond every method's (the CLI warns
                                    # when one is given to a method that does not read it)

    def check_inputs(self, cfg: Config, splits: Splits) -> None:
        """Refuse what this method cannot do with these settings and data, before the model is loaded."""
        if cfg.stop_forget_loss is not None and not self.logs_forget_loss:
            raise ValueError(f"--stop-forget-loss: {self.name} does not log the forget-VQA answer loss it watches; "
                             "use --stop-forget-accuracy")

    def prepare(self, ctx: Context) -> None:
        """Selection, pruning, masks, cached teachers: whatever happens once before training."""

    def encode(self, ctx: Context, split: str, rows: list[int]) -> Batch:
        """The model inputs `terms` gets for this rank's `rows` of `split` (a method may add rows of its own)."""
        return ctx.encode(split, rows)

    def terms(self, ctx: Context, split: str, batch: Batch, rows: list[int]) -> dict[str, Term]:
        raise NotImplementedError


def steps_of(cfg: Config, method: Method, splits: Splits) -> int:
    """cfg.steps, or cfg.epochs (default 1) passes over the retain-VQA rows (forget-VQA rows for a method without a
    retain term)."""
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
        return cfg.steps
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    if epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {epochs}")
    split = "rvqa" if "rvqa" in method.retain_splits else "fvqa"
    return max(1, math.ceil(epochs * len(splits[split]) / cfg.batch_size))


def batches(n: int, size: int, seed: int):
    """Endless global batches of row indices in [0, n): shuffled passes cut into batches of min(size, n) rows.
    A batch that spans two passes never repeats a row (the rows it already has go last in the new pass)."""
    rng, size, pending = random.Random(seed), min(size, n), []
    while True:
        order = list(range(n))
        rng.shuffle(order)
        taken = set(pending)
        pending += [i for i in order if i not in taken] + [i for i in order if i in taken]
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]


def check_stop(settings, where: str = "") -> None:
    """Refuse early-stop settings the loop cannot use, before anything is computed. `settings`: a Config, or a dict
    of some of its fields (the others at Config's defaults); `where` starts the message (e.g. "--set ")."""
    def get(name):
        return getattr(settings, name) if isinstance(settings, Config) else settings.get(name, getattr(Config, name))

    def number(x):
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

    loss, accuracy = get("stop_forget_loss"), get("stop_forget_accuracy")
    if loss is not None and not (number(loss) and loss > 0):
        raise ValueError(f"{where}stop_forget_loss={loss!r}: expected a number > 0 (or None: no early stop)")
    if accuracy is not None and not (number(accuracy) and 0 <= accuracy <= 100):
        raise ValueError(f"{where}stop_forget_accuracy={accuracy!r}: expected a percentage in [0, 100] (or None)")
    if loss is not None and accuracy is not None:
        raise ValueError(f"{where}stop_forget_loss and {where}stop_forget_accuracy: give one early stop, not both")
    holdout = get("stop_holdout")
    if not (number(holdout) and 0 < holdout < 1):
        raise ValueError(f"{where}stop_holdout={holdout!r}: expected a share of the forget photos in (0, 1)")
    for name in ("stop_window", "stop_every"):
        value = get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}{name}={value!r}: expected a whole number of steps >= 1")


def check_run(settings, where: str = "") -> None:
    """Refuse settings a run cannot use, before anything is loaded or built: the early stop's (check_stop), Config.check
    and the selection fractions'. `settings`: a Config, or a dict of some of its fields (the demo's and compare's
    --set, whose messages `where` starts)."""
    check_stop(settings, where)
    try:
        cfg = settings if isinstance(settings, Config) else Config(**settings)
        cfg.check()
        for name in ("prune_frac", "mask_frac"):
            check_fraction(name, getattr(cfg, name))
    except (TypeError, ValueError) as e:
        if not where:
            raise
        raise ValueError(f"{where}…: {e}") from None


def stop_early(cfg: Config, history: list[dict]) -> float | None:
    """The mean `loss_fvqa` of the last cfg.stop_window steps once it has reached cfg.stop_forget_loss, else None.
    The loss of a step is measured before its update, so the window trails the model it stops by one step."""
    if cfg.stop_forget_loss is None:
        return None
    if "loss_fvqa" not in history[-1]:
        raise ValueError(f"stop_forget_loss needs the forget-VQA answer loss (loss_fvqa), which this method does not "
                         f"log (it logs {', '.join(k for k in history[-1] if k.startswith('loss_'))})")
    if len(history) < cfg.stop_window:
        return None
    mean = sum(r["loss_fvqa"] for r in history[-cfg.stop_window:]) / cfg.stop_window
    return mean if mean >= cfg.stop_forget_loss else None


def held_back_accuracy(ctx: Context, rows: list, images: ImageCache) -> float:
    """The option-likelihood accuracy (%) of `rows`, the held-back multiple-choice forget-VQA rows (`data.hold_back`),
    on the model as it is now (in eval mode, as throughout unlearning). Every rank scores every row (a sharded LLM
    needs the same forwards on every rank) and the counts are summed over the ranks, so all of them stop at the same
    step."""
    hits = score_likelihood(ctx.adapter, rows, images)
    hits, count = ctx.world.all_reduce_(torch.tensor([float(sum(hits)), float(len(hits))], dtype=torch.float64)).tolist()
    return 100.0 * hits / count


def _backward(ctx: Context, method: Method, group: list[str], streams: dict, sums: dict) -> None:
    """Forward and backward every split of one update, forget splits first; the forget gradient is masked as soon
    as it is complete. Every split but the last runs without DDP's gradient sync, forward included (DDP decides at
    forward time); the last one syncs the sum, and gives a zero gradient to the synced weights it cannot reach."""
    forget = [s for s in group if s in method.forget_splits]
    for k, split in enumerate(group):
        rows = next(streams[split])
        local = ctx.world.shard(rows)
        last = k == len(group) - 1
        with nullcontext() if last else ctx.world.no_sync(ctx.model):
            terms = method.terms(ctx, split, method.encode(ctx, split, local), local)
            loss = sum(t.weight * t.rows.sum() for t in terms.values()) * (ctx.world.size / len(rows))
            if last and ctx.synced:
                loss = in_graph(loss, [ctx.params[n] for n in ctx.synced if not ctx.reaches_param(split, n)])
            if torch.is_tensor(loss) and loss.requires_grad:
                loss.backward()
        for name, t in terms.items():
            total = sums.setdefault(name, torch.zeros(2, dtype=torch.float64))
            total += torch.tensor([t.rows.detach().double().sum().item(), len(local)])
        if ctx.mask is not None and forget and split == forget[-1]:
            with torch.no_grad():
                for n, p in ctx.params.items():
                    if p.grad is not None:
                        p.grad.masked_fill_(~ctx.mask[n], 0)       # m ⊙ ∇(forget terms)


def train(ctx: Context, method: Method, progress: bool = True) -> list[dict]:
    """Run the method's updates on ctx.params; returns one record per step (mean losses, gradient norms)."""
    cfg, world = ctx.cfg, ctx.world
    names = list(ctx.params)
    weights = [ctx.params[n] for n in names]
    opt = MaskedAdamW(weights, masks=[~ctx.pruned[n] for n in names], lr=cfg.lr, weight_decay=cfg.weight_decay,
                      offload=cfg.offload_optimizer)
    used = [s for s in (*method.forget_splits, *method.retain_splits) if ctx.splits[s]]
    idle = [s for s in used if not ctx.reaches(s)]
    if idle:
        log.info("%s: no gradient path from %s to the trainable weights (rows without an image never reach the "
                 "vision tower or projector): skipped", method.name, ", ".join(idle))
    forget = [s for s in method.forget_splits if s in used and s not in idle]
    retain = [s for s in method.retain_splits if s in used and s not in idle]
    schedule = cfg.schedule or "combined"
    if schedule not in ("combined", "alternating"):
        raise ValueError(f"--schedule {schedule!r}: choose combined or alternating")
    groups = [forget + retain] if schedule == "combined" else [g for g in (forget, retain) if g]
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError(f"{method.name}: no split with rows reaches the trainable weights")
    if world.size > 1 and not ctx.synced:
        ctx.model, ctx.synced = replicate(ctx, forget + retain)   # DDP after freezing and after the prepare step
    size = min((len(ctx.splits[s]) for g in groups for s in g))
    if min(cfg.batch_size, size) < world.size:
        raise ValueError(f"--batch-size {cfg.batch_size} (or a split of {size} rows) gives some of the "
                         f"{world.size} ranks no row")
    streams = {s: batches(len(ctx.splits[s]), cfg.batch_size, cfg.seed * len(SPLITS) + SPLITS.index(s))
               for g in groups for s in g}
    steps = steps_of(cfg, method, ctx.splits)
    check_stop(cfg)
    if cfg.stop_forget_loss is not None and steps < cfg.stop_window:
        log.warning("%s: %d steps are fewer than --stop-window %d: the early stop cannot fire", method.name, steps,
                    cfg.stop_window)
    by_accuracy = cfg.stop_forget_accuracy is not None
    held = [r for r in ctx.splits.held_back if r.options] if by_accuracy else []
    images = ImageCache(prompts=True) if by_accuracy else None
    if by_accuracy and not held:
        raise ValueError("stop_forget_accuracy needs forget rows held back (`data.hold_back`, done by "
                         "`pipeline.prepare`)")
    if by_accuracy and steps < cfg.stop_every:
        log.warning("%s: %d steps are fewer than --stop-every %d: the early stop cannot fire", method.name, steps,
                    cfg.stop_every)
    # per update, the synced params none of its splits reaches: under DDP in_graph gives them a zero gradient, and
    # they take no step, as in one process (where their gradient stays None)
    unreachable = {tuple(g): {n for n in (ctx.synced or ()) if not any(ctx.reaches_param(s, n) for s in g)}
                   for g in groups}
    history, t0 = [], time.perf_counter()
    for step in progress_bar(range(1, steps + 1), method.name, show=progress and world.main):
        record, sums = {"step": step}, {}
        for group in groups:
            opt.zero_grad(set_to_none=True)
            _backward(ctx, method, group, streams, sums)
            with torch.no_grad():
                unreached = []              # no gradient reaches them (a dead layer at --scope full): no step
                for n, p in ctx.params.items():
                    if p.grad is None or n in unreachable[tuple(group)]:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        unreached.append(p)
                    p.grad.masked_fill_(ctx.pruned[n], 0)         # pruned entries carry no gradient
                # clip after masking: masked-out forget gradients must not shrink the norm of the rest
                norm = torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
                for p in unreached:         # as torch's AdamW skips a param without a grad: a zero one would still
                    p.grad = None           # take weight decay and its moments' momentum
            key = "grad_norm" if len(groups) == 1 else f"grad_norm_{'forget' if group[0] in forget else 'retain'}"
            record[key] = norm.item()
            if not math.isfinite(record[key]):
                raise NonFiniteError(f"{method.name}: the gradient is not finite at step {step}")
            opt.step()
        names_logged = list(sums)
        totals = world.all_reduce_(torch.stack([sums[k] for k in names_logged]))
        for name, (total, count) in zip(names_logged, totals.tolist()):
            record[f"loss_{name}"] = total / max(count, 1)
            if not math.isfinite(record[f"loss_{name}"]):
                raise NonFiniteError(f"{method.name}: the {name} loss is not finite at step {step}")
        with torch.no_grad():
            if not torch.isfinite(torch.stack([torch.linalg.vector_norm(w) for w in weights])).all():
                raise NonFiniteError(f"{method.name}: a trainable weight is not finite after step {step}")
        history.append(record)
        if (mean := stop_early(cfg, history)) is not None:
            log.info("%s: stopped after step %d of %d: the forget-VQA loss of the last %d steps averaged %.3f >= %g",
                     method.name, step, steps, cfg.stop_window, mean, cfg.stop_forget_loss)
            break
        if by_accuracy and step % cfg.stop_every == 0:
            record["held_back_accuracy"] = held_back_accuracy(ctx, held, images)
            if record["held_back_accuracy"] <= cfg.stop_forget_accuracy:
                log.info("%s: stopped after step %d of %d: the held-back forget photos' accuracy %.1f %% <= %g %%",
                         method.name, step, steps, record["held_back_accuracy"], cfg.stop_forget_accuracy)
                break
    ctx.info["steps_run"] = len(history)
    ctx.timings["train_s"] = time.perf_counter() - t0
    ctx.timings["step_s"] = ctx.timings["train_s"] / max(len(history), 1)
    return history
