"""`surgery demo`: the whole evaluation loop on the built-in benchmark."""
import click

from .common import emit, friendly, main


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path())
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", type=click.Path(), help="Where vanilla models are cached (default ~/.cache/surgery, "
                                                 "or $SURGERY_CACHE).")
@click.option("--quick", is_flag=True, help="A tiny run of every stage (seconds): checks the wiring, measures nothing.")
@click.option("--no-ablation", is_flag=True, help="Skip the beta=0 run.")
@click.option("--reference", is_flag=True, help="Also train (and cache) the model that never saw the forget "
                                                 "people's faces, and evaluate and attack it the same way.")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
@friendly
def demo(out, seed, cache, quick, no_ablation, reference, overwrite, as_json, verbose):
    """make-bench -> finetune (cached) -> prune-and-mask -> eval -> relearn; table, report.json, demo.png."""
    from ..bench.demo import DemoConfig, demo as run
    cfg = DemoConfig.make(seed=seed, quick=quick, ablation=not no_ablation, reference=reference)
    report = run(out, cfg, cache, overwrite)
    click.echo(report["table"], err=True)
    for who, key in (("unlearned", "relearn"), ("reference", "relearn_reference")):
        if a := report.get(key):
            click.echo(f"relearning the {who} model, {a['share']:.0%} x {a['epochs']} epochs: forget-VQA "
                       + " -> ".join(f"{x:.1f}" for x in a["forget_vqa"]) + f"   AG {a['AG']:+.1f}", err=True)
    click.echo("QA option log-likelihoods, largest change from vanilla: "
               + ", ".join(f"{k} {v:g}" for k, v in report["qa_logprob_max_abs_change"].items()), err=True)
    for name, ok in report["targets"].items():
        click.echo(f"  [{'met' if ok else 'MISSED'}] {name}", err=True)
    click.echo(f"{out}/report.json, {out}/demo.png ({report['timings']['total_s']:.0f}s)", err=True)
    emit(report, as_json)
