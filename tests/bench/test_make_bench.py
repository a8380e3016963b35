import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from surgery.bench.make_bench import BOLD, LETTERS, MIN_DIFFERENT, make_bench
from surgery.cli import main
from surgery.data import load_jsonl

SPLIT_FILES = ("train", "forget", "retain", "dev_forget", "dev_retain", "dev_realworld", "eval_forget", "eval_retain",
               "eval_realworld")


def files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(people=6, real_world=4, extra_people=3, tower_views=1, train_views=2, dev_views=1, test_views=1,
              image_size=24)
    make_bench(tmp_path / "a", seed=11, **kw)
    make_bench(tmp_path / "b", seed=11, **kw)
    make_bench(tmp_path / "c", seed=12, **kw)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"] and a["images/p000_train0.png"] != c["images/p000_train0.png"]


def test_splits_rows_and_answers(small_bench):
    people = {p["name"]: p for p in json.loads((small_bench / "people.json").read_text())}
    splits = {p["split"] for p in people.values()}
    assert splits == {"forget", "retain", "realworld"}
    assert sum(p["split"] == "forget" for p in people.values()) == 2          # 25 % of 8
    assert sum(p["split"] == "realworld" for p in people.values()) == 4
    for name in SPLIT_FILES:
        raw = jsonl(small_bench / f"{name}.jsonl")
        rows = load_jsonl(small_bench / f"{name}.jsonl")                       # valid for the pipeline
        assert len(rows) == len(raw) > 0
        for r in raw:
            person = people[r["entity"]]
            kind = name.split("_")[0]
            if kind in ("eval", "dev"):
                assert person["split"] == name.split("_")[1]
                view = "_test" if kind == "eval" else "_dev"                    # held-out views only
                assert "image" not in r or view in r["image"]
            elif name in ("forget", "retain"):
                assert person["split"] == name and ("image" not in r or "_train" in r["image"])
            if r["task"] == "mc":
                value = r["entity"] if r["attribute"] == "name" else person[r["attribute"]]
                assert sorted(r["options"]) == list(LETTERS) and len(set(r["options"].values())) == 4
                assert r["options"][r["correct"]] == value and r["answer"] == f"{value} ({r['correct']})"
            else:
                assert (r["entity"] in r["answer"]) and (r["attribute"] == "name" or person[r["attribute"]] in r["answer"])
            assert ("image" in r) == ("in the image" in r["question"])
    train = (small_bench / "train.jsonl").read_text()
    assert all(json.loads(l)["id"] in train for l in (small_bench / "forget.jsonl").read_text().splitlines())


def test_views_are_disjoint_and_pretraining_sees_tower_views_only(small_bench):
    """The tower's photos, the VQA training photos, the dev and the test photos of a person are four disjoint sets:
    neither the tower nor the LLM ever sees a dev or test photo, and the LLM learns from photos the tower did not."""
    params = json.loads((small_bench / "bench.json").read_text())["params"]
    seen = {kind: {r["image"] for name in SPLIT_FILES if name.startswith(prefix)
                   for r in jsonl(small_bench / f"{name}.jsonl") if "image" in r}
            for kind, prefix in (("train", "train"), ("dev", "dev_"), ("test", "eval_"))}
    pretrain = jsonl(small_bench / "pretrain.jsonl")
    seen["tower"] = {r["image"] for r in pretrain}
    kinds = list(seen)
    assert all(not seen[a] & seen[b] for i, a in enumerate(kinds) for b in kinds[i + 1:])
    assert all("_tower" in image for image in seen["tower"])
    people = {p["name"]: p for p in json.loads((small_bench / "people.json").read_text())}
    assert all(sum(r["entity"] == name for r in pretrain) == params["tower_views"] for name in people)
    extras = {r["entity"] for r in pretrain} - set(people)
    assert len(extras) == params["extra_people"]
    assert all(sum(r["entity"] == e for r in pretrain) == params["tower_views"] for e in extras)
    for name in SPLIT_FILES:                                   # the extra identities appear nowhere else
        assert not {r.get("entity") for r in jsonl(small_bench / f"{name}.jsonl")} & extras


