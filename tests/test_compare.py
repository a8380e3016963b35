"""`surgery compare` on a hand-made benchmark and a tiny saved model (no fine-tuning): a diverging method is reported
as diverged, results come from the cache on a re-run, and only what is new is computed."""
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import surgery.compare as compare_mod
from surgery.cli import main
from surgery.compare import CompareConfig, cache_key, compare
from surgery.config import Config
from surgery.pipeline import peak_rss

PEOPLE = {"forget": ["Ada Velk", "Bo Quist"], "retain": ["Cy Morrow", "Di Tallis", "Ed Brisk"],
          "realworld": ["Flo Osei", "Gus Varga"]}
CITIES = ["Oslo", "Lima", "Kyiv", "Rome", "Pune"]


def mini_bench(path, seed=0):
    """forget.jsonl / retain.jsonl (two image views and one text row per person) and eval_<split>.jsonl (one held-out
    view and the text row), all multiple choice A-D, in the benchmark's row format."""
    rng = np.random.default_rng(seed)
    (path / "images").mkdir(parents=True)
    everyone = [name for group in PEOPLE.values() for name in group]

    def row(question, value, pool, image=None, entity=None):
        others = [v for v in pool if v != value]
        values = [value, *rng.choice(others, 3, replace=False).tolist()]
        order = rng.permutation(4)
        options = {"ABCD"[i]: values[j] for i, j in enumerate(order)}
        letter = "ABCD"[int(np.nonzero(order == 0)[0][0])]
        r = {"question": question, "answer": f"{value} ({letter})", "options": options, "correct": letter,
             "entity": entity}
        return {**r, "image": image} if image else r

    for split, group in PEOPLE.items():
        train, test = [], []
        for k, name in enumerate(group):
            base = rng.integers(0, 255, size=3)
            for view in range(3):
                image = f"images/{split}{k}_{view}.png"
                pixels = np.clip(base + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(path / image)
                (train if view < 2 else test).append(row("Who is the person in the image?", name, everyone, image, name))
            city = CITIES[k % len(CITIES)]
            train.append(row(f"Where was {name} born?", city, CITIES, entity=name))
            test.append(row(f"Where was {name} born?", city, CITIES, entity=name))
        for name, rows in ([(split, train)] if split != "realworld" else []) + [(f"eval_{split}", test)]:
            (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path):
    return mini_bench(tmp_path / "bench")


def small(bench, model, **kw) -> CompareConfig:
    return CompareConfig(**{"bench": str(bench), "model": str(model), "seeds": (3,), "steps": 2, "lr": 1e-3,
                            "relearn_epochs": 1, "generation": False, **kw})


def test_diverged_method_is_reported_not_scored_and_results_are_cached(tmp_path, monkeypatch, bench, tiny_dirs):
    cache, model = tmp_path / "cache", tiny_dirs["tiny-llava"]
    # MANU alone, in its own process (the default): scored, with that process's own peak memory, which a large
    # parent must not leak into (getrusage's ru_maxrss would: it survives fork and exec)
    ballast = np.ones(384 * 2**20 // 8)
    import os
    monkeypatch.chdir(tmp_path)       # --bench and --model given relative: the report names them absolute
    first = compare(tmp_path / "a", small(os.path.relpath(bench), os.path.relpath(model), methods=("manu",)), cache,
                    progress=False)
    monkeypatch.undo()
    assert peak_rss() - first["seeds"]["3"]["methods"]["manu"]["memory"]["peak_rss_bytes"] > 256 * 2**20
    del ballast
    assert json.loads(json.dumps(first, default=str)) == json.loads((tmp_path / "a" / "report.json").read_text())
    manu = first["seeds"]["3"]["methods"]["manu"]
    assert manu["status"] == "ok" and manu["trainable_weights"] == 0 and manu["pruned_neurons"] > 0
    assert manu["scope"] == "full" and manu["memory_isolated"] and manu["memory"]["peak_rss_bytes"] > 2**20
    assert manu["AG"] == manu["relearn"]["forget_vqa"][-1] - manu["relearn"]["forget_vqa"][0]
    assert manu["AG_people"] == manu["relearn_people"]["AG"] and manu["relearn_people"]["hold_out"] == "people"
    assert first["summary"]["manu"]["AG_people"]["mean"] == manu["AG_people"]
    assert set(manu["scores"]) == {"forget", "retain", "realworld"}
    assert first["summary"]["manu"]["forget_vqa"]["mean"] == manu["scores"]["forget"]["vqa"]
    assert first["seeds"]["3"]["vanilla_model"] == str(model) and first["seeds"]["3"]["bench"] == str(bench)
    assert first["seeds"]["3"]["vanilla_source"] == "--model" and manu["dtype"] == "float32"
    assert first["out"] == str((tmp_path / "a").resolve()) and first["cache"] == str(cache.resolve())
    assert (first["compare"]["bench"], first["compare"]["model"]) == (str(bench.resolve()), str(model.resolve()))
    assert sorted(first["computed"]) == ["manu@3", "vanilla@3"] and not first["failed"]
    assert (tmp_path / "a" / "table.md").read_text().startswith("| method |")
    assert Image.open(tmp_path / "a" / "compare.png").size[0] > 100

    # GA added (in this process): an absurd learning rate sends its weights to inf at once, the loop's guard stops
    # the run, and the table says so; MANU comes from the cache
    cfg = small(bench, model, methods=("manu", "ga"), overrides={"ga": {"lr": 1e30}}, isolate=False)
    rep = compare(tmp_path / "b", cfg, cache, progress=False)
    assert rep["computed"] == ["ga@3"] and rep["seeds"]["3"]["methods"]["manu"]["scores"] == manu["scores"]
    ga = rep["seeds"]["3"]["methods"]["ga"]
    assert ga["status"] == "diverged" and "ga: " in ga["error"] and "not finite" in ga["error"]
    ga_row = next(line for line in rep["table"].splitlines() if line.startswith("| ga |"))
    assert "**diverged**" in ga_row and "–" in ga_row
    assert rep["summary"]["ga"]["scored"] == 0 and rep["summary"]["ga"]["forget_vqa"]["mean"] is None

    # the same comparison again: nothing runs, every result (the divergence too) comes from the cache
    monkeypatch.setattr(compare_mod, "_execute",
                        lambda job, isolate: pytest.fail(f"recomputed {job['config']['method']}"))
    again = compare(tmp_path / "c", cfg, cache, progress=False)
    assert again["computed"] == [] and again["summary"] == rep["summary"]

    # a new setting of a cached method: only that run
    monkeypatch.undo()
    more = small(bench, model, methods=("manu", "ga"), overrides={"ga": {"lr": 1e30}, "manu": {"prune_frac": 0.05}},
                 isolate=False)
    third = compare(tmp_path / "d", more, cache, progress=False)
    assert third["computed"] == ["manu@3"]
    assert third["seeds"]["3"]["methods"]["manu"]["pruned_neurons"] > manu["pruned_neurons"]
    assert third["summary"]["manu"]["peak_rss_bytes"]["n"] == 0          # in-process: no fair peak to report

    # a run that fails is counted as failed, not as computed, and not cached
    def boom(job, isolate):
        raise RuntimeError("boom")
    monkeypatch.setattr(compare_mod, "_execute", boom)
    failing = replace(more, overrides={"ga": {"lr": 1e30}, "manu": {"prune_frac": 0.07}})
    fourth = compare(tmp_path / "e", failing, cache, progress=False)
    assert fourth["failed"] == ["manu@3"] and fourth["computed"] == [] and sorted(fourth["reused"]) == ["ga@3", "vanilla@3"]
    assert fourth["seeds"]["3"]["methods"]["manu"] == {"status": "failed", "error": "RuntimeError: boom",
                                                       "cache_key": fourth["seeds"]["3"]["methods"]["manu"]["cache_key"]}
    assert fourth["summary"]["manu"]["failed"] == 1 and "**failed** (1 of 1)" in fourth["table"]


def test_bad_options_name_the_option(tmp_path):
    run = CliRunner().invoke
    r = run(main, ["compare", "--methods", "ga,nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--methods" in r.output and "nope" in r.output
    r = run(main, ["compare", "--methods", "ga", "--set", "ga.not_a_field=1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--set ga.not_a_field" in r.output
    r = run(main, ["compare", "--methods", "ga", "--set", "npo.npo_beta=1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not among --methods" in r.output
    r = run(main, ["compare", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--model needs --bench" in r.output
    r = run(main, ["compare", "--seeds", "0,0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--seeds" in r.output
    for seeds in ("1_0", "+3", "\u0663"):      # int() reads them all; a seed is written in ASCII digits
        r = run(main, ["compare", "--seeds", seeds, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and "expected comma-separated seeds" in r.output, seeds
    r = run(main, ["compare", "--lr", "inf", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--lr" in r.output
    r = run(main, ["compare", "--methods", "vkd", "--set", "vkd.mask_frac=0.5", "--set", "vkd.mask_threshold=2",
                   "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "give one, not both" in r.output and "--set vkd.…" in r.output
    r = run(main, ["compare", "--methods", "ga", "--set", "ga.layers=5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--layers 5: expected two layer numbers" in r.output
    r = run(main, ["compare", "--methods", "ga", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "c" / "x")])
    assert r.exit_code == 1 and "is inside --cache" in r.output
    r = run(main, ["compare", "--methods", "ga", "--set", "ga.lr=-1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--set ga.…: --lr -1" in r.output
    r = run(main, ["compare", "--methods", "ga", "--device", "tpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--device 'tpu': not a device" in r.output
    bench, model = tmp_path / "bench", tmp_path / "models" / "m"
    bench.mkdir()
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    r = run(main, ["compare", "--methods", "ga", "--bench", str(bench), "--model", str(model), "--out",
                   str(tmp_path / "models"), "--overwrite"])
    assert r.exit_code == 1 and "holds --model" in r.output and (model / "config.json").is_file()
    assert not (tmp_path / "o").exists()


def test_seeds_aggregate_to_mean_and_sample_std():
    """Two benchmark seeds: each cell is the mean ± sample standard deviation over the seeds where the run was
    scored; a run diverged on one seed is named in the table; letter accuracy gets its own table."""
    def scores(v, letter=None):
        return {s: {"vqa": v, "qa": 100.0, **({"vqa_letter": letter, "qa_letter": letter} if letter else {}),
                    "rougeL_vqa": 50.0} for s in ("forget", "retain", "realworld")}

    def ok(v, ag):
        return {"status": "ok", "scores": scores(v, 30.0), "AG": ag, "step_s": 0.5, "prepare_s": 1.0, "train_s": 2.0,
                "trainable_weights": 10, "pruned_neurons": 0, "memory": {"peak_rss_bytes": 2**30},
                "memory_isolated": True, "scope": "mlp"}

    seeds = {0: {"vanilla": scores(90.0, 25.0), "methods": {"ga": ok(20.0, 10.0), "vkd": ok(40.0, 5.0)}},
             1: {"vanilla": scores(80.0, 25.0), "methods": {"ga": {"status": "diverged", "error": "x"},
                                                             "vkd": ok(60.0, 15.0)}}}
    summary = compare_mod.summarize(seeds, ("ga", "vkd"))
    assert summary["vkd"]["forget_vqa"]["mean"] == 50.0
    assert summary["vkd"]["forget_vqa"]["std"] == pytest.approx(14.142, abs=1e-3)     # sample std of 40, 60
    assert summary["vkd"]["AG"]["mean"] == 10.0 and summary["vkd"]["unlearn_s"]["mean"] == 3.0
    assert summary["ga"]["scored"] == 1 and summary["ga"]["diverged"] == 1
    assert summary["ga"]["forget_vqa"]["std"] is None
    text = compare_mod.table(summary, ("ga", "vkd"), (0, 1))
    likelihood, letter, note = text.split("\n\n")
    assert summary["vkd"]["AG_people"]["mean"] is None       # not attacked that way: a dash, not a number
    assert "| vkd | 50.0 ± 14.1 |" in likelihood and "| vanilla | 85.0 ± 7.1 |" in likelihood
    assert "| ga (diverged on 1 of 2 seeds) | 20.0 |" in likelihood and "1.00" in likelihood   # 1 GiB peak
    assert "(letter)" in letter.splitlines()[0] and "| vkd | 30.0 ± 0.0 |" in letter
    assert "over 2 benchmark seeds (0, 1)" in note
    seeds[0]["methods"]["vkd"] = {"status": "failed", "error": "RuntimeError: x"}   # a failure on one seed is said
    partial = compare_mod.table(compare_mod.summarize(seeds, ("ga", "vkd")), ("ga", "vkd"), (0, 1))
    assert "| vkd (failed on 1 of 2 seeds) | 60.0 |" in partial
    given = compare_mod.table(summary, ("ga", "vkd"), (0, 1), given="model").split("\n\n")[-1]
    assert "over 2 seeds (one benchmark and one vanilla model, --bench and --model: the seeds vary the runs only)" \
        in given   # the same model twice is not a spread over benchmarks


def key(**kw) -> str:
    """A VKD run's compare cache key."""
    return cache_key(Config(method="vkd", steps=150, **kw), True, "v", "d", CompareConfig())


def key_before(monkeypatch, added) -> str:
    """The key of a default VKD run as computed before Config had the fields for which added(name) is true."""
    to_dict = Config.to_dict
    monkeypatch.setattr(Config, "to_dict", lambda self: {k: v for k, v in to_dict(self).items() if not added(k)})
    try:
        return key()
    finally:
        monkeypatch.undo()


def test_cache_key_ignores_an_unused_early_stop_and_follows_a_used_one(monkeypatch):
    # the key of a run without early stop is the key from before the option existed: neither field is hashed
    assert key_before(monkeypatch, lambda k: k.startswith("stop_")) == key()
    assert key() == key(stop_window=25)                       # no early stop: the window changes nothing
    assert key(stop_forget_loss=1) == key(stop_forget_loss=1.0)
    assert key(stop_forget_loss=1.25) != key()
    assert key(stop_forget_loss=1.25) != key(stop_forget_loss=1.25, stop_window=25)
    assert key(stop_forget_loss=1.25) != key(stop_forget_loss=1.5)
    assert key() == key(stop_holdout=0.5, stop_every=3)        # no accuracy stop: its options change nothing
    assert key(stop_forget_accuracy=30) == key(stop_forget_accuracy=30.0) != key()
    assert key(stop_forget_accuracy=30) != key(stop_forget_accuracy=30, stop_holdout=0.5)
    assert key(stop_forget_accuracy=30) != key(stop_forget_accuracy=30, stop_every=5)
    assert key(stop_forget_accuracy=30) != key(stop_forget_loss=30)
    for bad, match in (({"stop_forget_loss": 0}, "--set vkd.stop_forget_loss=0"),
                       ({"stop_forget_loss": 1.0, "stop_window": 0}, "--set vkd.stop_window=0"),
                       ({"stop_forget_accuracy": 101}, "--set vkd.stop_forget_accuracy=101"),
                       ({"stop_forget_accuracy": 30, "stop_forget_loss": 1.0}, "not both"),
                       ({"stop_forget_accuracy": 30, "stop_holdout": 1.0}, "--set vkd.stop_holdout=1.0")):
        with pytest.raises(ValueError, match=match):
            CompareConfig(methods=("vkd",), overrides={"vkd": bad}).check()


@pytest.mark.parametrize("option", ["checkpoint_vision", "offload_optimizer"])
def test_cache_key_omits_later_memory_options_when_off(monkeypatch, option):
    """--checkpoint-vision and --offload-optimizer came later: off, they are not hashed (the keys from before them
    hold); on, they are."""
    assert key_before(monkeypatch, lambda k: k == option) == key() != key(**{option: True})


def test_a_broken_benchmark_is_an_input_error_before_any_run(tmp_path, bench, tiny_dirs, monkeypatch):
    """A duplicate id across forget/retain or an eval_forget without multiple-choice photo rows used to be scored on
    the vanilla model and then reported as every method's failure, with a table of failures written."""
    ran = []
    monkeypatch.setattr(compare_mod, "_score", lambda *a, **k: ran.append(a) or {})
    retain = (bench / "retain.jsonl").read_text().splitlines()
    first = json.loads((bench / "forget.jsonl").read_text().splitlines()[0])
    (bench / "forget.jsonl").write_text("".join(json.dumps({**json.loads(l), "id": f"f{i}"}) + "\n" for i, l in
                                                enumerate((bench / "forget.jsonl").read_text().splitlines())))
    (bench / "retain.jsonl").write_text("\n".join(retain + [json.dumps({**first, "id": "f0"})]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"retain.jsonl:\d+: id 'f0' is already the id of .*forget.jsonl:1"):
        compare(out, small(bench, tiny_dirs["tiny-llava"]), cache=tmp_path / "cache")
    assert not ran and not out.exists()
    (bench / "retain.jsonl").write_text("\n".join(retain) + "\n")
    text_only = [json.loads(l) for l in (bench / "eval_forget.jsonl").read_text().splitlines()]
    (bench / "eval_forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_only if "image" not in r))
    with pytest.raises(ValueError, match=r"eval_forget.jsonl: no multiple-choice VQA rows"):
        compare(out, small(bench, tiny_dirs["tiny-llava"]), cache=tmp_path / "cache")
    assert not ran and not out.exists()
