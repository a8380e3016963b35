"""The shared loop: batch streams, steps from epochs, sharding, the non-finite guard."""
import json
import math
from collections import Counter

import pytest
from click.testing import CliRunner

import surgery.methods as methods
from surgery.cli import main
from surgery.config import Config
from surgery.data import Splits
from surgery.distributed import World
from surgery.methods import Method, NonFiniteError, Term
from surgery.methods.loop import batches, check_stop, steps_of, stop_early
from surgery.models import answer_loss
from surgery.pipeline import run


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


@pytest.mark.parametrize("stop,window,match", [(0, 10, "stop_forget_loss=0"), (-1.0, 10, "stop_forget_loss=-1.0"),
                                               (float("nan"), 10, "stop_forget_loss=nan"), ("x", 10, "number > 0"),
                                               (True, 10, "stop_forget_loss=True"), (1.0, 0, "stop_window=0"),
                                               (1.0, 2.5, "stop_window=2.5"), (None, True, "stop_window=True")])
def test_check_stop_refuses_what_the_loop_cannot_use(stop, window, match):
    with pytest.raises(ValueError, match=match):
        check_stop(stop, window)
    check_stop(None, 10), check_stop(1, 1), check_stop(1.25, 10)     # these pass


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
                       (["--stop-window", "5"], "--stop-window")):          # a window without a threshold
        res = _prune_and_mask(tiny_dirs, data, tmp_path / "o", "--steps", "3", *args)
        assert res.exit_code == 2 and hint in res.output and not (tmp_path / "o").exists()


def test_stop_forget_loss_needs_a_method_that_logs_the_forget_answer_loss(tiny_dirs, data, tmp_path):
    out = tmp_path / "npo"
    with pytest.raises(ValueError, match="loss_fvqa"):       # refused at step 1 although 3 steps < the window
        run(Config(method="npo", model=str(tiny_dirs["tiny-llava"]), forget=str(data[0]), retain=str(data[1]),
                   out=str(out), steps=3, stop_forget_loss=1.0, stop_window=10), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".npo*"))
    with pytest.raises(ValueError, match="stop_window=0"):   # refused before the model is loaded
        run(Config(method="vkd", model=str(tmp_path / "no-such-model"), out=str(out), stop_forget_loss=1.0,
                   stop_window=0), progress=False)
