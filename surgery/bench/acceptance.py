"""The benchmark's acceptance: judged on the vanilla and reference models alone, never on an unlearned one.

Nineteen cells per benchmark seed, each a number and the line it must reach (chance: four options, 25 %; on a
benchmark with other option counts, the mean of 1 / options over its forget and retain VQA rows):

  vanilla             VQA (option likelihood) forget / retain / real-world >= 85; QA >= 95;
                      MLLMU-Bench's greedy letter on VQA and on QA, each split, >= 80
  vanilla, ablated    `--ablate mlp` and `--ablate embeddings`: forget and retain VQA <= chance + 10
  reference           forget VQA <= chance + 10; retain and real-world VQA within 3 of the vanilla model's

The vanilla model is scored four ways (as it is, each ablation) and the reference once, each as `surgery eval`
scores it, without ROUGE, and the greedy letter for the vanilla model only.
"""
from pathlib import Path

from ..models import load
from ..data import load_jsonl
from .evaluate import CHANCE, chance, evaluate, split_files

VQA_MIN, QA_MIN, LETTER_MIN = 85.0, 95.0, 80.0
OVER_CHANCE = 10.0          # the ablated vanilla model and the reference model on faces: at most chance + 10
REFERENCE_WITHIN = 3.0      # the reference model's retain and real-world VQA against the vanilla model's
SPLITS = ("forget", "retain", "realworld")
RUNS = {"vanilla": None, "vanilla (ablate mlp)": "mlp", "vanilla (ablate embeddings)": "embeddings",
        "reference": None}


def cells(results: dict, at_chance: float = CHANCE) -> list[dict]:
    """The acceptance cells of `results` ({run name in RUNS: `evaluate`'s result}), in the README table's order:
    [{"cell", "value", "line", "met"}]. `at_chance`: the VQA accuracy of a random pick (`evaluate.chance`)."""
    out = []

    def add(name, value, line, met):
        """A cell whose split or rows the benchmark lacks (value None) is missed."""
        out.append({"cell": name, "value": value, "line": line, "met": value is not None and bool(met(value))})

    def score(run, split, key):
        return (results[run].get(split) or {}).get(key)

    for key, line in (("vqa", VQA_MIN), ("qa", QA_MIN), ("vqa_letter", LETTER_MIN), ("qa_letter", LETTER_MIN)):
        for split in SPLITS:
            add(f"vanilla {key.replace('_', ' ')} {split}", score("vanilla", split, key), f">= {line:g}",
                lambda v: v >= line)
    ceiling = at_chance + OVER_CHANCE
    for kind in ("mlp", "embeddings"):
        for split in ("forget", "retain"):
            add(f"ablate {kind}: vqa {split}", score(f"vanilla (ablate {kind})", split, "vqa"), f"<= {ceiling:g}",
                lambda v: v <= ceiling)
    add("reference vqa forget", score("reference", "forget", "vqa"), f"<= {ceiling:g}", lambda v: v <= ceiling)
    for split in ("retain", "realworld"):
        pair = score("reference", split, "vqa"), score("vanilla", split, "vqa")
        add(f"reference - vanilla vqa {split}", None if None in pair else pair[0] - pair[1],
            f"within {REFERENCE_WITHIN:g}", lambda v: abs(v) <= REFERENCE_WITHIN)
    return out


def accept(bench, vanilla, reference, *, views: str = "test", device: str = "cpu", batch_size: int = 64,
           resamples: int = 1000, seed: int = 0) -> dict:
    """Score the vanilla model (directory) as it is and under each ablation, and the reference model, on `bench`'s
    `views`: {"results": {run: evaluate's result}, "cells": `cells`, "met": how many, "cells_total"}."""
    from ..pipeline import seed_everything
    results, models = {}, {}
    for name, ablate in RUNS.items():
        path = str(reference if name == "reference" else vanilla)
        seed_everything(seed)
        if path not in models:          # the ablations are hooks, removed after each run: one load per directory
            models[path] = load(path, device=device, seed=seed)
        results[name] = evaluate(models[path], Path(bench), batch_size=batch_size, letter=name == "vanilla",
                                 rouge=False, kinds=("vqa", "qa") if ablate is None else ("vqa",), views=views,
                                 resamples=resamples, seed=seed, ablate=ablate)
    files = split_files(bench, views)
    vqa = [r for split in ("forget", "retain") if split in files                     # the options, not the photos
           for r in load_jsonl(files[split], check_images=False) if r.is_vqa]
    at_chance = chance(vqa)
    table = cells(results, at_chance)
    return {"bench": str(bench), "vanilla": str(vanilla), "reference": str(reference), "views": views,
            "chance": at_chance,
            "results": results, "cells": table, "met": sum(c["met"] for c in table), "cells_total": len(table)}


def render(report: dict) -> str:
    """One line per cell: name, value, line, met or MISSED."""
    width = max(len(c["cell"]) for c in report["cells"])
    lines = [f"{report['views']} views of {report['bench']}"]
    value = lambda v: "no rows" if v is None else f"{v:.1f}"
    lines += [f"  {c['cell']:<{width}}  {value(c['value']):>7}  {c['line']:<10}  {'met' if c['met'] else 'MISSED'}"
              for c in report["cells"]]
    lines.append(f"  {report['met']} of {report['cells_total']} cells met")
    return "\n".join(lines)
