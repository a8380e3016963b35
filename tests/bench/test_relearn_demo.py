import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from surgery.bench.demo import UNLEARN, DemoConfig, targets
from surgery.bench.evaluate import ImageCache, evaluate, percent, score_likelihood
from surgery.bench.finetune import FinetuneConfig
from surgery.bench.relearn import attack_rows, relearn
from surgery.cli import main
from surgery.data import load_jsonl
from surgery.models import load
from surgery.pipeline import torch_threads


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_attack_rows(small_bench):
    forget_vqa = [r for r in load_jsonl(small_bench / "forget.jsonl") if r.is_vqa]
    rows, measured = attack_rows(small_bench, 0.3, seed=4)
    assert len(rows) == round(0.3 * len(forget_vqa)) and all(r.is_vqa for r in rows) and measured is None
    assert {r.id for r in rows} <= {r.id for r in forget_vqa} and len({r.id for r in rows}) == len(rows)
    assert [r.id for r in rows] == [r.id for r in attack_rows(small_bench, 0.3, seed=4)[0]]
    with pytest.raises(ValueError, match="share"):
        attack_rows(small_bench, 0, seed=0)
    with pytest.raises(ValueError, match="hold_out 'faces'"):
        attack_rows(small_bench, 0.3, seed=0, hold_out="faces")


def test_attack_rows_holding_out_people(small_bench, tmp_path):
    """The attacker's rows come from half the forget people; the other half is what is measured."""
    forget_vqa = [r for r in load_jsonl(small_bench / "forget.jsonl") if r.is_vqa]
    people = {r.entity for r in forget_vqa}
    assert len(people) == 2
    for seed in range(4):
        rows, measured = attack_rows(small_bench, 0.3, seed=seed, hold_out="people")
        attackers = {r.entity for r in rows}
        assert len(attackers) == 1 and len(measured) == 1 and attackers | measured == people
        assert not attackers & measured and len(rows) == round(0.3 * len(forget_vqa))
        assert [r.id for r in rows] == [r.id for r in attack_rows(small_bench, 0.3, seed=seed, hold_out="people")[0]]
        # fold 1: the other half attacks, the first is measured
        other, measured1 = attack_rows(small_bench, 0.3, seed=seed, hold_out="people", fold=1)
        assert {r.entity for r in other} == measured and measured1 == attackers
    with pytest.raises(ValueError, match="fold must be 0 or 1"):
        attack_rows(small_bench, 0.3, seed=0, hold_out="people", fold=2)
    # a share beyond the attacker's half: all of their rows, none of the others'
    rows, measured = attack_rows(small_bench, 1.0, seed=0, hold_out="people")
    assert sorted(r.id for r in rows) == sorted(r.id for r in forget_vqa if r.entity not in measured)
    lines = (small_bench / "forget.jsonl").read_text().splitlines()
    bad = tmp_path / "bench"
    bad.mkdir()
    (bad / "images").symlink_to(small_bench / "images")
    first = json.loads(next(line for line in lines if '"image"' in line))
    nameless = [json.dumps({k: v for k, v in json.loads(line).items() if k != "entity"}) for line in lines]
    (bad / "forget.jsonl").write_text("\n".join(nameless) + "\n")
    with pytest.raises(ValueError, match=r"forget.jsonl:\d+: no 'entity'"):
        attack_rows(bad, 0.3, seed=0, hold_out="people")
    one = [line for line in lines if json.loads(line).get("entity") == first["entity"]]
    (bad / "forget.jsonl").write_text("\n".join(one) + "\n")
    with pytest.raises(ValueError, match="1 forget person"):
        attack_rows(bad, 0.3, seed=0, hold_out="people")
    assert attack_rows(bad, 0.3, seed=0)[1] is None      # the paper's attack needs no names


