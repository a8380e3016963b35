"""The method commands: inspect, collect, prune-and-mask (VKD), unlearn (any method)."""
import logging

import click

from ..config import Config
from ..methods import METHODS
from .common import config_from, data_options, emit, friendly, main, model_options, parallel_options

log = logging.getLogger("surgery")


@main.command()
@model_options
@friendly
def inspect(model, device, dtype, seed, trust_remote_code, scope, layers, as_json, verbose):
    """Show the adapter's view of a model: vision layers, live range, scope, parameter counts."""
    from ..models import load
    from ..pipeline import check_device, resolve_dtype
    check_device(device)
    adapter = load(model, device=device, dtype=resolve_dtype(Config(device=device, dtype=dtype)),
                   trust_remote_code=trust_remote_code, seed=seed)
    params = adapter.scope_params(scope or "mlp", adapter.select_layers(range(layers[0], layers[1] + 1) if layers else None))
    total = sum(p.numel() for p in adapter.model.parameters())
    result = {
        "model": model, "model_type": adapter.model_type, "vision_layers": len(adapter.mlps),
        "live_layers": [adapter.live_layers.start, adapter.live_layers.stop - 1],
        "mlp": {"inputs": list(adapter.family.mlp_in), "output": adapter.family.mlp_out,
                "hidden": adapter.mlps[0].hidden if adapter.mlps else 0},
        "projector": adapter.family.projector, "scope": scope or "mlp",
        "scope_parameters": len(params), "scope_weights": sum(p.numel() for p in params.values()),
        "total_weights": total,
        # the checkpoint's tensors' dtypes (none for a tiny-* model) and the one a run would load and train in
        "checkpoint_dtypes": sorted({d for _, d in adapter.source_header.values()}),
        "dtype": str(adapter.model.dtype).replace("torch.", ""),
    }
    if not as_json:
        for k, v in result.items():
            click.echo(f"{k:>18}: {v}", err=True)
    emit(result, as_json)


@main.command()
@model_options
@data_options
@parallel_options
@friendly
def collect(**kw):
    """Collect activation statistics and Fisher diagonals per split into OUT/saliency.safetensors."""
    from ..pipeline import check_out, collect_saliency, prepare, run_inputs
    cfg = config_from(kw)
    if kw["dry_run"]:
        check_out(cfg.out, kw["overwrite"], run_inputs(cfg))
        splits, adapter, params, layers = prepare(cfg)
        return emit({"splits": splits.counts(), "parameters": len(params), "layers": layers}, True)  # the plan
    report = collect_saliency(cfg, overwrite=kw["overwrite"])
    emit({"out": kw["out"], "timings": report["timings"]}, kw["as_json"])


