"""The benchmark commands: make-bench, finetune, eval, relearn, import-mllmu."""
import json
import logging
from dataclasses import asdict

import click

from .common import emit, friendly, main

log = logging.getLogger("surgery")


def _shares(ctx, param, value):
    try:
        shares = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fractions like 0.1,0.2,0.3") from None
    if not shares or not all(0 < s <= 1 for s in shares):
        raise click.BadParameter(f"{value!r}: every share must be in (0, 1]")
    return shares


def _models(ctx, param, values):
    """NAME=PATH or PATH (named by its folder)."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep else (v.rstrip("/").rsplit("/", 1)[-1], v)
        if name in out:
            raise click.BadParameter(f"two models named {name!r}; use NAME=PATH")
        out[name] = path
    return out


@main.command("make-bench")
@click.option("--out", required=True, type=click.Path())
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--people", type=int, default=40, show_default=True, help="Fictitious people (forget + retain).")
@click.option("--forget-share", type=float, default=0.1, show_default=True)
@click.option("--real-world", type=int, default=10, show_default=True, help="People of the separate population.")
@click.option("--train-views", type=int, default=4, show_default=True)
@click.option("--test-views", type=int, default=2, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def make_bench_cmd(out, seed, people, forget_share, real_world, train_views, test_views, overwrite, as_json,
                   verbose):
    """Generate the fictitious-profiles benchmark (JSONL + PNG), deterministic for a seed."""
    from ..bench.make_bench import make_bench
    summary = make_bench(out, seed=seed, people=people, forget_share=forget_share, real_world=real_world,
                         train_views=train_views, test_views=test_views, overwrite=overwrite)
    log.info("benchmark in %s: %s people, rows %s", out, summary["people"], summary["rows"])
    emit(summary, as_json)

@main.command()
@click.option("--bench", required=True, type=click.Path(), help="A make-bench directory.")
@click.option("--out", required=True, type=click.Path())
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=12, show_default=True, help="Epochs over every training row.")
@click.option("--name-epochs", type=int, default=4, show_default=True, help="First stage: image -> name rows.")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--without-forget-images", is_flag=True,
              help="Leave out the forget people's image rows: the reference model that knows them by name but "
                   "has never seen their faces (what unlearning aims at).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def finetune(bench, out, seed, epochs, name_epochs, lr, without_forget_images, overwrite, as_json, verbose):
    """Train the vanilla model (tiny LLaVA, offline tokenizer) that knows everyone in the benchmark."""
    from ..bench.finetune import FinetuneConfig, finetune as run
    if epochs < 1 or name_epochs < 0:
        raise click.BadParameter("--epochs must be >= 1 and --name-epochs >= 0")
    cfg = FinetuneConfig(seed=seed, epochs=epochs, name_epochs=name_epochs, lr=lr,
                         without_forget_images=without_forget_images)
    report = run(bench, out, cfg, overwrite)
    emit(report, as_json)

@main.command("eval")
@click.option("--bench", required=True, type=click.Path(), help="Directory with eval_forget/retain/realworld.jsonl.")
@click.option("--model", "models", multiple=True, required=True, callback=_models,
              help="Model directory, or NAME=DIR; repeat to compare (e.g. vanilla=... unlearned=...).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--no-letter", is_flag=True, help="Skip the generation-style (letter) scoring.")
@click.option("--no-rouge", is_flag=True, help="Skip ROUGE-L on the generation questions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def eval_cmd(bench, models, device, batch_size, no_letter, no_rouge, seed, as_json, verbose):
    """Multiple-choice accuracy (option likelihood and letter generation) and ROUGE-L, Table-1 layout."""
    from ..models import load
    from ..pipeline import check_device, seed_everything
    from ..bench.evaluate import evaluate, split_files, table
    check_device(device)
    split_files(bench)  # a bad --bench fails before any model loads
    results = {}
    for name, path in models.items():
        seed_everything(seed)
        results[name] = evaluate(load(path, device=device, seed=seed), bench, batch_size=batch_size,
                                 letter=not no_letter, rouge=not no_rouge)
    click.echo(table(results), err=True)
    emit(results, as_json)

@main.command()
@click.option("--model", required=True, type=click.Path(), help="The (unlearned) model directory to attack.")
@click.option("--bench", required=True, type=click.Path())
@click.option("--shares", default="0.1,0.2,0.3", show_default=True, callback=_shares,
              help="Fractions of the forget-VQA rows the attacker trains on.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--scope", type=click.Choice(["mlp", "vision", "full"]), default="vision", show_default=True,
              help="What the attacker trains: the live vision MLPs, encoder + projector, or every weight.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def relearn(model, bench, shares, epochs, lr, scope, device, seed, as_json, verbose):
    """The relearning attack: forget-VQA accuracy per epoch and AG = final - before, per share."""
    from ..pipeline import check_device, seed_everything
    from ..bench.relearn import relearn as run
    check_device(device)
    results = []
    for share in shares:
        seed_everything(seed)
        r = run(model, bench, share=share, epochs=epochs, lr=lr, scope=scope, seed=seed, device=device)
        click.echo(f"{share:>5.0%}: forget-VQA " + " -> ".join(f"{a:.1f}" for a in r["forget_vqa"])
                   + f"   AG {r['AG']:+.1f}", err=True)
        results.append(r)
    emit(results, as_json)

@main.command("import-mllmu")
@click.argument("parquet", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def import_mllmu_cmd(parquet, out, overwrite, as_json, verbose):
    """Convert MLLMU-Bench parquet files or shard directories (PARQUET or PARQUET=NAME) into OUT/NAME.jsonl +
    OUT/images/."""
    from ..bench.mllmu import import_mllmu
    counts = import_mllmu(list(parquet), out, overwrite)
    for name, n in counts.items():
        log.info("%s/%s.jsonl: %d rows", out, name, n)
    emit(counts, as_json)
