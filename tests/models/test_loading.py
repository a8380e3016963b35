"""Checkpoints a user may bring: every way a directory can be wrong is refused at load with what is wrong, before
any work; what transformers loads is what surgery reads back at save."""
import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery.models import load, save
from surgery.models.checkpoint import keep_source_weights, header, weight_files, write_streaming


def copy(tiny_dirs, name, tmp_path, to):
    d = tmp_path / to
    shutil.copytree(tiny_dirs[name], d)
    return d


def rename_keys(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    save_file({fn(k): v for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_weights_missing_from_the_checkpoint_are_refused_not_made_random(tiny_dirs, tmp_path):
    prefixed = copy(tiny_dirs, "tiny-llava", tmp_path, "peft")
    rename_keys(prefixed, lambda k: "base_model.model." + k)                    # a PEFT export's names
    with pytest.raises(ValueError, match=r"are not in .*peft.*refused, since they would be random.*base_model\.model"):
        load(str(prefixed))
    one = copy(tiny_dirs, "tiny-llava", tmp_path, "one")
    tensors = load_file(str(one / "model.safetensors"))
    gone = next(k for k in tensors if "fc1.weight" in k)
    save_file({k: v for k, v in tensors.items() if k != gone}, str(one / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 of the llava model's weights are not in .*fc1\.weight"):
        load(str(one))


def test_tensors_the_model_does_not_use_are_named(tiny_dirs, tmp_path, caplog):
    extra = copy(tiny_dirs, "tiny-llava", tmp_path, "extra")
    tensors = load_file(str(extra / "model.safetensors"))
    save_file({**tensors, "spare.weight": torch.zeros(3)}, str(extra / "model.safetensors"), metadata={"format": "pt"})
    load(str(extra))
    assert "1 tensors the llava model does not use are not loaded, and not saved with the output (spare.weight)" \
        in caplog.text


def test_a_tokenizer_that_encodes_nothing_or_lacks_the_image_token_is_refused(tiny_dirs, tmp_path):
    d = copy(tiny_dirs, "tiny-qwen2-vl", tmp_path, "q")
    config = json.loads((d / "config.json").read_text())
    for image_id, message in ((10 ** 6, r"image token id 1000000 is not in the tokenizer"),
                              (5, r"does not map <\|image_pad\|> to config.json's image token id 5")):
        (d / "config.json").write_text(json.dumps({**config, "image_token_id": image_id}))
        with pytest.raises(ValueError, match=message):
            load(str(d))
    empty = copy(tiny_dirs, "tiny-qwen2-vl", tmp_path, "empty")
    (empty / "tokenizer.json").unlink()     # Qwen2Tokenizer then loads with one token and encodes text to nothing
    (empty / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(ValueError, match=r"no tokenizer could be loaded|encodes text to nothing"):
        load(str(empty))


def test_a_missing_tokenizer_is_named(tiny_dirs, tmp_path):
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "notok")
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no tokenizer could be loaded"):
        load(str(d))


@pytest.mark.parametrize("kept_in", ["chat_template.json", "chat_template.jinja"])
def test_a_chat_template_kept_beside_the_processor_is_read(tiny_dirs, tmp_path, kept_in):
    d = copy(tiny_dirs, "tiny-qwen2-vl", tmp_path, "legacy")
    template = load(str(d)).tokenizer.chat_template
    assert template
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    for f in ("chat_template.jinja", "chat_template.json"):
        (d / f).unlink(missing_ok=True)
    assert not load(str(d)).tokenizer.chat_template
    (d / kept_in).write_text(json.dumps({"chat_template": template}) if kept_in.endswith(".json") else template)
    assert load(str(d)).tokenizer.chat_template == template


def test_without_any_chat_template_qwen_gets_its_own_turn(tiny_dirs):
    """The fallback turn holds Qwen's image placeholder (a LLaVA turn would give no image token at all)."""
    adapter = load(str(tiny_dirs["tiny-qwen2-vl"]))
    adapter.tokenizer.chat_template, adapter.processor = None, None
    turn = adapter.chat("Who is this?", True)
    assert turn.startswith("<|im_start|>system\n") and "<|vision_start|><|image_pad|><|vision_end|>Who is this?" in turn
    assert turn.endswith("<|im_start|>assistant\n")


def test_unknown_model_type_and_truncated_shard_are_named(tiny_dirs, tmp_path):
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "foo")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llava_foo"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"--model .*foo: unsupported model type 'llava_foo'; supported: .*llava"):
        load(str(d))
    from transformers import AutoModelForImageTextToText
    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(tiny_dirs["tiny-llava"]).save_pretrained(sharded, max_shard_size="150KB")
    for f in tiny_dirs["tiny-llava"].iterdir():
        if not f.name.startswith(("model", "config")):
            shutil.copy(f, sharded / f.name)
    shards = weight_files(sharded)
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"cannot read the safetensors weights in .*\({shards[1].name}\)"):
        load(str(sharded))


def test_the_weights_are_read_from_the_files_transformers_loads(tiny_dirs, tmp_path):
    """model.safetensors wins over an index beside it, as in from_pretrained: a stale index is never read."""
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "stale")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    assert weight_files(d) == [d / "model.safetensors"]
    adapter = load(str(d), dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert save(adapter, out)["restored"] == len(header(weight_files(d)))   # nothing changed: all the checkpoint's


def test_an_unreadable_checkpoint_at_save_time_keeps_the_runs_output(tiny_dirs, tmp_path, caplog):
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "gone")
    adapter = load(str(d), dtype=torch.bfloat16)
    shutil.rmtree(d)                                    # the input went away during the run
    out = tmp_path / "out"
    done = save(adapter, out)
    assert done["restored"] == 0 and done["saved_dtypes"] == ["BF16"] and "stay in the run's dtype" in caplog.text
    assert not list(out.glob("*.tmp"))
    again = load(str(out), dtype=torch.bfloat16).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in adapter.model.state_dict().items())


def test_a_run_in_the_checkpoints_dtype_never_reads_the_checkpoint_again(tiny_dirs, tmp_path):
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "same")
    adapter = load(str(d))
    shutil.rmtree(d)
    done = save(adapter, tmp_path / "out")
    assert done["restored"] == 0 and done["saved_dtypes"] == ["F32"]


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_writer_matches_save_file(tmp_path, seed):
    """write_streaming against safetensors' own save_file on fresh random tensors of every common dtype and shape,
    a scalar and an empty tensor among them: the same tensors, dtypes, shapes and metadata read back."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "z": torch.randn(5, generator=g),   # after an odd-length bf16 tensor in name order: must stay aligned
               "c": torch.randn(2, 3, 4, generator=g).half(), "scalar": torch.randn((), generator=g),
               "empty": torch.zeros(0, 4), "ids": torch.randint(0, 9, (6,), generator=g),
               "mask": torch.rand(5, generator=g) > 0.5, "d64": torch.randn(3, generator=g, dtype=torch.float64)}
    ref, ours = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    with safe_open(ref, framework="pt") as h:
        specs = {k: (h.get_slice(k).get_dtype(), h.get_slice(k).get_shape()) for k in sorted(h.keys())}
    write_streaming(ours, specs, lambda k: tensors[k], {"format": "pt"})
    a, b = load_file(str(ref)), load_file(str(ours))
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    with safe_open(ours, framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    n = struct.unpack("<Q", ours.read_bytes()[:8])[0]
    assert n % 8 == 0 and ours.stat().st_size == 8 + n + sum(t.numel() * t.element_size() for t in tensors.values())
    entries = json.loads(ours.read_bytes()[8:8 + n])
    spans = sorted(e["data_offsets"] for k, e in entries.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))     # no gap, no overlap
    assert all(entries[k]["data_offsets"][0] % tensors[k].element_size() == 0 for k in tensors)   # aligned
    with pytest.raises(ValueError, match=r"b is BF16 \[3\], its header says F32"):
        write_streaming(tmp_path / "bad.safetensors", {"b": ("F32", [3])}, lambda k: tensors[k])


def test_keep_source_weights_counts_what_it_restored(tiny_dirs, tmp_path):
    source = tiny_dirs["tiny-llava"]
    adapter = load(str(source), dtype=torch.float16)
    with torch.no_grad():
        adapter.model.get_parameter("model.multi_modal_projector.linear_1.bias").add_(1.0)
    out = tmp_path / "out"
    adapter.model.save_pretrained(out)
    done = keep_source_weights(out, source, header(weight_files(source)))
    saved = load_file(str(out / "model.safetensors"))
    assert done["restored"] == len(saved) - 1 and done["saved_dtypes"] == ["F16", "F32"]
    assert [k for k, v in saved.items() if v.dtype == torch.float16] == ["multi_modal_projector.linear_1.bias"]


def test_a_malformed_index_is_named(tiny_dirs, tmp_path):
    d = copy(tiny_dirs, "tiny-llava", tmp_path, "badindex")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not a weight index"):
        load(str(d))
