import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from surgery.bench.make_bench import LETTERS, make_bench
from surgery.cli import main
from surgery.data import load_jsonl


def files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(people=6, real_world=4, train_views=2, test_views=1)
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
    for name in ("train", "forget", "retain", "eval_forget", "eval_retain", "eval_realworld"):
        raw = [json.loads(line) for line in (small_bench / f"{name}.jsonl").read_text().splitlines()]
        rows = load_jsonl(small_bench / f"{name}.jsonl")                       # valid for the pipeline
        assert len(rows) == len(raw) > 0
        for r in raw:
            person = people[r["entity"]]
            if name.startswith("eval_"):
                assert person["split"] == name[5:]
                assert "image" not in r or "_test" in r["image"]                 # held-out views only
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


def test_identities_are_distinct_and_views_vary(small_bench):
    imgs = {p.stem: np.asarray(Image.open(p), dtype=np.float32) for p in (small_bench / "images").glob("*.png")}
    assert all(a.shape == (32, 32, 3) for a in imgs.values())
    people = sorted({k.split("_")[0] for k in imgs})
    # two views of one person are closer than views of different people, on average
    same = np.mean([np.abs(imgs[f"{p}_train0"] - imgs[f"{p}_train1"]).mean() for p in people])
    other = np.mean([np.abs(imgs[f"{p}_train0"] - imgs[f"{q}_train0"]).mean() for p in people for q in people if p != q])
    assert same < other
    assert all(not np.array_equal(imgs[f"{p}_train0"], imgs[f"{p}_test0"]) for p in people)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="forget-share"):
        make_bench(tmp_path / "x", forget_share=0)
    make_bench(tmp_path / "y", people=4, real_world=1, train_views=1, test_views=1)
    r = CliRunner().invoke(main, ["make-bench", "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(main, ["make-bench", "--out", str(tmp_path / "z"), "--people", "200"])
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
    raw = [json.loads(line) for line in (small_bench / "train.jsonl").read_text().splitlines()]
    expect = [r["id"] for r in raw if not (r["entity"] in forget and "image" in r)]
    got = [r["id"] for _, r in training_rows(small_bench, without_forget_images=True)]
    assert forget and got == expect and len(expect) < len(raw)
    assert any(r["entity"] in forget for r in raw if r["id"] in set(got))  # their text rows are kept
    assert [r["id"] for _, r in training_rows(small_bench)] == [r["id"] for r in raw]
