"""benchmarks/identity_probe.py: its linear probe finds identity where it is (separable clusters: 100 %) and not
where it is not (labels independent of the features: chance), and the script runs end to end on the tiny LLaVA."""
import json
import subprocess
import sys

import pytest
import torch

from bench_scripts import SCRIPTS, benchmark_script

SCRIPT = SCRIPTS / "identity_probe.py"


@pytest.fixture(scope="module")
def probe():
    return benchmark_script("identity_probe")


def photos_of(centres: torch.Tensor, per_person: int, spread: float, gen: torch.Generator):
    """Photos of each person scattered around that person's own point: ([N, dim] features, N labels)."""
    labels = [f"p{i}" for i in range(len(centres)) for _ in range(per_person)]
    noise = torch.randn(len(labels), centres.shape[1], generator=gen, dtype=torch.float64)
    return centres.repeat_interleave(per_person, 0) + spread * noise, labels


def test_separable_clusters_are_probed_perfectly(probe):
    gen = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(6, 16, generator=gen, dtype=torch.float64)
    x_train, y_train = photos_of(centres, 12, 0.5, gen)
    x_test, y_test = photos_of(centres, 4, 0.5, gen)
    # the nearest training centroid, an independent classifier, gets them all too: they are separable
    means = torch.stack([x_train[i * 12:(i + 1) * 12].mean(0) for i in range(6)])
    assert (torch.cdist(x_test, means).argmin(1) == torch.arange(6).repeat_interleave(4)).all()
    assert probe.fit_probe(x_train, y_train, x_test, y_test) == 100.0
    assert probe.fit_probe(x_train.float(), y_train, x_test.float(), y_test, seed=3) == 100.0


def test_labels_independent_of_features_give_chance(probe):
    gen = torch.Generator().manual_seed(2)
    people = 4
    x_train, x_test = torch.randn(200, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    y_train = [f"p{int(i)}" for i in torch.randint(people, (200,), generator=gen)]
    y_test = [f"p{int(i)}" for i in torch.randint(people, (2000,), generator=gen)]
    accuracy = probe.fit_probe(x_train, y_train, x_test, y_test)
    assert abs(accuracy - 100 / people) < 5, accuracy      # 2000 test photos: one standard error is ~1 point
    assert probe.fit_probe(x_train, y_train, x_test, y_test) == accuracy    # deterministic


def test_a_person_never_trained_on_counts_as_a_miss(probe):
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    assert probe.fit_probe(x, ["a", "a", "b", "b"], torch.tensor([[0.05], [5.05]]), ["a", "c"]) == 50.0


def test_end_to_end_on_the_tiny_llava(probe, tiny_dirs, small_bench, tmp_path, capsys):
    out = tmp_path / "probe.json"
    model = str(tiny_dirs["tiny-llava"])
    assert probe.main(["--bench", str(small_bench), "--model", f"a={model}", "--model", f"b={model}",
                       "--views", "dev", "--json", str(out), "--shift-from", "a"]) == 0
    report = json.loads(out.read_text())
    assert not list(tmp_path.glob(".*.tmp"))                # written through a temporary file, renamed
    assert report["views"] == "dev" and report["models"] == {"a": model, "b": model}
    assert set(report["results"]) == {"a", "b"}
    live = probe.load(model).live_layers
    columns = [f"layer {i}" for i in live] + ["projector"]
    for groups in report["results"].values():
        assert set(groups) == {"forget", "retain"}
        for r in groups.values():
            assert list(r["accuracy"]) == columns
            assert all(0 <= a <= 100 for a in r["accuracy"].values())
            assert r["chance"] == pytest.approx(100 / r["people"]) and r["test_photos"] > 0
    assert report["results"]["a"] == report["results"]["b"]    # the same model, probed the same: deterministic
    assert all(v == 0 for g in report["results"]["b"].values() for v in g["shift"].values())   # no shift from itself
    with pytest.raises(SystemExit) as refused:                 # a --shift-from that names no model
        probe.main(["--bench", str(small_bench), "--model", f"a={model}", "--shift-from", "z"])
    assert refused.value.code == 2
    table = capsys.readouterr().err
    assert "projector" in table and "forget" in table and "retain" in table


def test_a_bad_model_or_bench_is_named(small_bench, tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, str(SCRIPT), "--bench", str(small_bench), "--model", f"x={missing}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and str(missing) in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--bench", str(tmp_path / "nobench"), "--model", f"x={missing}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "nobench" in r.stderr, r.stderr
