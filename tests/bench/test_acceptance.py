"""`surgery accept`: the benchmark's nineteen acceptance cells, their lines checked against hand-written values, and
the command's numbers against the option likelihoods scored one split at a time."""
import json

import pytest
from click.testing import CliRunner

from surgery.bench.ablation import ablated
from surgery.bench.acceptance import cells, render
from surgery.bench.evaluate import score_likelihood
from surgery.cli import main
from surgery.data import load_jsonl
from surgery.models import load


def results(**changes):
    """Evaluate-shaped results where every cell meets its line, then `changes` ({"run/split/key": value})."""
    good = {"vqa": 90.0, "qa": 100.0, "vqa_letter": 85.0, "qa_letter": 90.0}
    res = {"vanilla": {s: dict(good) for s in ("forget", "retain", "realworld")},
           "vanilla (ablate mlp)": {s: {"vqa": 30.0} for s in ("forget", "retain", "realworld")},
           "vanilla (ablate embeddings)": {s: {"vqa": 30.0} for s in ("forget", "retain", "realworld")},
           "reference": {"forget": {"vqa": 25.0}, "retain": {"vqa": 90.0}, "realworld": {"vqa": 90.0}}}
    for where, value in changes.items():
        run, split, key = where.split("/")
        res[run][split][key] = value
    return res


def missed(res):
    return [c["cell"] for c in cells(res) if not c["met"]]


def test_nineteen_cells_each_at_its_line():
    table = cells(results())
    assert len(table) == 19 and all(c["met"] for c in table)
    # a value on its line meets it; just past it misses (chance 25: the ablations and the reference at most 35)
    assert missed(results(**{"vanilla/forget/vqa": 85.0, "vanilla/retain/qa": 95.0, "vanilla/realworld/qa_letter": 80.0,
                             "vanilla (ablate mlp)/forget/vqa": 35.0, "reference/forget/vqa": 35.0,
                             "reference/retain/vqa": 93.0, "reference/realworld/vqa": 87.0})) == []
    assert missed(results(**{"vanilla/forget/vqa": 84.9})) == ["vanilla vqa forget"]
    assert missed(results(**{"vanilla/retain/qa": 94.5})) == ["vanilla qa retain"]
    assert missed(results(**{"vanilla/realworld/vqa_letter": 79.5})) == ["vanilla vqa letter realworld"]
    assert missed(results(**{"vanilla/forget/qa_letter": 70.0})) == ["vanilla qa letter forget"]
    assert missed(results(**{"vanilla (ablate embeddings)/retain/vqa": 35.5})) == ["ablate embeddings: vqa retain"]
    assert missed(results(**{"vanilla (ablate mlp)/realworld/vqa": 90.0})) == []     # not a cell
    assert missed(results(**{"reference/forget/vqa": 36.0})) == ["reference vqa forget"]
    # three options a row: chance 33.3, so the line is 43.3
    three = {c["cell"]: c for c in cells(results(**{"reference/forget/vqa": 43.0}), 100 / 3)}
    assert three["reference vqa forget"]["met"] and three["reference vqa forget"]["line"] == "<= 43.3333"
    # the reference within 3 of the vanilla model, either way
    assert missed(results(**{"reference/retain/vqa": 93.5, "reference/realworld/vqa": 86.5})) == [
        "reference - vanilla vqa retain", "reference - vanilla vqa realworld"]
    gap = {c["cell"]: c["value"] for c in cells(results(**{"reference/retain/vqa": 88.0}))}
    assert gap["reference - vanilla vqa retain"] == -2.0
    # a benchmark without a split's rows (evaluate gives None, or no split at all): its cells miss, with no value
    res = results(**{"vanilla/forget/qa_letter": None})
    del res["reference"]["realworld"]
    table = {c["cell"]: c for c in cells(res)}
    assert [name for name, c in table.items() if not c["met"]] == ["vanilla qa letter forget",
                                                                 "reference - vanilla vqa realworld"]
    assert table["reference - vanilla vqa realworld"]["value"] is None
    assert "no rows" in render({"views": "test", "bench": "B", "cells": list(table.values()), "met": 17,
                                "cells_total": 19})


