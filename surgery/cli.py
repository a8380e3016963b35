"""`surgery` command line: a thin shell over the library. Logs and progress on stderr; stdout only --json."""
import functools
import importlib.util
import json
import logging
import sys
from pathlib import Path

import click

from .config import Config
from .data import DataError

log = logging.getLogger("surgery")


def _layers(ctx, param, value):
    if value is None:
        return None
    try:
        lo, _, hi = value.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a layer or an inclusive range like 16-23") from None
    if lo < 0 or hi < lo:
        raise click.BadParameter(f"{value!r}: expected 0 <= first <= last")
    return (lo, hi)


def model_options(f):
    for opt in reversed([
        click.option("--model", default="tiny-llava", show_default=True,
                     help="Local HF directory, alias (llava, qwen2-vl, qwen2.5-vl) in the local HF cache, "
                          "or tiny-llava / tiny-qwen2-vl / tiny-qwen2.5-vl."),
        click.option("--device", default="cpu", show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="auto: fp32 on CPU, bf16 on GPU."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default)."),
        click.option("--scope", type=click.Choice(["mlp", "vision", "full"]), default="mlp", show_default=True),
        click.option("--layers", callback=_layers, help="Vision layers, e.g. 16-23 (default: every live layer)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
        click.option("-v", "--verbose", is_flag=True),
    ]):
        f = opt(f)
    return f


def data_options(f):
    for opt in reversed([
        click.option("--forget", required=True, type=click.Path(), help="Forget JSONL (rows with image: fvqa; without: fqa)."),
        click.option("--retain", required=True, type=click.Path(), help="Retain JSONL (rvqa / rqa)."),
        click.option("--collect-batch-size", type=int, default=8, show_default=True),
        click.option("--out", required=True, type=click.Path()),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
        click.option("--dry-run", is_flag=True, help="Validate data and model, print the plan, write nothing."),
    ]):
        f = opt(f)
    return f


def friendly(fn):
    """Turn expected failures into one clear line and exit status 1 (tracebacks only with -v)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # our progress at INFO; other libraries' (rouge-score, matplotlib) only from WARNING, under their own name
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
        log.setLevel(logging.DEBUG if kwargs.get("verbose") else logging.INFO)
        try:
            return fn(*args, **kwargs)
        except (DataError, FileExistsError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            if kwargs.get("verbose"):
                raise
            raise click.ClickException(str(e)) from None
    return wrapper


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


def config_from(kw: dict) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in kw.items() if k in fields and v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mllm-surgery")
def main():
    """Make a multimodal LLM forget what a person looks like (Visual Knowledge Distillation unlearning)."""


@main.command()
@model_options
@friendly
def inspect(model, device, dtype, seed, trust_remote_code, scope, layers, as_json, verbose):
    """Show the adapter's view of a model: vision layers, live range, scope, parameter counts."""
    from .models import load
    from .pipeline import check_device, resolve_dtype
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
    from .pipeline import atomic_dir, prepare, run_collect
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
    from .pipeline import prepare, prune_and_mask as run
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


if importlib.util.find_spec("surgery.bench.cli") is not None:  # make-bench, finetune, eval, relearn, demo
    from .bench.cli import register
    register(main)

if __name__ == "__main__":
    main()
