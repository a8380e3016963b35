"""End to end: `surgery prune-and-mask` on tiny models saved to local directories."""
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from surgery.cli import main
from surgery.models import load

from rowdata import write_split


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_prune_and_mask_end_to_end(name, tiny_dirs, data, tmp_path):
    model_dir = tiny_dirs[name]
    before = {k: v.clone() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    out = tmp_path / "out"
    res = run_cli("prune-and-mask", "--model", model_dir, "--forget", data[0], "--retain", data[1], "--out", out,
                  "--steps", 4, "--lr", 1e-2, "--prune-frac", 0.05, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["seed"] == 0 and report["dtype"] == "float32" and report["timings"]["total_s"] > 0
    assert len(report["losses"]) == 4

    # the input checkpoint is untouched
    assert all(torch.equal(v, load_file(str(model_dir / "model.safetensors"))[k]) for k, v in before.items())

    # the saved model loads with plain transformers, and through our adapter
    unlearned = AutoModelForImageTextToText.from_pretrained(out, use_safetensors=True)
    after = unlearned.state_dict()
    adapter = load(str(model_dir))
    keys = dict(adapter.model.state_dict())
    assert set(after) == set(keys)

    scope = set(adapter.scope_params("mlp"))
    masks = load_file(str(out / "masks.safetensors"))
    n_pruned = 0
    for mlp in adapter.mlps:
        neurons = masks.get(f"neurons.{mlp.layer}")
        if neurons is None or neurons.numel() == 0:
            continue
        n_pruned += neurons.numel()
        for name_in in adapter.family.mlp_in:
            assert (after[f"{mlp.path}.{name_in}.weight"][neurons] == 0).all()
            assert (after[f"{mlp.path}.{name_in}.bias"][neurons] == 0).all()
        assert (after[f"{mlp.path}.{adapter.family.mlp_out}.weight"][:, neurons] == 0).all()
    assert n_pruned == sum(report["pruned_neurons"].values()) > 0

    changed = [k for k in scope if not torch.equal(after[k], keys[k])]
    assert changed, "some in-scope weight must change"
    outside = [k for k in keys if k not in scope]
    assert outside and all(torch.equal(after[k], keys[k]) for k in outside), "weights outside the scope changed"
    for dead in set(range(len(adapter.mlps))) - set(adapter.live_layers):
        assert not any(k.startswith(f"{adapter.family.layers}.{dead}.") for k in scope)


def test_llava_last_layer_is_dead(tiny_dirs):
    adapter = load(str(tiny_dirs["tiny-llava"]))
    assert adapter.model.config.vision_feature_layer == -2
    assert list(adapter.live_layers) == list(range(len(adapter.mlps) - 1))


def test_layers_option_narrows_scope(tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    res = run_cli("prune-and-mask", "--model", tiny_dirs["tiny-qwen2-vl"], "--forget", data[0], "--retain", data[1],
                  "--out", out, "--steps", 2, "--layers", "2-3", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["scope"]["layers"] == [2, 3]
    assert set(report["pruned_neurons"]) <= {"2", "3"}


def test_dry_run_writes_nothing(tiny_dirs, data, tmp_path):
    out = tmp_path / "out"
    res = run_cli("prune-and-mask", "--model", tiny_dirs["tiny-llava"], "--forget", data[0], "--retain", data[1],
                  "--out", out, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["splits"] == {"fvqa": 5, "fqa": 3, "rvqa": 7, "rqa": 4}
    assert not out.exists()


def bad_run(tmp_path, model, forget, retain, *extra):
    out = tmp_path / "out_bad"
    proc = subprocess.run([sys.executable, "-m", "surgery", "prune-and-mask", "--model", str(model),
                           "--forget", str(forget), "--retain", str(retain), "--out", str(out), "--steps", "1", *extra],
                          capture_output=True, text=True)
    return proc, out


def test_malformed_line_fails_cleanly(tiny_dirs, data, tmp_path):
    forget = data[0]
    lines = forget.read_text().splitlines()
    lines[2] = '{"question": "who?", "answer": '
    forget.write_text("\n".join(lines) + "\n")
    proc, out = bad_run(tmp_path, tiny_dirs["tiny-llava"], forget, data[1])
    assert proc.returncode != 0 and f"{forget}:3: malformed JSON" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out_bad*"))


def test_missing_image_fails_cleanly(tiny_dirs, data, tmp_path):
    (data[0].parent / "forget_img" / "2.png").unlink()
    proc, out = bad_run(tmp_path, tiny_dirs["tiny-llava"], data[0], data[1])
    assert proc.returncode != 0 and "forget.jsonl:3: 'image' file not found: forget_img/2.png" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("name,mark", [("tiny-llava", "<image>"), ("tiny-qwen2-vl", "<|image_pad|>")])
def test_the_image_token_in_a_rows_text_is_refused_naming_the_line(name, mark, tiny_dirs, data, tmp_path):
    """A question, answer or option holding the model's image token would be read as a photo's slot (the features
    and the slots would not match, or text would take a photo's place)."""
    for line, edit in ((4, lambda r: r.update(question=f"{mark} {r['question']}")),
                       (2, lambda r: r.update(answer=f"{r['answer']}{mark}"))):
        rows = [json.loads(x) for x in data[1].read_text().splitlines()]
        original = data[1].read_text()
        edit(rows[line - 1])
        data[1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc, out = bad_run(tmp_path, tiny_dirs[name], data[0], data[1])
        field = "question" if line == 4 else "answer"
        assert proc.returncode != 0 and f"retain.jsonl:{line}: its {field} holds the model's image token {mark!r}" \
            in proc.stderr, proc.stderr
        assert not out.exists()
        data[1].write_text(original)


def test_empty_forget_set_fails_cleanly(tiny_dirs, data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc, out = bad_run(tmp_path, tiny_dirs["tiny-llava"], empty, data[1])
    assert proc.returncode != 0 and "empty.jsonl: no rows" in proc.stderr
    assert not out.exists()


def test_unknown_model_type_fails_cleanly(tiny_dirs, data, tmp_path):
    import shutil
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_dirs["tiny-llava"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(cfg))
    proc, out = bad_run(tmp_path, bad, data[0], data[1])
    assert proc.returncode != 0 and "unsupported model type 'bert'" in proc.stderr and "qwen2_vl" in proc.stderr
    assert not out.exists()


def test_existing_out_is_refused(tiny_dirs, data, tmp_path):
    (tmp_path / "out_bad").mkdir()
    (tmp_path / "out_bad" / "keep.txt").write_text("mine")
    proc, out = bad_run(tmp_path, tiny_dirs["tiny-llava"], data[0], data[1])
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_midway_leaves_no_output(tiny_dirs, data, tmp_path, monkeypatch):
    import surgery.pipeline as pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated failure during unlearning")
    monkeypatch.setattr(pipeline.methods, "train", boom)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune-and-mask", "--model", str(tiny_dirs["tiny-llava"]), "--forget",
                                    str(data[0]), "--retain", str(data[1]), "--out", str(out)])
    assert res.exit_code != 0 and "simulated failure" in res.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_inspect_json(tiny_dirs):
    res = run_cli("inspect", "--model", tiny_dirs["tiny-qwen2.5-vl"], "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["model_type"] == "qwen2_5_vl" and info["mlp"]["inputs"] == ["gate_proj", "up_proj"]
    assert info["live_layers"] == [0, 3] and info["scope_weights"] > 0
    assert (info["checkpoint_dtypes"], info["dtype"]) == (["F32"], "float32")
    res = run_cli("inspect", "--model", tiny_dirs["tiny-qwen2.5-vl"], "--dtype", "bf16", "--json")
    assert json.loads(res.stdout)["dtype"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_device_is_a_clear_error(data, tmp_path):
    res = CliRunner().invoke(main, ["prune-and-mask", "--forget", str(data[0]), "--retain", str(data[1]),
                                    "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert res.exit_code == 1 and "--device cuda: no such CUDA device" in res.output
    res = CliRunner().invoke(main, ["prune-and-mask", "--forget", str(data[0]), "--retain", str(data[1]),
                                    "--out", str(tmp_path / "o"), "--device", "meta"])
    assert res.exit_code == 1 and "--device meta: surgery runs on cpu or cuda" in res.output



def assert_same_outputs(a_dir, b_dir):
    """The two runs wrote the same model, masks and saliency, bit for bit."""
    for f in ("model.safetensors", "masks.safetensors", "saliency.safetensors"):
        a, b = load_file(str(a_dir / f)), load_file(str(b_dir / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_saliency_reuse(tiny_dirs, data, tmp_path):
    """--saliency from an earlier run gives the same unlearned model as collecting again."""
    common = ["prune-and-mask", "--model", tiny_dirs["tiny-llava"], "--forget", data[0], "--retain", data[1],
              "--steps", 3, "--lr", 1e-2, "--prune-frac", 0.05]
    assert run_cli(*common, "--out", tmp_path / "a").exit_code == 0
    saliency = tmp_path / "a" / "saliency.safetensors"
    res = run_cli(*common, "--out", tmp_path / "b", "--saliency", saliency, "--json")
    assert res.exit_code == 0, res.output
    assert "saliency_load_s" in json.loads(res.stdout)["timings"]
    assert_same_outputs(tmp_path / "a", tmp_path / "b")


def test_checkpointing_on_the_cli_changes_nothing_but_memory(tiny_dirs, data, tmp_path):
    """--checkpoint-llm --checkpoint-vision --offload-optimizer: the same saliency, masks and unlearned model as
    without, bit for bit."""
    common = ["prune-and-mask", "--model", tiny_dirs["tiny-llava"], "--forget", data[0], "--retain", data[1],
              "--steps", 3, "--lr", 1e-2, "--prune-frac", 0.05]
    assert run_cli(*common, "--out", tmp_path / "a").exit_code == 0
    res = run_cli(*common, "--out", tmp_path / "b", "--checkpoint-llm", "--checkpoint-vision", "--offload-optimizer",
                  "--json")
    assert res.exit_code == 0, res.output
    config = json.loads(res.stdout)["config"]
    assert config["checkpoint_vision"] is True and config["offload_optimizer"] is True
    assert_same_outputs(tmp_path / "a", tmp_path / "b")


def test_saliency_reuse_refuses_another_source(tiny_dirs, data, tmp_path):
    """...and is refused, with nothing written, when the weights, the data, the batch size or the scope differ."""
    from surgery.models import save
    model_dir = tiny_dirs["tiny-llava"]
    assert run_cli("prune-and-mask", "--model", model_dir, "--forget", data[0], "--retain", data[1], "--steps", 2,
                   "--out", tmp_path / "a").exit_code == 0
    saliency = tmp_path / "a" / "saliency.safetensors"
    other_model = tmp_path / "m"
    save(load("tiny-llava", seed=11), other_model)           # the same architecture, other weights
    edited = data[0].parent / "forget2.jsonl"
    edited.write_text(data[0].read_text().replace("Who is", "Who's"))
    cases = [(["--model", other_model, "--forget", data[0]], "other weights"),
             (["--model", model_dir, "--forget", edited], "another forget"),
             (["--model", model_dir, "--forget", data[0], "--collect-batch-size", 4], "another collect batch size (8, now 4)"),
             (["--model", model_dir, "--forget", data[0], "--layers", "0-0"], "other parameters")]
    # a photo changed in place (the JSONL files untouched), and a manu run's statistics without Fisher diagonals
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(data[0].parent, copy)
    photo = next(copy.glob("retain_img/*.png"))
    with Image.open(photo) as im:
        pixels = im.convert("RGB")
    pixels.putpixel((0, 0), tuple(255 - v for v in pixels.getpixel((0, 0))))
    pixels.save(photo)
    assert run_cli("unlearn", "--method", "manu", "--model", model_dir, "--forget", data[0], "--retain", data[1],
                   "--out", tmp_path / "manu").exit_code == 0
    cases += [(["--model", model_dir, "--forget", copy / data[0].name, "--retain", copy / data[1].name],
               "another set of photos"),
              (["--model", model_dir, "--forget", data[0], "--saliency", tmp_path / "manu" / "saliency.safetensors"],
               "no Fisher diagonals (a manu run's)")]
    for args, message in cases:
        given = [str(a) for a in args]
        res = CliRunner().invoke(main, ["prune-and-mask", *given, *(["--retain", str(data[1])] * ("--retain" not in given)),
                                        "--steps", "2", "--out", str(tmp_path / "c"),
                                        *(["--saliency", str(saliency)] * ("--saliency" not in given))])
        assert res.exit_code == 1 and message in res.output and not (tmp_path / "c").exists(), (args, res.output)


def test_the_cli_computes_with_portable_cpu_numerics():
    """`surgery` pins torch's CPU kernels to their AVX2 level and MKL and oneDNN to their AVX2 paths before torch
    computes anything (the benchmark's models differ between AVX2 and AVX-512 kernels); a level the user set is kept."""
    from surgery.numerics import CPU_NUMERICS
    code = ("import os, sys, torch; import surgery.cli; "
            "print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'], os.environ['ONEDNN_MAX_CPU_ISA'])")
    bare = {k: v for k, v in os.environ.items() if k not in CPU_NUMERICS}

    def run(env, code=code):
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    unpinned = run(bare, "import torch; print(torch.backends.cpu.get_cpu_capability())")[0]
    capability, cbwr, onednn = run(bare)
    assert cbwr == "AVX2" and onednn == "AVX2"
    assert capability == ("AVX2" if unpinned in ("AVX2", "AVX512") else unpinned)   # never above AVX2
    assert run({**bare, "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}) \
        == ["DEFAULT", "COMPATIBLE", "SSE41"]


def test_a_onednn_pin_that_changes_the_numerics_changes_the_cache_keys(monkeypatch):
    """The stages' cache keys carry oneDNN's level where it changes what is computed (any pin on an AVX-512 machine,
    a pin below AVX2 anywhere) and are unchanged where it does not (AVX2 or oneDNN's own choice on an AVX2 machine)."""
    from surgery.bench import finetune
    keys = {}
    for avx512 in (False, True):
        monkeypatch.setattr(finetune, "cpu_has_avx512", lambda: avx512)
        for isa in ("AVX2", "", "SSE41"):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
            keys[avx512, isa] = finetune._versions("tower")
    assert keys[False, "AVX2"] == keys[False, ""]                       # an AVX2 machine: the same models
    distinct = [keys[False, "AVX2"], keys[False, "SSE41"], keys[True, "AVX2"], keys[True, ""]]
    assert len({tuple(v) for v in distinct}) == 4 and keys[True, "SSE41"] == keys[False, "SSE41"]


def test_distill_images_on_the_cli(tiny_dirs, data, tmp_path):
    """prune-and-mask --distill-images distils the photos (report.json counts them); a forget photo in the file is
    refused naming its line, with nothing written; another method refuses the option."""
    model_dir = tiny_dirs["tiny-llava"]
    common = ["--model", model_dir, "--forget", data[0], "--retain", data[1], "--steps", 2]
    photos = write_split(tmp_path / "photos.jsonl", 5, 0, seed=8, prefix="x")
    res = run_cli("prune-and-mask", *common, "--distill-images", photos, "--out", tmp_path / "a", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["distill_images"] == str(photos) and report["distill_images"] == 5
    forget_photo = next(json.loads(line)["image"] for line in data[0].read_text().splitlines() if "image" in line)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(photos.read_text() + json.dumps({"image": str(data[0].parent / forget_photo)}) + "\n")
    res = run_cli("prune-and-mask", *common, "--distill-images", bad, "--out", tmp_path / "b")
    assert res.exit_code == 1 and "bad.jsonl:6:" in res.output and "is a forget photo" in res.output, res.output
    assert not (tmp_path / "b").exists()
    few = tmp_path / "few.jsonl"                    # checked before the model loads (and by --dry-run)
    few.write_text("".join(photos.read_text().splitlines(keepends=True)[:2]))
    for given, message in ((bad, "is a forget photo"), (few, "2 photos, fewer than the 4 of a retain batch")):
        res = run_cli("prune-and-mask", "--model", tmp_path / "no-such-model", *common[2:], "--distill-images", given,
                      "--out", tmp_path / "b", "--dry-run")
        assert res.exit_code == 1 and message in res.output, res.output
    res = run_cli("unlearn", "--method", "ga", *common, "--distill-images", photos, "--out", tmp_path / "c")
    assert res.exit_code == 2 and "--distill-images" in res.output and not (tmp_path / "c").exists(), res.output


def invoke_in(cwd, monkeypatch, *args):
    """The CLI, in this process, started in `cwd` (for an --out given relative to it): (exit code, output)."""
    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def test_an_out_that_would_delete_the_cwd_or_an_input_is_refused(tiny_dirs, data, tmp_path, monkeypatch):
    """--out . --overwrite used to delete the current directory, and an --out above the model its checkpoint; each
    is refused before anything is loaded, and nothing is touched."""
    import shutil
    work = tmp_path / "work"
    model = work / "models" / "m"
    shutil.copytree(tiny_dirs["tiny-llava"], model)
    (work / "keep.txt").write_text("mine")
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    common = ("--model", model, "--forget", data[0], "--retain", data[1])
    for command, out, message in (
            ("prune-and-mask", ".", "is the current directory"),
            ("prune-and-mask", "..", "a directory above the current one"),
            ("prune-and-mask", "models", "holds --model"),
            ("collect", "models/m", "holds --model"),
            ("prune-and-mask", "models/m/unlearned", "is inside --model"),
            ("prune-and-mask", "keep.txt", "is a file, not a directory"),
            ("prune-and-mask", "keep.txt/sub", "is a file, so the directory cannot be made")):
        code, output = invoke_in(work, monkeypatch, command, *common, "--out", out, "--overwrite")
        assert code != 0 and message in output, (command, out, output[-2000:])
    code, output = invoke_in("/", monkeypatch, "prune-and-mask", *common, "--out", data[0].parent, "--overwrite")
    assert code != 0 and "holds --model" in output   # (and --forget)
    assert (work / "keep.txt").read_text() == "mine" and sorted(p.name for p in work.iterdir()) == ["keep.txt", "models"]
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    from surgery.pipeline import atomic_dir
    with pytest.raises(ValueError, match="holds --cache"):  # a cache not made yet, which the run would make inside
        with atomic_dir(tmp_path / "d", False, keep={"--cache": tmp_path / "d" / "cache"}):
            pass


def test_sigterm_leaves_nothing_behind(tiny_dirs, data, tmp_path):
    """SIGTERM (kill, timeout, a scheduler) unwinds as Ctrl-C does: no temporary output, no teacher scratch."""
    import signal
    import time
    out = tmp_path / "o" / "run"
    proc = subprocess.Popen([sys.executable, "-m", "surgery", "prune-and-mask", "--model", str(tiny_dirs["tiny-llava"]),
                             "--forget", str(data[0]), "--retain", str(data[1]), "--out", str(out), "--steps", "100000",
                             "--teacher-memory", "0"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "o").glob(".surgery-teacher-*")):
        time.sleep(0.2)  # the teacher's scratch exists once training is under way
    assert list((tmp_path / "o").glob(".run.tmp-*")), "the run never started training"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.rstrip().endswith("Terminated."), err[-2000:]   # 128 + SIGTERM, as a shell
    assert list((tmp_path / "o").iterdir()) == [], list((tmp_path / "o").iterdir())


def test_settings_a_run_cannot_use_are_refused_before_loading(data, tmp_path, monkeypatch):
    """Each names its option, before the model is loaded."""
    import surgery.pipeline as pipeline

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(pipeline, "load", no_loading)
    common = ("prune-and-mask", "--model", "tiny-llava", "--forget", data[0], "--retain", data[1], "--out",
              tmp_path / "out")
    for option, value, message in (("--steps", 0, "--steps 0: expected a whole number >= 1"),
                                   ("--epochs", "nan", "--epochs nan: expected a number > 0"),
                                   ("--lr", "nan", "--lr nan: expected a number >= 0"),
                                   ("--max-grad-norm", -1, "--max-grad-norm -1.0: expected a number > 0"),
                                   ("--alpha", -1, "--alpha -1.0: expected a number >= 0"),
                                   ("--mask-threshold", -1, "--mask-threshold -1.0: expected a number >= 0"),
                                   ("--seed", -1, "--seed -1: expected a whole number in [0, 2^32)")):
        code, output = invoke_in(tmp_path, monkeypatch, *common, option, value)
        assert code != 0 and message in output, (option, output[-1500:])
    for args, hint in ((("--prune-threshold", 2, "--prune-frac", 0.1), "--prune-threshold/--prune-frac"),
                       (("--mask-threshold", 1, "--mask-frac", 0.1), "--mask-threshold/--mask-frac")):
        code, output = invoke_in(tmp_path, monkeypatch, *common, *args)
        assert code != 0 and "give one, not both" in output and hint in output
    code, output = invoke_in(tmp_path, monkeypatch, *common[:-4], "--retain", data[0], "--out", tmp_path / "out")
    assert code != 0 and "--forget and --retain are the same file" in output
    assert not (tmp_path / "out").exists()
    from surgery.config import Config
    with pytest.raises(ValueError, match="--mask-threshold None: expected a number >= 0 when --mask-frac is not given"):
        Config(model="m", forget="f", retain="r", out="o", mask_threshold=None).check()   # the library: no mask rule


def test_unreadable_checkpoints_and_saliency_files_are_clear_errors(tiny_dirs, data, tmp_path):
    import shutil
    cases = []
    for name, change in (("truncated", lambda d: (d / "model.safetensors").write_bytes(
                              (d / "model.safetensors").read_bytes()[:100])),
                         ("no_config", lambda d: (d / "config.json").unlink()),
                         ("bin_only", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")),
                         ("no_processor", lambda d: [f.unlink() for f in d.glob("*processor*")])):
        d = tmp_path / name
        shutil.copytree(tiny_dirs["tiny-llava"], d)
        change(d)
        cases.append((d, {"truncated": "cannot read the safetensors weights", "no_config": "has no config.json",
                          "bin_only": "pytorch_model.bin is a pickle checkpoint",
                          "no_processor": "no image processor could be loaded"}[name]))
    cases.append((tiny_dirs["tiny-llava"], None))
    for model, message in cases:
        extra = () if message else ("--saliency", data[0])
        proc, out = bad_run(tmp_path, model, data[0], data[1], *extra)
        message = message or "not a saliency file written by `surgery collect`"
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not out.exists()


def test_an_out_that_cannot_be_written_is_refused_before_any_work():
    """collect and finetune found an unwritable --out only when they saved, after the work; check_out (called before
    anything loads) now makes and removes a directory where --out would go. Root passes every permission check, so
    as root the check runs in a forked child that drops to `nobody`."""
    import shutil
    import tempfile
    from pathlib import Path
    from surgery.pipeline import check_out
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o777)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)

        def attempt():
            said = []
            for out in (locked / "run", locked / "a" / "b", base / "free"):
                try:
                    check_out(out, False)
                    said.append("ok")
                except PermissionError as e:
                    said.append(str(e))
            return said

        if os.geteuid() != 0:
            said = attempt()
        else:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:                        # the child: never returns into pytest
                try:
                    os.close(read)
                    os.setgid(65534)
                    os.setuid(65534)
                    os.write(write, json.dumps(attempt()).encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as f:
                said = json.loads(f.read())
            os.waitpid(pid, 0)
        assert said[0] == f"--out {locked / 'run'}: cannot write in {locked} (Permission denied)", said
        assert said[1] == f"--out {locked / 'a' / 'b'}: cannot write in {locked} (Permission denied)", said
        assert said[2] == "ok" and sorted(p.name for p in base.iterdir()) == ["locked"] and not any(locked.iterdir())
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


def test_teacher_cache_inside_an_input_is_refused_and_a_made_one_removed(tiny_dirs, data, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-llava"], model)
    common = ["prune-and-mask", "--model", model, "--forget", data[0], "--retain", data[1], "--steps", 2,
              "--teacher-memory", 0]
    res = run_cli(*common, "--teacher-cache", model / "t", "--out", tmp_path / "a")
    assert res.exit_code == 1 and "--teacher-cache" in res.output and "is inside --model" in res.output
    assert not (model / "t").exists() and not (tmp_path / "a").exists()
    res = run_cli(*common, "--teacher-cache", tmp_path / "new" / "deeper", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "new").exists()             # made for the run's scratch, removed with it
    from surgery.pipeline import scratch
    (tmp_path / "shared" / "other").mkdir(parents=True)   # another run's scratch in a made directory: kept
    (tmp_path / "own").mkdir()
    (tmp_path / "made" / ".surgery-teacher-2").mkdir(parents=True)   # a second spill inside a made directory,
    (tmp_path / "made" / ".surgery-teacher-1").mkdir()                # listed after it: removed first, then it
    with scratch() as dirs:
        dirs.extend([tmp_path / "own", tmp_path / "shared", tmp_path / "made" / ".surgery-teacher-1",
                     tmp_path / "made", tmp_path / "made" / ".surgery-teacher-2"])
    assert not (tmp_path / "own").exists() and (tmp_path / "shared" / "other").is_dir()
    assert not (tmp_path / "made").exists()


def test_options_a_method_does_not_read_are_named(data, tmp_path, caplog):
    """A sweep may pass one set of options to every method: each one the method ignores is said, not silently
    recorded as if it applied; --layers outside --scope mlp says what it still chooses."""
    common = ["--model", "tiny-llava", "--forget", data[0], "--retain", data[1], "--out", tmp_path / "o", "--dry-run"]
    res = run_cli("unlearn", "--method", "ga", *common, "--beta", 0, "--npo-beta", 0.5, "--mask-frac", 0.1,
                  "--prune-frac", 0)
    assert res.exit_code == 0, res.output
    for option in ("--beta", "--npo-beta", "--mask-frac", "--prune-frac"):   # a 0 given is given
        assert f"{option} is not a setting of ga: ignored" in caplog.text
    caplog.clear()
    res = run_cli("unlearn", "--method", "npo", *common, "--npo-beta", 0.5)
    assert res.exit_code == 0 and "not a setting" not in caplog.text
    res = run_cli("unlearn", "--method", "ga", *common, "--scope", "vision", "--layers", "1-1")
    assert res.exit_code == 0 and "--layers 1-1 with --scope vision" in caplog.text and "trains" in caplog.text


def test_each_methods_own_options_are_config_fields_with_the_clis_defaults():
    """Method.reads names Config fields; each option the CLI warns about is read by some method, and its default in
    the warning table is the option's own default (else a default value would be warned about)."""
    import dataclasses

    from surgery import methods
    from surgery.cli.method import FIELD, OWN_DEFAULTS
    from surgery.config import Config
    fields = {f.name for f in dataclasses.fields(Config)}
    read = set()
    for name in methods.METHODS:
        reads = methods.get(name).reads
        assert set(reads) <= fields, (name, set(reads) - fields)
        read |= set(reads)
    assert {FIELD.get(o, o) for o in OWN_DEFAULTS} <= read
    import click
    command = main.commands["unlearn"]
    params, ctx = {p.name: p for p in command.params}, click.Context(command)
    for option, default in OWN_DEFAULTS.items():
        given = params[option].get_default(ctx)
        given = None if type(given).__name__ == "Sentinel" else given    # click >= 8.2: "no default"
        assert (False if params[option].is_flag and given is None else given) == default, option
