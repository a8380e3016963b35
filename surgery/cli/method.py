"""The method commands: inspect, collect, prune-and-mask."""
import json
from pathlib import Path

import click

from ..config import Config
from .common import config_from, data_options, emit, friendly, main, model_options


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
    params = adapter.scope_params(scope, adapter.select_layers(range(layers[0], layers[1] + 1) if layers else None))
    total = sum(p.numel() for p in adapter.model.parameters())
    result = {
        "model": model, "model_type": adapter.model_type, "vision_layers": len(adapter.mlps),
        "live_layers": [adapter.live_layers.start, adapter.live_layers.stop - 1],
        "mlp": {"inputs": list(adapter.family.mlp_in), "output": adapter.family.mlp_out,
                "hidden": adapter.mlps[0].hidden if adapter.mlps else 0},
        "projector": adapter.family.projector, "scope": scope,
        "scope_parameters": len(params), "scope_weights": sum(p.numel() for p in params.values()),
        "total_weights": total,
    }
    if not as_json:
        for k, v in result.items():
            click.echo(f"{k:>18}: {v}", err=True)
    emit(result, as_json)


@main.command()
@model_options
@data_options
@friendly
def collect(**kw):
    """Collect activation statistics and Fisher diagonals per split into OUT/saliency.safetensors."""
    from ..pipeline import atomic_dir, prepare, run_collect
    cfg = config_from(kw)
    splits, adapter, params, layers = prepare(cfg)
    if kw["dry_run"]:
        return emit({"splits": splits.counts(), "parameters": len(params), "layers": layers}, kw["as_json"])
    timings = {}
    with atomic_dir(Path(kw["out"]), kw["overwrite"]) as tmp:
        run_collect(cfg, adapter, splits, params, timings).save(tmp / "saliency.safetensors")
        (tmp / "report.json").write_text(json.dumps({"config": cfg.to_dict(), "timings": timings,
                                                     "splits": splits.counts()}, indent=2))
    emit({"out": kw["out"], "timings": timings}, kw["as_json"])


@main.command("prune-and-mask")
@model_options
@data_options
@click.option("--prune-threshold", type=float, help="Prune neurons with I_u >= this (d_I).")
@click.option("--prune-frac", type=float, default=0.02, show_default=True, help="Or prune the global top fraction.")
@click.option("--mask-threshold", type=float, default=1.0, show_default=True, help="Fisher mask m = R >= this (d_F).")
@click.option("--mask-frac", type=float, help="Or mask the top fraction of R.")
@click.option("--alpha", type=float, default=1.25, show_default=True, help="Forget-term weight α.")
@click.option("--beta", type=float, default=0.3, show_default=True, help="VKD weight β.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--saliency", type=click.Path(exists=True, dir_okay=False),
              help="Reuse a saliency.safetensors (from `surgery collect` or an earlier run on the same model and data) "
                   "instead of collecting again.")
@friendly
def prune_and_mask(**kw):
    """Collect -> select -> prune -> unlearn -> save the unlearned model to OUT."""
    from ..pipeline import prepare, prune_and_mask as run
    for name in ("prune_frac", "mask_frac"):
        if kw[name] is not None and not 0 <= kw[name] <= 1:
            raise click.BadParameter(f"must be in [0, 1], got {kw[name]}", param_hint=f"--{name.replace('_', '-')}")
    cfg = config_from(kw)
    if kw["prune_threshold"] is not None:
        cfg.prune_frac = None
    if kw["mask_frac"] is not None:
        cfg.mask_threshold = None
    if kw["dry_run"]:
        if Path(cfg.out).exists() and not kw["overwrite"]:
            raise FileExistsError(f"--out {cfg.out} already exists (pass --overwrite to replace it)")
        splits, adapter, params, layers = prepare(cfg)
        return emit({"splits": splits.counts(), "parameters": len(params), "layers": layers,
                     "config": cfg.to_dict()}, kw["as_json"])
    report = run(cfg, overwrite=kw["overwrite"])
    emit(report, kw["as_json"])