def training_options(f):
    for opt in reversed([
        click.option("--alpha", type=float, help="Forget-term weight α (default: the method's; vkd 1.25, others 1)."),
        click.option("--lr", type=float, default=1e-4, show_default=True),
        click.option("--weight-decay", type=float, default=0.0, show_default=True),
        click.option("--steps", type=int, help="Optimizer steps (instead of --epochs)."),
        click.option("--epochs", type=float, help="Passes over the retain-VQA rows (forget-VQA rows for methods "
                                                  "without a retain term) [default: 1]."),
        click.option("--stop-forget-loss", type=click.FloatRange(min=0, min_open=True),
                     help="Stop early once the forget-VQA answer loss, averaged over the last --stop-window steps, "
                          "reaches this; --steps/--epochs are then the most it runs."),
        click.option("--stop-window", type=click.IntRange(min=1),
                     help="Steps averaged by --stop-forget-loss [default: 10]."),
        click.option("--stop-forget-accuracy", type=click.FloatRange(min=0, max=100),
                     help="Or hold back a share of each forget person's photos from training and stop early once "
                          "the multiple-choice accuracy (%) of their rows is at most this."),
        click.option("--stop-holdout", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
                     help="The share of each forget person's photos --stop-forget-accuracy holds back "
                          "[default: 0.2]."),
        click.option("--stop-every", type=click.IntRange(min=1),
                     help="Steps between the checks of --stop-forget-accuracy [default: 10]."),
        click.option("--schedule", type=click.Choice(["combined", "alternating"]),
                     help="combined: one update on forget + retain terms per step; alternating: a forget update "
                          "then a retain update [default: the method's own: mmu alternating (MMUnlearner's), "
                          "the others combined]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True),
    ]):
        f = opt(f)
    return f


def selection_options(f):
    for opt in reversed([
        click.option("--prune-threshold", type=float, help="Prune neurons with I_u >= this (d_I)."),
        click.option("--prune-frac", type=float, help="Or prune the top fraction of each layer's neurons "
                                                      "[default, without --prune-threshold: 0.02]."),
        click.option("--prune-global", is_flag=True, help="Rank --prune-frac over all layers together, not per layer."),
        click.option("--mask-threshold", type=float,
                     help="Fisher mask m = R >= this (d_F) [default, without --mask-frac: 1.0]."),
        click.option("--mask-frac", type=float, help="Or mask the top fraction of R."),
        click.option("--beta", type=float, default=0.3, show_default=True, help="VKD weight β."),
        click.option("--distill-images", type=click.Path(exists=True, dir_okay=False),
                     help="VKD: also distil the projector features of these photos (a JSONL file with an 'image' "
                          "path per line; faces beyond the retain set, none of a forget person), weight β."),
        click.option("--saliency", type=click.Path(exists=True, dir_okay=False),
                     help="Reuse a saliency.safetensors (from `surgery collect` or an earlier run on the same model "
                          "and data) instead of collecting again."),
        click.option("--teacher-memory", "teacher_memory_gb", type=click.FloatRange(min=0), default=8.0,
                     show_default=True,
                     help="VKD: teacher features larger than this (GiB) go to memory-mapped files on disk."),
        click.option("--teacher-cache", type=click.Path(file_okay=False),
                     help="VKD: where those files go, in a fresh directory removed after the run; every rank must "
                          "see it [default: beside --out]."),
    ]):
        f = opt(f)
    return f


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        weights = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected four comma-separated numbers like 1,1,1,1") from None
    if len(weights) != 4 or min(weights) < 0 or not any(weights):
        raise click.BadParameter(f"{value!r}: expected four non-negative weights (abs, freq, var, rms), not all zero")
    return weights


def method_options(f):
    """Options of single methods (each ignored by the others)."""
    for opt in reversed([
        click.option("--npo-beta", type=float, help="npo: β in (2/β)·log(1 + (π/π_vanilla)^β) [default: 0.1]."),
        click.option("--npo-retain/--no-npo-retain", default=None,
                     help="npo: add cross-entropy on the retain rows (NPO+RT) [default: no, as MLLMU-Bench]."),
        click.option("--manu-weights", callback=_weights,
                     help="manu: weights of the importance functions abs,freq,var,rms [default: 1,1,1,1]."),
        click.option("--vgid-sigma", type=float,
                     help="vgid: std of the Gaussian noise on the teacher's image pixels in [0, 1] [default: 0.5]."),
        click.option("--vgid-instruction", help="vgid: the in-context unlearning instruction put before the "
                                                "teacher's question."),
    ]):
        f = opt(f)
    return f


# the CLI's defaults of the options that only some methods read (each method names those it reads: Method.reads)
OWN_DEFAULTS = {"prune_threshold": None, "prune_frac": None, "prune_global": False, "mask_threshold": None,
                "mask_frac": None, "beta": 0.3, "saliency": None, "teacher_memory_gb": 8.0, "teacher_cache": None,
                "npo_beta": None, "npo_retain": False, "manu_weights": None, "vgid_sigma": None,
                "vgid_instruction": None}
FIELD = {"prune_global": "prune_per_layer"}   # an option whose Config field has another name


def run_method(kw: dict) -> None:
    """Check the options, then run (or, with --dry-run, plan) the method in kw["method"]."""
    from ..pipeline import check_out, prepare, resolve, run, run_inputs
    for either in (("prune_threshold", "prune_frac"), ("mask_threshold", "mask_frac")):
        if all(kw.get(name) is not None for name in either):
            raise click.BadParameter("give one, not both", param_hint="/".join(f"--{n.replace('_', '-')}" for n in either))
    for name in ("prune_frac", "mask_frac"):
        if kw.get(name) is not None and not 0 <= kw[name] <= 1:
            raise click.BadParameter(f"must be in [0, 1], got {kw[name]}", param_hint=f"--{name.replace('_', '-')}")
    if kw["steps"] is not None and kw["epochs"] is not None:
        raise click.BadParameter("give --steps or --epochs, not both", param_hint="--steps/--epochs")
    if kw.get("stop_window") is not None and kw.get("stop_forget_loss") is None:
        raise click.BadParameter("averages the loss that --stop-forget-loss stops by: give both",
                                 param_hint="--stop-window")
    for name in ("stop_holdout", "stop_every"):
        if kw.get(name) is not None and kw.get("stop_forget_accuracy") is None:
            raise click.BadParameter("is a setting of --stop-forget-accuracy: give both",
                                     param_hint=f"--{name.replace('_', '-')}")
    if kw.get("stop_forget_loss") is not None and kw.get("stop_forget_accuracy") is not None:
        raise click.BadParameter("give one early stop, not both", param_hint="--stop-forget-loss/--stop-forget-accuracy")
    if kw.get("npo_beta") is not None and not kw["npo_beta"] > 0:
        raise click.BadParameter(f"must be > 0, got {kw['npo_beta']}", param_hint="--npo-beta")
    if kw.get("vgid_sigma") is not None and not kw["vgid_sigma"] >= 0:
        raise click.BadParameter(f"must be >= 0, got {kw['vgid_sigma']}", param_hint="--vgid-sigma")
    cfg, method = resolve(config_from(kw))
    if cfg.distill_images and method.name != "vkd":
        raise click.BadParameter(f"is a setting of VKD, not of {method.name}", param_hint="--distill-images")
    unused = [name for name, default in OWN_DEFAULTS.items()
              if kw.get(name) is not None and kw.get(name) is not False and kw.get(name) != default
              and FIELD.get(name, name) not in method.reads]
    if kw.get("schedule") is not None and not method.trains:
        unused.append("schedule")
    for name in unused:                     # a sweep may pass one set of options to every method: said, not refused
        log.warning("--%s is not a setting of %s: ignored", name.replace("_gb", "").replace("_", "-"), method.name)
    cfg.prune_per_layer = not kw.get("prune_global", False)
    if kw.get("prune_threshold") is not None:
        cfg.prune_frac = None
    if kw.get("mask_frac") is not None:
        cfg.mask_threshold = None
    if kw["dry_run"]:
        check_out(cfg.out, kw["overwrite"], run_inputs(cfg))
        splits, adapter, params, layers = prepare(cfg, method=method)
        return emit({"method": method.name, "trains": method.trains, "splits": splits.counts(),
                     "parameters": len(params), "layers": layers, "config": cfg.to_dict()}, True)  # the plan
    emit(run(cfg, overwrite=kw["overwrite"]), kw["as_json"])


@main.command("prune-and-mask")
@model_options
@data_options
@parallel_options
@selection_options
@training_options
@friendly
def prune_and_mask(**kw):
    """VKD: collect -> select -> prune -> unlearn -> save the unlearned model to OUT."""
    run_method({**kw, "method": "vkd"})


@main.command()
@click.option("--method", type=click.Choice(METHODS), required=True, help="The unlearning method.")
@model_options
@data_options
@parallel_options
@selection_options
@training_options
@method_options
@friendly
def unlearn(**kw):
    """Unlearn the forget set with any method (a training-free one ignores --steps/--epochs); save to OUT."""
    run_method(kw)
