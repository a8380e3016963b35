"""The shared loop: batch streams, steps from epochs, sharding, the non-finite guard."""
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import surgery.methods as methods
from surgery.cli import main
from surgery.config import Config
from surgery.data import DataError, Row, Splits, hold_back, load_splits
from surgery.distributed import World
from surgery.methods import Method, NonFiniteError, Term
from surgery.methods.loop import batches, check_stop, steps_of, stop_early
from surgery.models import Example, answer_loss, load
from surgery.pipeline import run
from rowdata import write_photo_split, write_split


@pytest.mark.parametrize("n,size", [(7, 3), (5, 4), (6, 6), (3, 8)])
def test_batches_cover_every_row_and_never_repeat_one(n, size):
    stream = batches(n, size, seed=1)
    drawn = [next(stream) for _ in range(12 * n)]
    assert all(len(b) == min(n, size) and len(set(b)) == len(b) for b in drawn)
    counts = Counter(i for b in drawn for i in b)
    assert set(counts) == set(range(n)) and max(counts.values()) - min(counts.values()) <= 1 + size // n
    again = batches(n, size, seed=1)
    assert [next(again) for _ in range(12 * n)] == drawn
    other = batches(n, size, seed=2)
    assert n <= 3 or [next(other) for _ in range(12 * n)] != drawn


def test_steps_from_epochs():
    splits = Splits(fvqa=[0] * 5, rvqa=[0] * 10)
    vkd = methods.get("vkd")
    assert steps_of(Config(batch_size=4), vkd, splits) == 3                 # default: one epoch of retain-VQA
    assert steps_of(Config(batch_size=4, epochs=2.5), vkd, splits) == 7
    assert steps_of(Config(batch_size=4, steps=11), vkd, splits) == 11
    forget_only = type("GA", (Method,), {"retain_splits": ()})()
    assert steps_of(Config(batch_size=2, epochs=1), forget_only, splits) == 3   # over forget-VQA
    with pytest.raises(ValueError, match="not both"):
        steps_of(Config(steps=1, epochs=1), vkd, splits)


def test_shard_splits_a_batch_into_contiguous_parts():
    rows = list(range(10))
    parts = [World(r, 3).shard(rows) for r in range(3)]
    assert sum(parts, []) == rows and [len(p) for p in parts] == [3, 3, 4]


class Exploding(Method):
    """Gradient descent on retain rows whose loss turns to NaN at step 2."""
    name = "exploding"
    calls = 0

    def terms(self, ctx, split, batch, rows):
        Exploding.calls += 1
        ce = answer_loss(ctx.forward(batch), batch.labels)
        return {split: Term(ce * (math.nan if Exploding.calls > 2 else 1.0))}