def test_relearn_curve_and_input_untouched(small_bench, tiny_dirs):
    model = tiny_dirs["tiny-llava"]
    before = digest(model)
    r = relearn(model, small_bench, share=0.5, epochs=2, lr=1e-2, seed=0)
    assert len(r["forget_vqa"]) == 3 and r["AG"] == r["forget_vqa"][-1] - r["forget_vqa"][0]
    assert r["before"] == r["forget_vqa"][0] and r["after"] == r["forget_vqa"][-1]
    assert digest(model) == before
    res = CliRunner().invoke(main, ["relearn", "--model", str(model), "--bench", str(small_bench), "--shares", "0.5",
                                    "--epochs", "2", "--lr", "1e-2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["forget_vqa"] == r["forget_vqa"]          # seeded: the same run twice
    res = CliRunner().invoke(main, ["relearn", "--model", str(model), "--bench", str(small_bench), "--shares", "2"])
    assert res.exit_code == 2 and "share" in res.output
    res = CliRunner().invoke(main, ["relearn", "--model", str(model), "--bench", str(small_bench), "--shares",
                                    "0.2,0.5,0.20"])
    assert res.exit_code == 2 and "0.2 given twice" in res.output
    res = CliRunner().invoke(main, ["relearn", "--model", str(model), "--bench", str(small_bench), "--shares", "1",
                                    "--epochs", "2", "--scope", "full", "--lr", "1e6"])
    assert res.exit_code == 1 and "the loss became nan at epoch" in res.output and "lr 1e+06 too large?" in res.output, \
        res.output[-2000:]
    assert digest(model) == before
    assert r["lr"] == 1e-2 and r["hold_out"] == "rows" and r["measured_rows"] == len(
        [x for x in load_jsonl(small_bench / "eval_forget.jsonl") if x.is_vqa and x.options])


def test_an_attack_row_holding_the_image_token_is_named_before_the_attack(small_bench, tiny_dirs, tmp_path,
                                                                         monkeypatch):
    import shutil
    from surgery.data import DataError
    bench = tmp_path / "bench"
    shutil.copytree(small_bench, bench)
    lines = (bench / "forget.jsonl").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if json.loads(line).get("image"))
    row = json.loads(lines[n])
    row["answer"] += " <image>"
    lines[n] = json.dumps(row)
    (bench / "forget.jsonl").write_text("\n".join(lines) + "\n")
    scored = []
    monkeypatch.setattr("surgery.bench.relearn.score_likelihood", lambda *a, **k: scored.append(a))
    with pytest.raises(DataError, match=rf"forget.jsonl:{n + 1}: its answer holds the model's image token '<image>'"):
        relearn(tiny_dirs["tiny-llava"], bench, share=1.0, epochs=1)
    assert not scored


def test_relearn_on_held_out_people(small_bench, tiny_dirs):
    """Measured only on the people the attacker left out, at the protocol's own learning rate; the CLI agrees."""
    model = tiny_dirs["tiny-llava"]
    before = digest(model)
    r = relearn(model, small_bench, share=0.5, epochs=1, seed=3, hold_out="people")
    assert r["hold_out"] == "people" and r["lr"] == 1e-4 and len(r["folds"]) == 2
    eval_rows = [x for x in load_jsonl(small_bench / "eval_forget.jsonl") if x.is_vqa and x.options]
    for fold, f in enumerate(r["folds"]):
        _, measured = attack_rows(small_bench, 0.5, seed=3, hold_out="people", fold=fold)
        assert not set(f["attack_people"]) & measured
        assert f["measured_rows"] == len([x for x in eval_rows if x.entity in measured])
    # every forget person is measured once; the curve is the accuracy over all of them
    assert r["measured_rows"] == len(eval_rows) == sum(f["measured_rows"] for f in r["folds"])
    assert r["rows"] == sum(f["rows"] for f in r["folds"])        # what both attacks trained on, not fold 0's
    for e in range(2):
        assert r["forget_vqa"][e] == pytest.approx(
            sum(f["forget_vqa"][e] * f["measured_rows"] for f in r["folds"]) / r["measured_rows"])
    assert len(r["forget_vqa"]) == 2 and r["AG"] == r["forget_vqa"][1] - r["forget_vqa"][0]
    # both folds start from the model on disk: before either attack, the accuracy is the model's own on every row
    own = percent(score_likelihood(load(str(model), seed=3), eval_rows, ImageCache()))
    assert r["before"] == pytest.approx(own)
    assert digest(model) == before
    res = CliRunner().invoke(main, ["relearn", "--model", str(model), "--bench", str(small_bench), "--shares", "0.5",
                                    "--epochs", "1", "--seed", "3", "--hold-out", "people", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["forget_vqa"] == r["forget_vqa"]
    p = json.loads(res.stdout)[0]["provenance"]
    assert (p["model"], p["seed"], p["environment"]["device"]) == (str(model.resolve()), 3, "cpu")


def test_demo_quick_end_to_end(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = ["demo", "--quick", "--out", str(out), "--cache", str(cache), "--json"]
    threads = torch.get_num_threads()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep == json.loads((out / "report.json").read_text())
    seed = rep["per_seed"]["0"]
    assert not seed["vanilla_cached"] and len(list(cache.glob("vanilla-*"))) == 1
    assert len(list(cache.glob("reference-*"))) == 1 and len(list(cache.glob("bench-0-*"))) == 1
    assert set(seed["results"]) == {"vanilla", "reference", "unlearned", "unlearned (beta=0)"}
    assert {"torch", "transformers", "surgery"} <= set(rep["environment"]) and rep["seeds"] == [0]
    assert rep["threads"] == 1 and torch.get_num_threads() == threads      # pinned for the run, then restored
    assert rep["config"]["unlearn"]["beta"] == UNLEARN["beta"] and "total_s" in rep["timings"] and rep["views"] == "test"
    assert rep["config"]["unlearn"]["stop_forget_accuracy"] == UNLEARN["stop_forget_accuracy"]    # early stop set
    assert rep["config"]["unlearn"]["layers"] == [0, 0]     # the quick tower's one live layer, not UNLEARN's 2-6
    runs = seed["unlearn"].values()                    # ... but --quick's 4 steps are fewer than its check interval
    assert {u["steps_run"] for u in runs} == {4} == {len(u["losses"]) for u in runs}
    # from nothing, one plan: stage 0 and the reference's tower here, the vanilla tower and text there, all timed
    assert {"llm[vanilla]_s[0]", "text[vanilla]_s[0]", "tower[vanilla]_s[0]", "tower[reference]_s[0]",
            "model[reference]_s[0]", "saliency_s[0]", "unlearn[unlearned (beta=0)]_s[0]", "eval[vanilla]_s[0]",
            "seed_s[0]"} <= set(rep["timings"])
    assert rep["environment"]["cpu_capability"] in ("AVX2", "DEFAULT")   # never above AVX2 (surgery/numerics.py)
    assert seed["qa_logprob_max_abs_change"] == {"unlearned": 0.0, "unlearned (beta=0)": 0.0}
    van, unl = seed["results"]["vanilla"], seed["results"]["unlearned"]
    for split in ("forget", "retain", "realworld"):   # the LLM is frozen: text-only rows score the same
        assert unl[split]["qa"] == van[split]["qa"]
    assert rep["mean"]["unlearned"]["forget_vqa"] == unl["forget"]["vqa"]      # one seed: the mean is the value
    assert rep["mean"]["unlearned"]["AG"] == seed["relearn"]["AG"]
    assert rep["mean"]["reference"]["AG"] == seed["relearn_reference"]["AG"]
    assert rep["mean"]["unlearned"]["AG_people"] == seed["relearn_people"]["AG"]
    assert rep["mean"]["reference"]["AG_people"] == seed["relearn_reference_people"]["AG"]
    assert seed["relearn_people"]["hold_out"] == "people" and seed["relearn"]["hold_out"] == "rows"
    a = load_file(str(out / "seed-0" / "unlearned" / "model.safetensors"))
    b = load_file(str(out / "seed-0" / "unlearned-beta0" / "model.safetensors"))
    assert any(not a[k].equal(b[k]) for k in a)
    assert Image.open(out / "demo.png").size[0] > 100
    # the kept runs' reports name where their files are now, not the temporary directory they were written in
    kept = json.loads((out / "seed-0" / "unlearned" / "report.json").read_text())
    assert kept["config"]["out"] == str((out / "seed-0" / "unlearned").resolve())
    assert Path(kept["config"]["saliency"]).is_file() and ".tmp-" not in (out / "report.json").read_text()
    models = {d: load_file(str(out / "seed-0" / d / "model.safetensors")) for d in ("unlearned", "unlearned-beta0")}
    # second run, all in one process: benchmark and models come from the cache, and the numbers are the two-process
    # run's (a previous demo output is replaced without --overwrite)
    r = CliRunner().invoke(main, [*args, "--processes", "1"])
    assert r.exit_code == 0, r.output
    rep2 = json.loads(r.stdout)
    seed2 = rep2["per_seed"]["0"]
    assert rep["config"]["processes"] == 2 and rep2["config"]["processes"] == 1
    assert seed2["vanilla_cached"] and seed2["bench_cached"] and seed2["results"] == seed["results"]
    # with the models cached the saliency is collected in two halves (one per lane) and merged: the same models below
    assert {"saliency[head]_s[0]", "saliency[tail]_s[0]", "saliency_s[0]"} <= set(rep2["timings"])
    assert "saliency[head]_s[0]" not in rep["timings"]
    assert seed2["relearn"] == {**seed["relearn"], "seconds": seed2["relearn"]["seconds"]}
    # the vanilla and reference model's results were kept (result_cache.py), the unlearned models' computed again:
    # computed afresh here, the kept ones are what they were
    kept = {"eval[vanilla]", "eval[reference]", "relearn_reference", "relearn_reference_people"}
    assert seed["results_cached"] == [] and set(seed2["results_cached"]) == kept
    assert seed2["relearn_reference"] == seed["relearn_reference"]
    with torch_threads(1):
        reference = load(seed["reference_model"], seed=0)
        assert json.loads(json.dumps(evaluate(reference, seed["bench"], views="test", rouge=False))) == \
            seed2["results"]["reference"]
        again = relearn(seed["reference_model"], seed["bench"], share=0.2, epochs=1, seed=0, hold_out="rows")
    assert again["forget_vqa"] == seed2["relearn_reference"]["forget_vqa"]
    assert seed2["unlearn"]["unlearned"]["losses"] == seed["unlearn"]["unlearned"]["losses"]
    for d, weights in models.items():
        again = load_file(str(out / "seed-0" / d / "model.safetensors"))
        assert all(again[k].equal(w) for k, w in weights.items())
    # third run, two processes, the models cached: the saliency's halves on the two lanes, the first half's sums sent
    # from the spawned process; the same saliency file and models as the one pass of the first run
    saliency = load_file(str(out / "seed-0" / "unlearned" / "saliency.safetensors"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep3 = json.loads(r.stdout)
    assert rep3["per_seed"]["0"]["results"] == seed["results"] and "saliency[head]_s[0]" in rep3["timings"]
    again = load_file(str(out / "seed-0" / "unlearned" / "saliency.safetensors"))
    assert again.keys() == saliency.keys() and all(again[k].equal(t) for k, t in saliency.items())
    for d, weights in models.items():
        again = load_file(str(out / "seed-0" / d / "model.safetensors"))
        assert all(again[k].equal(w) for k, w in weights.items())
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(other), "--cache", str(cache)])
    assert r.exit_code == 1 and "not a demo output" in r.output and (other / "keep.txt").exists()


def test_demo_edits_the_towers_deepest_live_layers():
    deepest = FinetuneConfig().vision_layers - 2            # LLaVA reads layer -2: the tower's last layer is dead
    assert UNLEARN["layers"] == (deepest - 4, deepest) == DemoConfig.make().unlearn["layers"]     # the five deepest
    assert DemoConfig.make(quick=True).unlearn["layers"] == (FinetuneConfig.quick().vision_layers - 2,) * 2
    assert DemoConfig.make(quick=True, unlearn={"layers": (0, 1)}).unlearn["layers"] == (0, 1)     # --set is kept
    assert DemoConfig.make(unlearn={"layers": None}).unlearn["layers"] is None                      # every live layer


def test_demo_seeds_dev_views_and_settings(tmp_path):
    """--seeds: one benchmark and model set per seed, the mean and sample sd over them; --views dev; --set."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    r = CliRunner().invoke(main, ["demo", "--quick", "--no-ablation", "--no-reference", "--seeds", "1,2", "--views",
                                  "dev", "--set", "alpha=2", "--set", "layers=null", "--out", str(out),
                                  "--cache", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["seeds"] == [1, 2] and rep["views"] == "dev" and rep["config"]["unlearn"]["alpha"] == 2
    assert rep["config"]["unlearn"]["layers"] is None                  # --set layers=null: every live layer
    assert set(rep["per_seed"]["1"]["results"]) == {"vanilla", "unlearned"}
    assert rep["per_seed"]["1"]["bench_digest"] != rep["per_seed"]["2"]["bench_digest"]
    xs = [rep["per_seed"][s]["results"]["vanilla"]["retain"]["vqa"] for s in ("1", "2")]
    assert rep["mean"]["vanilla"]["retain_vqa"] == pytest.approx(sum(xs) / 2)
    assert rep["spread"]["vanilla"]["retain_vqa"] == pytest.approx(abs(xs[0] - xs[1]) / 2 ** 0.5)
    assert (out / "seed-2" / "unlearned" / "model.safetensors").is_file()
    r = CliRunner().invoke(main, ["demo", "--quick", "--set", "nope=1", "--out", str(tmp_path / "x"),
                                  "--cache", str(cache)])
    assert r.exit_code != 0 and "--set nope" in r.output and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, ["demo", "--quick", "--processes", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--processes" in r.output and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--processes 0"):
        DemoConfig.make(processes=0)
    for bad, match in (({"stop_forget_loss": 0}, "stop_forget_loss=0"), ({"stop_forget_loss": "x"}, "number > 0"),
                       ({"stop_window": 0}, "stop_window=0"), ({"stop_window": 2.5}, "whole number"),
                       ({"stop_forget_accuracy": 150}, "stop_forget_accuracy=150"),
                       ({"stop_forget_loss": 1.25}, "not both"), ({"stop_every": 0}, "stop_every=0")):
        with pytest.raises(ValueError, match=match):
            DemoConfig.make(unlearn=bad)
    assert DemoConfig.make(unlearn={"stop_forget_accuracy": None, "steps": 150}).unlearn["stop_forget_accuracy"] is None
    # run settings a run would refuse are refused when given, not after the models are built
    for bad, match in (({"lr": "abc"}, "--lr 'abc'"), ({"schedule": "bogus"}, "--schedule 'bogus'"),
                       ({"steps": 0}, "--steps 0"), ({"mask_frac": 2}, "mask_frac=2"),
                       ({"max_grad_norm": -1}, "--max-grad-norm -1")):
        with pytest.raises(ValueError, match=match):
            DemoConfig.make(unlearn=bad)
    assert DemoConfig.make(quick=True, unlearn={"steps": 7}).unlearn["steps"] == 7     # --quick keeps the user's length
    assert DemoConfig.make(quick=True).unlearn["steps"] == 4
    for quick in (True, False):   # --set epochs replaces the demo's step count, and --set steps its epochs
        assert DemoConfig.make(quick=quick, unlearn={"epochs": 1}).unlearn["steps"] is None
    with pytest.raises(ValueError, match=r"--seeds: expected distinct seeds in \[0, 2\^32\)"):
        DemoConfig.make(seeds=(0, 2**32))
    # found in review: refused before the benchmark and models are built (they crashed, or ran, after)
    for bad, match in (({"layers": 5}, "--layers 5: expected two layer numbers"),
                       ({"layers": "4-6"}, "--layers '4-6': expected two layer numbers"),
                       ({"layers": (1, 0)}, r"--layers \(1, 0\)"),
                       ({"layers": (9, 9)}, "the demo.s tower has live layers 0-6"),
                       ({"layers": (7, 7)}, "live layers 0-6"),
                       ({"dtype": "fp8"}, "--dtype 'fp8'"), ({"device": "tpu"}, "--device 'tpu'"),
                       ({"distill_images": str(tmp_path / "none.jsonl")}, "distill_images=.*file not found"),
                       ({"manu_weights": (1, 1)}, "--manu-weights"),
                       ({"mask_threshold": 2.0, "mask_frac": 0.5}, "give one, not both")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            DemoConfig.make(unlearn=bad)
    chosen = DemoConfig.make(quick=True, unlearn={"mask_frac": 0.5}).unlearn   # the user's selection replaces the demo's
    assert chosen["mask_frac"] == 0.5 and chosen["mask_threshold"] is None
    assert DemoConfig.make(unlearn={"prune_threshold": 2.0}).unlearn["prune_frac"] is None
    r = CliRunner().invoke(main, ["demo", "--quick", "--seeds", "1_0", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "expected comma-separated seeds" in r.output
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(cache / "sub"), "--cache", str(cache)])
    assert r.exit_code == 1 and "is inside --cache" in r.output and not (cache / "sub").exists()
    (tmp_path / "afile").write_text("")
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "x"), "--cache", str(tmp_path / "afile")])
    assert r.exit_code == 1 and "--cache" in r.output and "is a file" in r.output and not (tmp_path / "x").exists()


def test_targets_are_checked_on_the_means_for_both_attacks():
    """Each target against a hand-made mean table: the issue's AG checks on the paper's attack, the same two for the
    attack on held-out people under their own names, and none for an attack that did not run."""
    cols = {"forget_vqa": 40.0, "retain_vqa": 90.0, "realworld_vqa": 86.0}
    mean = {"vanilla": {"forget_vqa": 90.0, "retain_vqa": 92.0, "realworld_vqa": 91.0}, "unlearned": cols,
            "unlearned (beta=0)": {**cols, "retain_vqa": 84.0}}
    checks = targets(mean, [0.0, 0.0], {"rows": (44.7, 39.8), "people": (7.7, -2.0)}, beta=3.0)
    assert checks == {"forget VQA <= chance + 15": True, "retain VQA within 5 of vanilla": True,
                      "real-world VQA within 5 of vanilla": True,
                      "every QA option log-likelihood bit-identical to vanilla": True,
                      "beta 3 keeps more retain VQA than beta 0": True,
                      "AG <= 10": False, "AG within 5 of the reference model's": True,
                      "AG on held-out people <= 10": True,
                      "AG on held-out people within 5 of the reference model's": False}
    checks = targets({**mean, "unlearned": {**cols, "forget_vqa": 40.5, "realworld_vqa": 85.9}}, [0.0, 1e-9],
                     {"rows": (None, None), "people": (3.0, None)}, beta=0.3)
    assert checks["forget VQA <= chance + 15"] is False and checks["real-world VQA within 5 of vanilla"] is False
    assert checks["every QA option log-likelihood bit-identical to vanilla"] is False
    assert "AG <= 10" not in checks and checks["AG on held-out people <= 10"] is True
    assert not any("reference" in k for k in checks)
