"""The benchmark commands: make-bench, finetune, eval, accept, relearn, import-mllmu."""
import logging
import time
from pathlib import Path

import click

from .common import SEED, emit, friendly, main, settings_option

log = logging.getLogger("surgery")


def _shares(ctx, param, value):
    try:
        shares = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated fractions like 0.1,0.2,0.3") from None
    if not shares or not all(0 < s <= 1 for s in shares):
        raise click.BadParameter(f"{value!r}: every share must be in (0, 1]")
    twice = sorted({s for s in shares if shares.count(s) > 1})
    if twice:
        raise click.BadParameter(f"{value!r}: {', '.join(map(str, twice))} given twice (each share is one attack)")
    return shares


def _models(ctx, param, values):
    """NAME=PATH or PATH (named by its folder)."""
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep else (v.rstrip("/").rsplit("/", 1)[-1], v)
        if not name.strip() or not path:
            raise click.BadParameter(f"{v!r}: expected NAME=DIR or DIR ({'the name' if path else 'the path'} is "
                                     "empty)")
        if name in out:
            raise click.BadParameter(f"two models named {name!r}; use NAME=PATH")
        out[name] = path
    return out


@main.command("make-bench")
@click.option("--out", required=True, type=click.Path())
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--people", type=int, help="Fictitious people (forget + retain) [100].")
@click.option("--forget-share", type=float, help="Share of them to forget [0.1].")
@click.option("--real-world", type=int, help="People of the separate population [20].")
@click.option("--extra-people", type=int, help="Faces only the vision tower's pretraining sees [300].")
@click.option("--tower-views", type=int, help="Photos per person only the tower's pretraining sees [12].")
@click.option("--train-views", type=int, help="Photos per person the training rows ask about [12].")
@click.option("--dev-views", type=int, help="Views for tuning (dev_*.jsonl) [2].")
@click.option("--test-views", type=int, help="Held-out views (eval_*.jsonl) [4].")
@click.option("--image-size", type=int, help="Portrait side in pixels [40].")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def make_bench_cmd(out, seed, overwrite, as_json, verbose, **params):
    """Generate the fictitious-profiles benchmark (JSONL + PNG), deterministic for a seed. Options left out take
    the defaults `surgery demo` uses (`surgery.bench.make_bench.make_bench`)."""
    from ..bench.make_bench import make_bench
    summary = make_bench(out, seed=seed, overwrite=overwrite, **{k: v for k, v in params.items() if v is not None})
    log.info("benchmark in %s: %s people, rows %s", out, summary["people"], summary["rows"])
    emit(summary, as_json)


@main.command()
@click.option("--bench", required=True, type=click.Path(), help="A make-bench directory.")
@click.option("--out", required=True, type=click.Path())
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--tower-epochs", type=int, default=None, help="Tower pretraining on every photo the model may see.")
@click.option("--text-epochs", type=int, default=None, help="The LLM on the QA rows.")
@click.option("--align-epochs", type=int, default=None, help="Projector + LLM on the VQA (+ QA) rows, tower frozen.")
@click.option("--quick", is_flag=True, help="Toy sizes, one epoch per stage (a wiring check, not a model).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch CPU threads (0: torch's default). The model depends on it; 1 is what the demo builds and "
                   "caches.")
@click.option("--cache", type=click.Path(), default=None,
              help="Keep each stage by content hash in this directory and reuse what is there.")
@click.option("--without-forget-images", is_flag=True,
              help="Leave out the forget people's photos in every stage: the reference model that knows them by "
                   "name but has never seen their faces (what unlearning aims at), trained paired with the vanilla "
                   "model (the same batches at the same steps, less those photos; --set paired_reference=false: a "
                   "fresh shuffle of the rows it keeps).")