def test_non_finite_loss_stops_the_run_and_writes_nothing(tiny_dirs, data, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "get", lambda name: Exploding())
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="exploding: .* not finite at step 2"):
        run(Config(method="exploding", model=str(tiny_dirs["tiny-llava"]), forget=str(data[0]), retain=str(data[1]),
                   out=str(out), steps=4), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_epochs_option_sets_the_step_count(tiny_dirs, data, tmp_path):
    res = CliRunner().invoke(main, ["prune-and-mask", "--model", str(tiny_dirs["tiny-llava"]), "--forget", str(data[0]),
                                    "--retain", str(data[1]), "--out", str(tmp_path / "o"), "--epochs", "2",
                                    "--batch-size", "3", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["losses"]) == math.ceil(2 * 7 / 3) and report["method"] == "vkd"
    assert report["config"]["alpha"] == 1.25 and report["config"]["scope"] == "mlp"
    # the Fisher union of the vision weights averages retain-VQA only: the text splits never reach them
    assert set(map(tuple, report["fisher_union_splits"].values())) == {("rvqa",)}
    res = CliRunner().invoke(main, ["prune-and-mask", "--forget", str(data[0]), "--retain", str(data[1]),
                                    "--out", str(tmp_path / "p"), "--epochs", "2", "--steps", "3"])
    assert res.exit_code == 2 and "not both" in res.output


def test_stop_early_averages_the_last_window_of_forget_losses():
    history = [{"step": i + 1, "loss_fvqa": v} for i, v in enumerate([0.1, 0.2, 0.9, 1.3, 0.4])]
    assert not stop_early(Config(), history)                                   # no threshold: never
    assert not stop_early(Config(stop_forget_loss=0.1, stop_window=6), history)  # fewer steps than the window
    assert stop_early(Config(stop_forget_loss=0.8, stop_window=3), history)    # (0.9 + 1.3 + 0.4) / 3 = 0.867
    assert not stop_early(Config(stop_forget_loss=0.9, stop_window=3), history)
    assert stop_early(Config(stop_forget_loss=1.3, stop_window=1), history[:4])
    with pytest.raises(ValueError, match="does not log.*loss_npo_fvqa"):   # at the first step, not after a window
        stop_early(Config(stop_forget_loss=1.0, stop_window=10), [{"step": 1, "loss_npo_fvqa": 2.0}])


@pytest.mark.parametrize("settings,match", [
    ({"stop_forget_loss": 0}, "stop_forget_loss=0"), ({"stop_forget_loss": -1.0}, "stop_forget_loss=-1.0"),
    ({"stop_forget_loss": float("nan")}, "stop_forget_loss=nan"), ({"stop_forget_loss": "x"}, "number > 0"),
    ({"stop_forget_loss": True}, "stop_forget_loss=True"), ({"stop_window": 0}, "stop_window=0"),
    ({"stop_window": 2.5}, "stop_window=2.5"), ({"stop_window": True}, "stop_window=True"),
    ({"stop_forget_accuracy": -1}, "stop_forget_accuracy=-1"), ({"stop_forget_accuracy": 100.5}, "in \\[0, 100\\]"),
    ({"stop_forget_accuracy": 30, "stop_forget_loss": 1.0}, "not both"), ({"stop_holdout": 0}, "stop_holdout=0"),
    ({"stop_holdout": 1}, "stop_holdout=1"), ({"stop_every": 0}, "stop_every=0")])
def test_check_stop_refuses_what_the_loop_cannot_use(settings, match):
    with pytest.raises(ValueError, match=match):
        check_stop(settings)
    with pytest.raises(ValueError, match=match):
        check_stop(Config(**settings))                               # a Config is read the same way
    for fine in ({}, {"stop_forget_loss": 1, "stop_window": 1}, {"stop_forget_loss": 1.25},
                 {"stop_forget_accuracy": 0}, {"stop_forget_accuracy": 35.0, "stop_holdout": 0.5, "stop_every": 1}):
        check_stop(fine), check_stop(Config(**fine))                # these pass


def _prune_and_mask(tiny_dirs, data, out, *args):
    res = CliRunner().invoke(main, ["prune-and-mask", "--model", str(tiny_dirs["tiny-llava"]), "--forget", str(data[0]),
                                    "--retain", str(data[1]), "--out", str(out), "--lr", "3e-3", "--alpha", "3",
                                    "--json", *args])
    return res


@pytest.mark.parametrize("schedule", ["combined", "alternating"])
def test_stop_forget_loss_ends_the_run_at_the_first_window_that_reaches_it(tiny_dirs, data, tmp_path, schedule):
    full = _prune_and_mask(tiny_dirs, data, tmp_path / "full", "--steps", "24", "--schedule", schedule)
    assert full.exit_code == 0, full.output
    losses = [r["loss_fvqa"] for r in json.loads(full.stdout)["losses"]]
    means = [sum(losses[k - 4:k]) / 4 for k in range(4, len(losses) + 1)]    # window 4, ending at step k
    threshold = sorted(means)[len(means) // 2]                                 # reached somewhere in the run
    expected = 4 + next(i for i, m in enumerate(means) if m >= threshold)
    stopped = _prune_and_mask(tiny_dirs, data, tmp_path / "stop", "--steps", "24", "--schedule", schedule,
                              "--stop-forget-loss", str(threshold), "--stop-window", "4")
    assert stopped.exit_code == 0, stopped.output
    report = json.loads(stopped.stdout)
    assert report["steps_run"] == len(report["losses"]) == expected < 24
    assert [r["loss_fvqa"] for r in report["losses"]] == losses[:expected]   # the same steps, cut short
    assert report["config"]["stop_forget_loss"] == threshold and report["config"]["stop_window"] == 4
    assert json.loads(full.stdout)["steps_run"] == 24


def test_stop_options_refuse_bad_values(tiny_dirs, data, tmp_path):
    for args, hint in ((["--stop-forget-loss", "0"], "--stop-forget-loss"),
                       (["--stop-forget-loss", "1", "--stop-window", "0"], "--stop-window"),
                       (["--stop-window", "5"], "--stop-window"),           # a window without a threshold
                       (["--stop-forget-accuracy", "101"], "--stop-forget-accuracy"),
                       (["--stop-forget-accuracy", "30", "--stop-holdout", "1"], "--stop-holdout"),
                       (["--stop-forget-accuracy", "30", "--stop-every", "0"], "--stop-every"),
                       (["--stop-every", "5"], "--stop-every"),              # a setting of the accuracy stop alone
                       (["--stop-forget-accuracy", "30", "--stop-forget-loss", "1"], "not both")):
        res = _prune_and_mask(tiny_dirs, data, tmp_path / "o", "--steps", "3", *args)
        assert res.exit_code == 2 and hint in res.output and not (tmp_path / "o").exists()


def test_stop_forget_loss_needs_a_method_that_logs_the_forget_answer_loss(tiny_dirs, data, tmp_path):
    out = tmp_path / "npo"
    for method in ("npo", "vgid"):                            # refused before the model is loaded (it was at step 1)
        with pytest.raises(ValueError, match=f"--stop-forget-loss: {method} does not log the forget-VQA answer loss"):
            run(Config(method=method, model=str(tmp_path / "no-such-model"), forget=str(data[0]),
                       retain=str(data[1]), out=str(out), steps=3, stop_forget_loss=1.0, stop_window=10),
                progress=False)
    assert not out.exists() and not list(tmp_path.glob(".npo*"))
    with pytest.raises(ValueError, match="manu does not train"):   # a training-free method: refused, nothing written
        run(Config(method="manu", model=str(tiny_dirs["tiny-llava"]), forget=str(data[0]), retain=str(data[1]),
                   out=str(out), stop_forget_accuracy=30), progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="stop_window=0"):   # refused before the model is loaded
        run(Config(method="vkd", model=str(tmp_path / "no-such-model"), out=str(out), stop_forget_loss=1.0,
                   stop_window=0), progress=False)


def test_hold_back_moves_a_share_of_each_persons_photos():
    def row(entity, photo, options=True):
        return Row("Q?", "a (A)", Path(f"/x/{entity}-{photo}.png"), {"A": "a", "B": "b"} if options else None,
                   "A" if options else None, entity)
    fvqa = [row(e, k, options=q == 0) for e, n in (("one", 1), ("two", 2), ("five", 5), ("ten", 10))
            for k in range(n) for q in range(2)]
    splits = Splits(fvqa, [], [row("r", 0)], [])
    out = hold_back(splits, 0.2, seed=3)
    photos = lambda rows, e: {r.image for r in rows if r.entity == e}
    assert [len(photos(out.held_back, e)) for e in ("one", "two", "five", "ten")] == [0, 1, 1, 2]
    for e in ("one", "two", "five", "ten"):                        # every photo on exactly one side, rows whole
        assert photos(out.held_back, e) | photos(out.fvqa, e) == photos(fvqa, e)
        assert not photos(out.held_back, e) & photos(out.fvqa, e)
    assert len(out.fvqa) + len(out.held_back) == len(fvqa) and out.rvqa == splits.rvqa and not splits.held_back
    assert hold_back(splits, 0.2, seed=3) == out and hold_back(splits, 0.5, seed=3) != out
    assert len(photos(hold_back(splits, 0.99, seed=3).held_back, "ten")) == 9     # one photo always trains
    # a photo of two people: held back only if each keeps another (p = {a, b}, q = {b, c}: never both of p's)
    group = [row(e, 0) for e in "pq"]
    for entity, photo in (("p", "a"), ("p", "b"), ("q", "b"), ("q", "c")):
        group.append(Row("Q?", "a (A)", Path(f"/x/{photo}.png"), {"A": "a", "B": "b"}, "A", entity))
    for seed in range(12):
        out = hold_back(Splits(group[2:]), 0.5, seed=seed)
        assert all(photos(out.fvqa, e) for e in "pq"), seed
    with pytest.raises(DataError, match="no multiple-choice forget-VQA row to hold back"):
        hold_back(Splits([row("one", 0), row("two", 0, options=False), row("two", 1, options=False)]), 0.5, 0)


def _accuracy_by_hand(model_dir, rows) -> float:
    """Each option's answer "<option> (<letter>)" scored by its summed token log-probability (the answer tokens as
    `Adapter.encode` labels them), one sequence at a time; the share of rows whose best option is the correct one."""
    adapter = load(str(model_dir), seed=0)
    adapter.model.eval()
    hits = 0
    with torch.no_grad():
        for r in rows:
            scores = {}
            for letter, text in r.options.items():
                batch = adapter.encode([Example(r.prompt(), f"{text} ({letter})", r.load_image())])
                logp = torch.log_softmax(adapter.model(**batch.inputs).logits[0, :-1].float(), -1)
                labels = batch.labels[0, 1:]
                keep = labels != -100
                scores[letter] = logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum().item()
            hits += max(scores, key=scores.get) == r.correct
    return 100.0 * hits / len(rows)


def test_stop_forget_accuracy_measures_held_back_photos_and_stops_at_the_first_check_that_reaches_it(tiny_dirs,
                                                                                                      tmp_path):
    forget = write_photo_split(tmp_path / "forget.jsonl")
    retain = write_split(tmp_path / "retain.jsonl", 7, 4, seed=2, prefix="r")
    data = (forget, retain)
    every = ["--steps", "6", "--stop-every", "3", "--stop-holdout", "0.3"]
    first = _prune_and_mask(tiny_dirs, data, tmp_path / "a", *every, "--stop-forget-accuracy", "100")
    assert first.exit_code == 0, first.output
    a = json.loads(first.stdout)
    # 0.3 of 3 photos: one photo of each person, its two rows, out of training
    assert a["splits"]["held_back"] == 6 and a["splits"]["fvqa"] == 12
    assert a["steps_run"] == 3 and [("held_back_accuracy" in r) for r in a["losses"]] == [False, False, True]
    held = hold_back(load_splits(forget, retain), 0.3, seed=0).held_back
    assert a["losses"][2]["held_back_accuracy"] == pytest.approx(_accuracy_by_hand(tmp_path / "a", held))
    # at 0 it stops at step 3 only if nothing held back was right there; else it checks again at 6 and ends there
    second = _prune_and_mask(tiny_dirs, data, tmp_path / "b", *every, "--stop-forget-accuracy", "0")
    b = json.loads(second.stdout)
    assert b["steps_run"] == (3 if a["losses"][2]["held_back_accuracy"] == 0 else 6)
    assert b["losses"][:3] == a["losses"]                       # the same held-back rows, the same first steps
    # the cap changes nothing in a run that stops before it (the demo's cap was raised so): same steps, same weights
    capped = json.loads(_prune_and_mask(tiny_dirs, data, tmp_path / "d", "--steps", "60", *every[2:],
                                        "--stop-forget-accuracy", "100").stdout)
    assert capped["steps_run"] == 3 and capped["losses"] == a["losses"]
    w, w_capped = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "d"))
    assert w.keys() == w_capped.keys() and all(torch.equal(w[k], w_capped[k]) for k in w)
    # a saliency file collected with photos held back is refused for a run that holds back none
    res = _prune_and_mask(tiny_dirs, data, tmp_path / "c", "--steps", "2", "--saliency",
                          str(tmp_path / "a" / "saliency.safetensors"))
    assert res.exit_code != 0 and "held-back forget photos" in res.output and not (tmp_path / "c").exists()


def test_weights_no_gradient_reaches_take_no_step(tiny_dirs, data, tmp_path):
    """At --scope full with weight decay, the tower's dead last layer and post-layernorm (LLaVA reads the layer
    before) got a zero gradient filled in, and AdamW's decay moved them; as torch's AdamW skips a param without a
    gradient, they must stay the input's, bit for bit, while the weights the loss reaches move."""
    from safetensors.torch import load_file
    model = tiny_dirs["tiny-llava"]
    out = tmp_path / "full"
    report = run(Config(method="ga", model=str(model), forget=str(data[0]), retain=str(data[1]), out=str(out),
                        steps=3, scope="full", weight_decay=0.1), progress=False)
    last = report["scope"]["live_layers"][1]
    before, after = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    dead = [k for k in before if "post_layernorm" in k or any(f"encoder.layers.{j}." in k for j in range(last + 1, 64))]
    assert dead and all(torch.equal(before[k], after[k]) for k in dead), [k for k in dead if not torch.equal(before[k], after[k])]
    assert not torch.equal(before[next(k for k in before if f"encoder.layers.{last}.mlp.fc2.weight" in k)],
                           after[next(k for k in after if f"encoder.layers.{last}.mlp.fc2.weight" in k)])
