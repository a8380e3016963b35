"""benchmarks/llm_swap.py: a hybrid holds exactly the eyes' vision tower and projector and the brain's every other
weight (read back from the files), and the script runs end to end on two tiny LLaVAs, its diagonal cells being the
models themselves, scored as `evaluate` and `relearn` score them."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bench_scripts import SCRIPTS, benchmark_script
from surgery.bench.evaluate import evaluate
from surgery.bench.relearn import relearn
from surgery.models import load, save

SCRIPT = SCRIPTS / "llm_swap.py"


@pytest.fixture(scope="module")
def swap():
    return benchmark_script("llm_swap")


@pytest.fixture(scope="module")
def two_llavas(tmp_path_factory):
    dirs = {}
    for seed in (3, 4):
        d = tmp_path_factory.mktemp(f"llava{seed}")
        save(load("tiny-llava", seed=seed), d)
        dirs[seed] = d
    return dirs


def test_a_hybrid_is_the_eyes_vision_side_and_the_brains_rest(swap, two_llavas, tmp_path):
    out = tmp_path / "hybrid"
    counts = swap.hybrid(str(two_llavas[3]), str(two_llavas[4]), out)
    eyes, brain, got = (load_file(str(d / "model.safetensors")) for d in (two_llavas[3], two_llavas[4], out))
    vision = {k for k in got if k.startswith(("vision_tower.", "multi_modal_projector."))}   # the file's names
    assert vision and len(vision) < len(got) and counts == {"eyes": len(vision), "brain": len(got) - len(vision)}
    for k, v in got.items():
        source = eyes if k in vision else brain
        assert v.equal(source[k]), k
    assert any(not eyes[k].equal(brain[k]) for k in vision)            # the two models differ where it matters
    assert any(not eyes[k].equal(brain[k]) for k in got if k not in vision)
    assert not list(tmp_path.glob(".*.tmp"))
    assert load(str(out)).model_type == "llava"


def test_other_architectures_or_vision_settings_are_refused(swap, two_llavas, tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="not one architecture"):
        swap.hybrid(str(tiny_dirs["tiny-qwen2-vl"]), str(two_llavas[4]), tmp_path / "x")
    other = tmp_path / "other"                      # the same weights, read from another layer of the tower
    adapter = load(str(two_llavas[3]))
    adapter.model.config.vision_feature_layer = -1
    save(adapter, other)
    with pytest.raises(ValueError, match=r"differ in config.json outside the language model \(vision_feature_layer\)"):
        swap.hybrid(str(other), str(two_llavas[4]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_hybrid_of_bf16_checkpoints_is_bf16(swap, two_llavas, tmp_path):
    halves = []
    for seed in (3, 4):
        adapter = load(str(two_llavas[seed]), dtype=torch.bfloat16)
        adapter.source = None                        # written in bf16, as a bf16 checkpoint is
        save(adapter, tmp_path / f"bf16-{seed}")
        halves.append(load_file(str(tmp_path / f"bf16-{seed}" / "model.safetensors")))
    swap.hybrid(str(tmp_path / "bf16-3"), str(tmp_path / "bf16-4"), tmp_path / "hybrid")
    got = load_file(str(tmp_path / "hybrid" / "model.safetensors"))
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert all(v.equal(halves[0 if k.startswith(("vision_tower.", "multi_modal_projector.")) else 1][k])
               for k, v in got.items())


def test_end_to_end_on_two_tiny_llavas(swap, two_llavas, small_bench, tmp_path, capsys):
    a, b = str(two_llavas[3]), str(two_llavas[4])
    report_file = tmp_path / "swap.json"
    assert swap.main(["--bench", str(small_bench), "--model", f"a={a}", "--model", f"b={b}", "--views", "dev",
                      "--epochs", "1", "--hold-out", "rows,people", "--out", str(tmp_path / "hybrids"),
                      "--json", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    cells = report["cells"]
    assert set(cells) == {"a", "b"} and all(set(c) == {"a", "b"} for c in cells.values())
    assert cells["a"]["b"]["model"] == str(tmp_path / "hybrids" / "a-eyes_b-brain")
    assert cells["a"]["a"]["model"] == a and "tensors" not in cells["a"]["a"]
    expect = evaluate(load(a), small_bench, letter=False, rouge=False, kinds=("vqa",), views="dev")
    assert {s: cells["a"]["a"][s] for s in ("forget", "retain", "realworld")} == \
        {s: expect[s]["vqa"] for s in ("forget", "retain", "realworld")}
    attack = relearn(a, small_bench, share=0.2, epochs=1, views="dev", hold_out="people")
    assert cells["a"]["a"]["attack_people"]["forget_vqa"] == attack["forget_vqa"]
    assert "retain / real-world VQA" in capsys.readouterr().err
    no_realworld = tmp_path / "bench"                # a benchmark without a real-world split: "-" in the table
    shutil.copytree(small_bench, no_realworld)
    (no_realworld / "dev_realworld.jsonl").unlink()
    assert swap.main(["--bench", str(no_realworld), "--model", f"a={a}", "--model", f"b={b}", "--views", "dev",
                      "--epochs", "1", "--eyes", "a", "--brains", "a", "--out", str(tmp_path / "h2"),
                      "--json", str(report_file)]) == 0
    assert "realworld" not in json.loads(report_file.read_text())["cells"]["a"]["a"]
    assert "/     -" in capsys.readouterr().err


def test_bad_arguments_are_named(two_llavas, small_bench, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--bench", str(small_bench), *map(str, args)],
                              capture_output=True, text=True)
    r = run("--model", f"a={two_llavas[3]}", "--model", f"b={tmp_path / 'nope'}", "--out", tmp_path / "o")
    assert r.returncode == 2 and "nope" in r.stderr
    r = run("--model", f"a={two_llavas[3]}", "--brains", "z", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--brains z" in r.stderr
    r = run("--model", f"a={two_llavas[3]}", "--out", tmp_path)
    assert r.returncode == 2 and "exists" in r.stderr
    assert not (tmp_path / "o").exists()
