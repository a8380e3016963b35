"""`surgery compare`: every method on the same vanilla model, data, seeds and relearning attack, in one table."""

import click

from ..methods import METHODS
from .common import emit, friendly, main, seeds_option, setting_value


def _names(ctx, param, value):
    names = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise click.BadParameter(f"unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"{value!r}: a method is named twice")
    return tuple(names)


def _overrides(ctx, param, values):
    """METHOD.FIELD=VALUE (VALUE read as JSON when it parses: numbers, true/false, lists; else as text)."""
    out = {}
    for v in values:
        target, sep, raw = v.partition("=")
        method, dot, name = target.partition(".")
        if not (sep and dot and method and name):
            raise click.BadParameter(f"{v!r}: expected METHOD.FIELD=VALUE, e.g. npo.npo_retain=true")
        out.setdefault(method, {})[name.replace("-", "_")] = setting_value(raw)
    return out


@main.command()
@click.option("--methods", default=",".join(METHODS), show_default=True, callback=_names,
              help="Comma-separated methods.")
@click.option("--seeds", default="0", show_default=True, callback=seeds_option,
              help="Benchmark seeds: each generates its benchmark and vanilla model (cached); several give mean ± "
                   "standard deviation. With --bench: seeds of the vanilla fine-tune and of the runs.")
@click.option("--bench", type=click.Path(exists=True, file_okay=False),
              help="Use this benchmark for every seed instead of generating one.")
@click.option("--model", type=click.Path(exists=True, file_okay=False),
              help="The vanilla model, used as it is (needs --bench; default: fine-tuned on the benchmark, cached).")
@click.option("--out", default="out/compare", show_default=True, type=click.Path())
@click.option("--cache", type=click.Path(), help="Vanilla models and method results (default ~/.cache/surgery, or "
                                                 "$SURGERY_CACHE).")
@click.option("--steps", type=int, help="Optimizer steps of every method that trains (default: 150, compare.BUDGET).")
@click.option("--lr", type=float, help="Learning rate of every method that trains (default: 5e-4, compare.BUDGET).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--scope", type=click.Choice(["mlp", "vision", "full"]),
              help="One scope for every method (default: each method's own, its paper's).")
@click.option("--set", "overrides", multiple=True, callback=_overrides, metavar="METHOD.FIELD=VALUE",
              help="A setting of one method's runs, e.g. --set npo.npo_retain=true --set vkd.alpha=2.5 (repeatable).")
@click.option("--relearn-share", type=float, default=0.2, show_default=True)
@click.option("--relearn-epochs", type=int, default=5, show_default=True)
@click.option("--generation", is_flag=True, help="Also score by greedy generation: letter accuracy (MLLMU-Bench's "
                                                 "style) and ROUGE-L, in a second table (slower).")
@click.option("--views", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="Score on the held-out test views (report) or the dev views (the only ones tuning may use).")
@click.option("--in-process", is_flag=True, help="Run every method in this process (faster start; peak memory is "
                                                 "then not reported).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def compare(methods, seeds, bench, model, out, cache, steps, lr, batch_size, scope, overrides, relearn_share,
            relearn_epochs, generation, views, in_process, device, overwrite, as_json, verbose):
    """Every method on the same vanilla model, data, seeds and relearning attack: OUT/table.md, report.json and
    compare.png. Results are cached: a re-run computes only new methods and settings."""
    from ..compare import CompareConfig
    from ..compare import compare as run
    given = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}   # else compare.BUDGET (CompareConfig)
    cfg = CompareConfig(methods=methods, seeds=seeds, bench=bench, model=model, **given, batch_size=batch_size,
                        scope=scope, device=device, overrides=overrides, relearn_share=relearn_share,
                        relearn_epochs=relearn_epochs, generation=generation, views=views, isolate=not in_process)
    report = run(out, cfg, cache, overwrite)
    click.echo(report["table"], err=True)
    click.echo(f"{out}/table.md, report.json, compare.png ({report['timings']['total_s']:.0f}s; "
               f"{len(report['computed'])} runs computed, {len(report['reused'])} from the cache)", err=True)
    emit(report, as_json)
    if report["failed"]:
        raise click.ClickException(f"failed: {', '.join(report['failed'])} (see report.json)")