@click.option("--set", "settings", multiple=True, callback=settings_option, metavar="FIELD=VALUE",
              help="Another value for a field of FinetuneConfig (sizes, epochs, learning rates, weight decay), e.g. "
                   "--set vision_layers=6 --set weight_decay=0.01 (repeatable).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def finetune(bench, out, seed, tower_epochs, text_epochs, align_epochs, quick, threads, cache, without_forget_images,
             settings, overwrite, as_json, verbose):
    """Build the vanilla model (tiny LLaVA, offline tokenizer) that knows everyone in the benchmark: tower
    pretraining, text, alignment."""
    from ..bench.finetune import FinetuneConfig, finetune as run
    epochs = {"tower_epochs": tower_epochs, "text_epochs": text_epochs, "align_epochs": align_epochs}
    for name, value in epochs.items():
        if value is not None and value < 1:
            raise click.BadParameter(f"--{name.replace('_', '-')} must be >= 1")
    cfg = (FinetuneConfig.quick if quick else FinetuneConfig)(seed=seed, threads=threads,
                                                              without_forget_images=without_forget_images)
    settings = {**settings, **{name: value for name, value in epochs.items() if value is not None}}
    own = {"seed", "threads", "without_forget_images"}              # they have options of their own
    for name, value in settings.items():
        if name not in FinetuneConfig.__dataclass_fields__ or name in own:
            known = ", ".join(sorted(set(FinetuneConfig.__dataclass_fields__) - own))
            raise click.BadParameter(f"--set {name}: not a setting of finetune (one of {known})")
        default = getattr(cfg, name)
        if isinstance(default, float) and type(value) is int:
            value = float(value)                # 1 and 1.0 are one setting: one cache key
        if type(value) is not type(default):
            raise click.BadParameter(f"--set {name}={value!r}: expected {type(default).__name__}")
        least = 0 if name == "align_projector_epochs" else 1           # 0: no projector-only step
        if name.endswith("_epochs") and value < least:
            raise click.BadParameter(f"--set {name}={value}: must be >= {least}")
        setattr(cfg, name, value)
    report = run(bench, out, cfg, overwrite, cache=cache)
    emit(report, as_json)


@main.command("eval")
@click.option("--bench", required=True, type=click.Path(), help="Directory with eval_forget/retain/realworld.jsonl.")
@click.option("--model", "models", multiple=True, required=True, callback=_models,
              help="Model directory, or NAME=DIR; repeat to compare (e.g. vanilla=... unlearned=...).")
@click.option("--views", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="test: the held-out views (eval_*.jsonl, for reporting); dev: the views tuning may look at.")
@click.option("--ablate", type=click.Choice(["mlp", "embeddings"]), default=None,
              help="mlp: zero every live vision MLP's output; embeddings: every vision layer passes its input "
                   "through, so the projector sees the patch + position embeddings alone.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--no-letter", is_flag=True, help="Skip the generation-style (letter) scoring.")
@click.option("--no-rouge", is_flag=True, help="Skip ROUGE-L on the generation questions.")
@click.option("--resamples", type=int, default=1000, show_default=True, help="Bootstrap draws for the intervals.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def eval_cmd(bench, models, views, ablate, device, batch_size, no_letter, no_rouge, resamples, seed, as_json,
             verbose):
    """Multiple-choice accuracy (option likelihood and letter generation) and ROUGE-L, Table-1 layout, each with a
    per-person bootstrap 95 % interval."""
    from ..models import load
    from ..pipeline import check_device, seed_everything
    from ..bench.evaluate import evaluate, split_files, table
    check_device(device)
    if resamples < 1:
        raise click.BadParameter("--resamples must be >= 1")
    split_files(bench, views)  # a bad --bench fails before any model loads
    results = {}
    for name, path in models.items():
        seed_everything(seed)
        t = time.perf_counter()
        adapter = load(path, device=device, seed=seed)
        results[name + (f" (ablate {ablate})" if ablate else "")] = {
            **evaluate(adapter, bench, batch_size=batch_size, letter=not no_letter, rouge=not no_rouge, views=views,
                       resamples=resamples, seed=seed, ablate=ablate),
            "provenance": _provenance(device, model=path, bench=bench, views=views, ablate=ablate, seed=seed,
                                      resamples=resamples, dtype=str(adapter.model.dtype).replace("torch.", ""),
                                      seconds=time.perf_counter() - t)}
    click.echo(f"{views} views" + (f", vision {ablate} ablated" if ablate else ""), err=True)
    click.echo(table(results), err=True)
    emit(results, as_json)


def _provenance(device: str, **what) -> dict:
    """What a result was computed from and where: absolute paths, the settings, the environment."""
    from ..pipeline import environment
    from ..models import resolve
    paths = {}
    for key in ("model", "vanilla", "reference", "bench"):
        if what.get(key) is not None:    # a model name (tiny-*, an alias) is what `load` reads it from
            found = str(what[key]) if key == "bench" else resolve(str(what[key]))
            paths[key] = str(Path(found).resolve()) if Path(found).is_dir() else found
    return {**what, **paths, "environment": environment(device)}


