"""A run in another dtype than its checkpoint's writes every weight it left unchanged as the checkpoint's own
tensor, bit for bit, and only what it changed in the run's dtype."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from surgery.cli import main
from surgery.models import load
from surgery.models.checkpoint import header, keep_source_weights, weight_files


def tensors(directory):
    """name -> tensor over a checkpoint's weight files, read with safetensors alone."""
    found = {}
    for f in weight_files(directory):
        with safe_open(f, framework="pt") as h:
            found.update({k: h.get_tensor(k) for k in h.keys()})
    return found


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def saved_in(directory, dtype, tmp_path, shard=None):
    """tiny-llava's checkpoint re-saved in `dtype` (sharded when `shard` is a size)."""
    out = tmp_path / f"ckpt-{dtype}"
    m = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
    m.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    for f in directory.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("ckpt_dtype,run_dtype", [(torch.float32, "bf16"), (torch.float16, "fp32")])
def test_weights_the_run_left_alone_keep_the_checkpoints_bytes(tiny_dirs, data, tmp_path, ckpt_dtype, run_dtype):
    ckpt = tiny_dirs["tiny-llava"] if ckpt_dtype == torch.float32 else saved_in(tiny_dirs["tiny-llava"],
                                                                                  ckpt_dtype, tmp_path)
    original, out = tensors(ckpt), tmp_path / "out"
    res = CliRunner().invoke(main, ["unlearn", "--method", "vkd", "--model", str(ckpt), "--forget", str(data[0]),
                                    "--retain", str(data[1]), "--out", str(out), "--steps", "2", "--lr", "1e-2",
                                    "--dtype", run_dtype, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    run = {"bf16": torch.bfloat16, "fp32": torch.float32}[run_dtype]
    saved = tensors(out)   # save_pretrained writes the checkpoint's key names, not the model's
    assert set(saved) == set(original)
    kept = [k for k in saved if saved[k].dtype == ckpt_dtype]
    assert kept and all(bits_equal(saved[k], original[k]) for k in kept), "a weight the run left alone was rewritten"
    trained = [k for k in saved if k not in kept]
    assert all(saved[k].dtype == run and not torch.equal(saved[k], original[k].to(run)) for k in trained)
    # what changed is the live vision MLPs, every one of them (tiny-llava's last layer is dead)
    scope = load(str(ckpt)).scope_params("mlp")
    assert len(trained) == len(scope) and all("vision_tower" in k and ".mlp." in k for k in trained)
    assert report["checkpoint"]["restored"] == len(kept) and report["checkpoint"]["tensors"] == len(saved)
    # loaded in the run's dtype, the output is the model the run trained: the frozen weights as the run cast them
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=run).state_dict()
    base = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=run).state_dict()
    assert all(torch.equal(loaded[k], base[k]) != (k in scope) for k in loaded)


def test_a_sharded_output_is_rewritten_shard_by_shard_with_its_index(tiny_dirs, tmp_path):
    source = saved_in(tiny_dirs["tiny-llava"], torch.float32, tmp_path, shard="200KB")
    assert len(weight_files(source)) > 1
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_parameter("model.multi_modal_projector.linear_1.weight").add_(1.0)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="150KB")
    assert len(weight_files(out)) > 1
    changed, = [k for k in tensors(out) if "multi_modal_projector.linear_1.weight" in k]  # the checkpoint's name
    done = keep_source_weights(out, source, header(weight_files(source)))
    original, saved = tensors(source), tensors(out)
    assert done["restored"] == len(saved) - 1 and done["saved_dtypes"] == ["BF16", "F32"]
    assert saved[changed].dtype == torch.bfloat16
    assert torch.equal(saved[changed], (original[changed].to(torch.bfloat16) + 1.0))
    assert all(bits_equal(saved[k], original[k]) for k in saved if k != changed)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    assert not list(out.glob("*.tmp"))
    again = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(again[k], model.state_dict()[k]) for k in again)


def test_a_run_in_the_checkpoints_dtype_rewrites_nothing(tiny_dirs, tmp_path):
    source = tiny_dirs["tiny-llava"]
    out = tmp_path / "out"
    AutoModelForImageTextToText.from_pretrained(source).save_pretrained(out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert keep_source_weights(out, source, header(weight_files(source)))["restored"] == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == before