def test_accept_scores_as_the_likelihoods_say(small_bench, tiny_dirs):
    """The same model as vanilla and reference: the command's VQA cells are the option likelihoods' accuracy (as
    they are, and under each ablation), the reference's distances are exactly 0, and the exit status says whether
    a cell missed."""
    path = str(tiny_dirs["tiny-llava"])
    r = CliRunner().invoke(main, ["accept", "--bench", str(small_bench), "--vanilla", path, "--reference", path,
                                  "--resamples", "20", "--json"])
    report = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])[str(small_bench)]
    table = {c["cell"]: c for c in report["cells"]}
    assert len(table) == 19 and report["met"] == sum(c["met"] for c in table.values()) and report["chance"] == 25.0
    p = report["provenance"]
    assert (p["vanilla"], p["bench"], p["resamples"]) == (str(tiny_dirs["tiny-llava"].resolve()),
                                                          str(small_bench.resolve()), 20)
    assert r.exit_code == (0 if report["met"] == 19 else 1), r.output
    if report["met"] < 19:
        assert f"{19 - report['met']} of 19 acceptance cells missed" in r.output
    model = load(path)
    for ablate, name in ((None, "vanilla vqa {}"), ("mlp", "ablate mlp: vqa {}"),
                         ("embeddings", "ablate embeddings: vqa {}")):
        for split in ("forget", "retain"):
            rows = [x for x in load_jsonl(small_bench / f"eval_{split}.jsonl") if x.options and x.is_vqa]
            with ablated(model, ablate):
                expect = 100 * sum(score_likelihood(model, rows)) / len(rows)
            assert table[name.format(split)]["value"] == pytest.approx(expect)
    assert table["reference - vanilla vqa retain"]["value"] == 0.0
    assert table["reference - vanilla vqa realworld"]["met"]


def test_accept_reads_a_demo_report(small_bench, tiny_dirs, tmp_path):
    """--report takes each seed's benchmark and models from a demo report.json and labels them by seed: the same
    cells as the directories given by hand."""
    path = str(tiny_dirs["tiny-llava"])
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"per_seed": {"5": {"bench": str(small_bench), "vanilla_model": path,
                                                     "reference_model": path}}}))

    def cells_of(*args):
        r = CliRunner().invoke(main, ["accept", *args, "--resamples", "20", "--json"])
        return r, json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])

    r, by_report = cells_of("--report", str(report))
    assert list(by_report) == ["seed 5"] and "seed 5: test views of" in r.output
    _, by_hand = cells_of("--bench", str(small_bench), "--vanilla", path, "--reference", path)
    assert by_report["seed 5"]["cells"] == by_hand[str(small_bench)]["cells"]


def test_accept_refuses_bad_input(tmp_path, small_bench):
    run = lambda *args: CliRunner().invoke(main, ["accept", *map(str, args)])
    r = run("--bench", small_bench)
    assert r.exit_code == 2 and "all of --bench, --vanilla and --reference" in r.output
    report = tmp_path / "report.json"
    for text in ("[1, 2]", '{"per_seed": [1]}', '{"per_seed": {"0": 3}}'):
        report.write_text(text)
        r = run("--report", report)
        assert r.exit_code == 2 and "not a `surgery demo` report.json" in r.output, text
    report.write_text('{"per_seed": {"0": {"bench"')      # cut short: where the JSON ends
    r = run("--report", report)
    assert r.exit_code == 2 and "not valid JSON" in r.output and "line 1, column 28" in r.output, r.output
    report.write_text(json.dumps({"per_seed": {"4": {"reference_model": "r"}}}))
    r = run("--report", report)
    assert r.exit_code == 2 and "seed 4 names no bench or vanilla_model" in r.output
    report.write_text(json.dumps({"per_seed": {"3": {"bench": str(small_bench), "vanilla_model": "v",
                                                     "reference_model": None}}}))
    r = run("--report", report)
    assert r.exit_code == 2 and "seed 3 has no reference model" in r.output
    r = run("--report", report, "--bench", small_bench)
    assert r.exit_code == 2 and "drop --bench" in r.output
    r = run("--bench", tmp_path / "nope", "--vanilla", "v", "--reference", "r")
    assert r.exit_code == 1 and "no such directory" in r.output