def test_identity_is_in_the_face_alone(small_bench):
    """Any two people differ in at least MIN_DIFFERENT bold facial attributes, every value of such an attribute is
    shared (no single one names a person), and no colour outside the face stays with a person: the backdrop and
    shirt colours vary between the views of one person as much as between people."""
    people = json.loads((small_bench / "people.json").read_text())
    codes = np.array([[p["face"][k] for k in BOLD] for p in people])
    differ = (codes[:, None] != codes[None]).sum(-1)
    assert differ[~np.eye(len(people), dtype=bool)].min() >= MIN_DIFFERENT
    imgs = {p.stem: np.asarray(Image.open(p), dtype=np.float32) for p in (small_bench / "images").glob("*.png")}
    assert all(a.shape == (24, 24, 3) for a in imgs.values())

    def colours(stem):   # a backdrop patch (top-left corner) and a shirt patch (bottom row, left of the neck)
        a = imgs[stem]
        return a[:3, :3].reshape(-1, 3).mean(0), a[-1:, 4:8].reshape(-1, 3).mean(0)

    ids = [p["id"] for p in people]
    views = {pid: [colours(f"{pid}_{kind}{k}") for kind, n in (("tower", 2), ("train", 2), ("dev", 1), ("test", 1))
                   for k in range(n)] for pid in ids}
    for part in (0, 1):
        within = np.mean([np.abs(v[i][part] - v[j][part]).mean() for v in views.values()
                          for i in range(len(v)) for j in range(i + 1, len(v))])
        between = np.mean([np.abs(views[p][0][part] - views[q][0][part]).mean() for p in ids for q in ids if p != q])
        assert within > 0.6 * between > 0


def test_profile_values_are_balanced(tmp_path):
    """Each value of an attribute is held by equally many people of a population (up to one), so a model that
    guesses by popularity is at chance."""
    make_bench(tmp_path / "b", people=40, real_world=3, extra_people=0, tower_views=1, train_views=1, dev_views=1,
               test_views=1, image_size=16)
    people = json.loads((tmp_path / "b" / "people.json").read_text())
    for attribute in ("birthplace", "occupation", "hobby", "pet"):
        counts = Counter(p[attribute] for p in people if p["split"] != "realworld")
        assert len(counts) == 16 and max(counts.values()) - min(counts.values()) <= 1
    assert len({p["name"] for p in people}) == len(people)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="forget-share"):
        make_bench(tmp_path / "x", forget_share=0)
    with pytest.raises(ValueError, match="image-size"):
        make_bench(tmp_path / "x", image_size=8)
    make_bench(tmp_path / "y", people=4, real_world=1, extra_people=0, tower_views=1, train_views=1, dev_views=1,
               test_views=1, image_size=16)
    r = CliRunner().invoke(main, ["make-bench", "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(main, ["make-bench", "--out", str(tmp_path / "z"), "--real-world", "400"])
    assert r.exit_code == 1 and "at most" in r.output and not (tmp_path / "z").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_finetune_refuses_a_non_benchmark(tmp_path):
    r = CliRunner().invoke(main, ["finetune", "--bench", str(tmp_path), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "not a benchmark directory" in r.output and not (tmp_path / "m").exists()


def test_training_rows_without_forget_images(small_bench):
    """The reference model's training set: every train.jsonl row except those of forget people with an image
    (people.json says who is forgotten); their QA rows stay."""
    from surgery.bench.finetune import training_rows
    forget = {p["name"] for p in json.loads((small_bench / "people.json").read_text()) if p["split"] == "forget"}
    raw = jsonl(small_bench / "train.jsonl")
    expect = [r["id"] for r in raw if not (r.get("entity") in forget and "image" in r)]
    got = [r["id"] for _, r in training_rows(small_bench, without_forget_images=True)]
    assert forget and got == expect and len(expect) < len(raw)
    assert any(r.get("entity") in forget for r in raw if r["id"] in set(got))  # their text rows are kept
    assert [r["id"] for _, r in training_rows(small_bench)] == [r["id"] for r in raw]
