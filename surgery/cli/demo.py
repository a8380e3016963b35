"""`surgery demo`: the whole evaluation loop on the built-in benchmark, over one or more benchmark seeds."""
import click

from .common import emit, friendly, main, seeds_option, settings_option


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path())
@click.option("--seeds", "--seed", default="0", show_default=True, callback=seeds_option,
              help="Benchmark seeds, e.g. 0,1,2: each its own benchmark and models (cached); the table gives the "
                   "mean and spread.")
@click.option("--views", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="Evaluate on the held-out test views (report) or the dev views (the only ones tuning may use).")
@click.option("--set", "settings", multiple=True, callback=settings_option, metavar="FIELD=VALUE",
              help="A prune-and-mask setting for this run, e.g. --set lr=1e-3 --set alpha=5 (repeatable).")
@click.option("--cache", type=click.Path(), help="Where benchmarks and models are cached (default ~/.cache/surgery, "
                                                 "or $SURGERY_CACHE).")
@click.option("--quick", is_flag=True, help="A tiny run of every stage (seconds): checks the wiring, measures nothing.")
@click.option("--distill-extras", type=click.IntRange(min=0), default=0, show_default=True,
              help="VKD also distils one photo each of this many of the tower's extra identities (faces no "
                   "benchmark person has; prune-and-mask --distill-images). 0: the paper's VKD.")
@click.option("--no-ablation", is_flag=True, help="Skip the beta=0 run.")
@click.option("--no-reference", is_flag=True, help="Skip the model that never saw the forget people's faces.")
@click.option("--processes", type=click.IntRange(1, 2), default=2, show_default=True,
              help="2: a second process evaluates, attacks and runs beta=0 beside the main one (the same numbers "
                   "as 1).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def demo(out, seeds, views, settings, cache, quick, distill_extras, no_ablation, no_reference, processes, overwrite,
         as_json, verbose):
    """make-bench -> vanilla + reference model (cached) -> prune-and-mask -> eval -> relearn, per seed; table,
    report.json and demo.png."""
    from ..bench.demo import ATTACKED, ATTACKS, DemoConfig, demo as run
    cfg = DemoConfig.make(seeds=seeds, quick=quick, unlearn=settings, views=views, ablation=not no_ablation,
                          reference=not no_reference, processes=processes,
                          distill_extras=distill_extras)
    report = run(out, cfg, cache, overwrite)
    click.echo(report["table"], err=True)
    for seed, r in report["per_seed"].items():
        for who, key in ATTACKED.items():
            for hold_out, suffix in ATTACKS.items():
                what = ", on the people it left out" if hold_out == "people" else ""
                if a := r.get(key + suffix):
                    click.echo(f"seed {seed}: relearning the {who} model, {a['share']:.0%} x {a['epochs']} epochs"
                               f"{what}: forget-VQA " + " -> ".join(f"{x:.1f}" for x in a["forget_vqa"])
                               + f"   AG {a['AG']:+.1f}", err=True)
        click.echo(f"seed {seed}: unlearning steps run: " + ", ".join(f"{k} {u['steps_run']}" for k, u in
                                                                    r["unlearn"].items()), err=True)
        click.echo(f"seed {seed}: QA option log-likelihoods, largest change from vanilla: "
                   + ", ".join(f"{k} {v:g}" for k, v in r["qa_logprob_max_abs_change"].items()), err=True)
    for name, ok in report["targets"].items():
        click.echo(f"  [{'met' if ok else 'MISSED'}] {name}", err=True)
    click.echo(f"{out}/report.json, {out}/demo.png ({report['timings']['total_s']:.0f}s)", err=True)
    emit(report, as_json)