def _accept_targets(report, bench, vanilla, reference) -> dict[str, tuple[str, str, str]]:
    """{label: (bench, vanilla, reference)} from a demo report.json or from the three directories."""
    import json
    if report is None:
        if not (bench and vanilla and reference):
            raise click.UsageError("give --report, or all of --bench, --vanilla and --reference")
        return {str(bench): (bench, vanilla, reference)}
    if bench or vanilla or reference:
        raise click.UsageError("--report names the benchmarks and models itself: drop --bench, --vanilla, --reference")
    try:
        seeds = json.loads(Path(report).read_text())["per_seed"]
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{report}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); a "
                                 f"demo's report.json cut short?", param_hint="--report") from None
    except (ValueError, KeyError, TypeError):
        seeds = None
    if not isinstance(seeds, dict) or not all(isinstance(run, dict) for run in seeds.values()):
        raise click.BadParameter(f"{report}: not a `surgery demo` report.json (no per_seed)", param_hint="--report")
    out = {}
    for seed, run in seeds.items():
        if not run.get("reference_model"):
            raise click.BadParameter(f"{report}: seed {seed} has no reference model (a demo run with "
                                     f"--no-reference)", param_hint="--report")
        if not (run.get("bench") and run.get("vanilla_model")):
            raise click.BadParameter(f"{report}: seed {seed} names no bench or vanilla_model", param_hint="--report")
        out[f"seed {seed}"] = (run["bench"], run["vanilla_model"], run["reference_model"])
    return out


@main.command()
@click.option("--report", type=click.Path(exists=True, dir_okay=False),
              help="A `surgery demo` report.json: accept every seed's benchmark with its vanilla and reference model.")
@click.option("--bench", type=click.Path(), help="The benchmark directory (instead of --report).")
@click.option("--vanilla", type=click.Path(), help="Its vanilla model directory.")
@click.option("--reference", type=click.Path(), help="Its reference model directory (never saw the forget faces).")
@click.option("--views", type=click.Choice(["test", "dev"]), default="test", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (0: as set). The README's acceptance tables are measured on one.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--resamples", type=int, default=1000, show_default=True, help="Bootstrap draws for the intervals.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def accept(report, bench, vanilla, reference, views, threads, device, batch_size, resamples, seed, as_json, verbose):
    """The benchmark's acceptance, on the vanilla and reference models alone: 19 cells per benchmark (the vanilla
    model's VQA, QA and greedy-letter accuracy, its VQA with the vision MLPs or everything but the embeddings
    ablated, the reference model's forget VQA and its distance to the vanilla model). Exit status 1 when a cell
    misses."""
    from ..pipeline import check_device, torch_threads
    from ..bench.acceptance import accept as run, render
    from ..bench.evaluate import split_files
    check_device(device)
    if resamples < 1 or threads < 0:
        raise click.BadParameter("--resamples must be >= 1 and --threads >= 0")
    targets = _accept_targets(report, bench, vanilla, reference)
    for b, *_ in targets.values():
        split_files(b, views)           # a bad benchmark fails before any model loads
    reports = {}
    with torch_threads(threads):
        for label, (b, v, r) in targets.items():
            reports[label] = run(b, v, r, views=views, device=device, batch_size=batch_size, resamples=resamples,
                                 seed=seed)
            reports[label]["provenance"] = _provenance(device, bench=b, vanilla=v, reference=r, views=views,
                                                       seed=seed, resamples=resamples, threads=threads)
            click.echo((f"{label}: " if report else "") + render(reports[label]), err=True)
    emit(reports, as_json)
    missed = sum(r["cells_total"] - r["met"] for r in reports.values())
    if missed:
        raise click.ClickException(f"{missed} of {sum(r['cells_total'] for r in reports.values())} acceptance cells "
                                   f"missed")


@main.command()
@click.option("--model", required=True, type=click.Path(), help="The (unlearned) model directory to attack.")
@click.option("--bench", required=True, type=click.Path())
@click.option("--shares", default="0.1,0.2,0.3", show_default=True, callback=_shares,
              help="Fractions of the forget-VQA rows the attacker trains on.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=None, help="The attack's learning rate  [default: 1e-3 for --hold-out rows, "
              "1e-4 for people]")
@click.option("--scope", type=click.Choice(["mlp", "vision", "full"]), default="vision", show_default=True,
              help="What the attacker trains: the live vision MLPs, encoder + projector, or every weight.")
@click.option("--hold-out", type=click.Choice(["rows", "people"]), default="rows", show_default=True,
              help="rows: train on rows of every forget person (the paper's attack); people: train on half the forget "
                   "people and measure the other half, then the other way round (what comes back was still in the "
                   "weights).")
@click.option("--views", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="Measure forget-VQA on the held-out test views or on the dev views (tuning).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def relearn(model, bench, shares, epochs, lr, scope, hold_out, views, device, seed, as_json, verbose):
    """The relearning attack: forget-VQA accuracy per epoch and AG = final - before, per share."""
    from ..pipeline import check_device, seed_everything
    from ..bench.relearn import relearn as run
    check_device(device)
    results = []
    for share in shares:
        seed_everything(seed)
        r = run(model, bench, share=share, epochs=epochs, lr=lr, scope=scope, seed=seed, device=device, views=views,
                hold_out=hold_out)
        r["provenance"] = _provenance(device, model=model, bench=bench, views=views, seed=seed)
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
