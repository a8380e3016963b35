import logging

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from surgery.models import Adapter, Example, answer_loss, family_of, load
from surgery.models import loading
from surgery.models.tokenizer import LLAVA_TEMPLATE, build_tokenizer

TEXT = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
OTHER_FAMILIES = {
    "llava_next": (lambda: T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT),
        image_grid_pinpoints=[[32, 32]])), [0, 1]),
    "paligemma": (lambda: T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
        vision_config=T.SiglipVisionConfig(**VISION), text_config=T.GemmaConfig(**TEXT))), [0, 1, 2]),
    "idefics3": (lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
        vision_config=T.Idefics3VisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT))), [0, 1, 2]),
    "smolvlm": (lambda: T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
        vision_config=T.SmolVLMVisionConfig(**VISION), text_config=T.LlamaConfig(**TEXT))), [0, 1, 2]),
}



class _NoTorchvision:
    """AutoImageProcessor as some transformers 5.x releases behave without torchvision."""
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")


def no_torchvision(monkeypatch):
    monkeypatch.setattr(loading.transformers, "AutoImageProcessor", _NoTorchvision)  # the module loading.py calls

@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_adapter_table_other_families(family):
    build, live = OTHER_FAMILIES[family]
    adapter = Adapter(build(), build_tokenizer())
    assert adapter.model_type == family and list(adapter.live_layers) == live
    assert len(adapter.mlps) == 3 and all(m.hidden == 64 for m in adapter.mlps)
    scope = adapter.scope_params("mlp")
    assert len(scope) == 4 * len(live)  # fc1/fc2 weight + bias per live layer
    named = dict(adapter.model.named_parameters())
    assert all(named[k] is p for k, p in scope.items())
    vision = adapter.scope_params("vision")
    assert set(scope) < set(vision) and any(k.startswith(adapter.family.projector) for k in vision)
    assert not any("language_model" in k for k in vision)


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="unsupported model type 'bert'.*llava.*qwen2_5_vl"):
        family_of("bert")


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_labels_cover_answer_tokens_only(name):
    adapter = load(name)
    img = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype("uint8"))
    batch = adapter.encode([Example("Who is this?", "Ada Lovelace", img), Example("Where?", "Oslo")])
    tok = adapter.tokenizer
    for i, answer in enumerate(["Ada Lovelace", "Oslo"]):
        ids = batch.labels[i][batch.labels[i] != -100].tolist()
        assert tok.decode(ids[:-1]).strip() == answer and ids[-1] == adapter._eos_id()
        assert adapter.answer_ids(answer) == tuple(ids)      # the tokens encode appends, whatever the prompt
    # padding is masked out of attention and labels; image tokens are never labels
    assert ((batch.inputs["attention_mask"] == 0) <= (batch.labels == -100)).all()
    image_id = adapter.model.config.image_token_id
    assert ((batch.inputs["input_ids"] == image_id) <= (batch.labels == -100)).all()
    assert (batch.inputs["input_ids"][0] == image_id).sum() == batch.feature_counts[0]
    out = adapter.model(**batch.inputs)
    assert torch.isfinite(out.logits).all()
    # answer_ids tokenizes an answer once per adapter
    adapter.encode = None
    assert adapter.answer_ids("Oslo") == tuple(batch.labels[1][batch.labels[1] != -100].tolist())


def test_dead_layer_request_warns(caplog):
    adapter = load("tiny-llava")
    with caplog.at_level(logging.WARNING, logger="surgery"):
        kept = adapter.select_layers(range(2, 4))
    assert [m.layer for m in kept] == [2] and "dead" in caplog.text
    with pytest.raises(ValueError, match="has 4 layers"):
        adapter.select_layers(range(3, 6))


def test_alias_resolves_through_local_cache_only(tmp_path, monkeypatch, tiny_dirs):
    import shutil

    from surgery.models import resolve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="llava-hf/llava-1.5-7b-hf.*not in the local Hugging Face cache"):
        resolve("llava")
    repo = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dirs["tiny-llava"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    path = resolve("llava")
    assert path.rstrip("/").endswith("0" * 40)
    assert load(path).model_type == "llava"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_image_processor_loads_without_auto_class(name, tiny_dirs, monkeypatch):
    """Where AutoImageProcessor fails (transformers 5.17 without torchvision), the class that
    preprocessor_config.json names is loaded instead, and it prepares an image exactly as the auto class does."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8))
    expected = load(str(tiny_dirs[name])).image_processor(images=[image], return_tensors="pt")["pixel_values"]

    no_torchvision(monkeypatch)
    processor = load(str(tiny_dirs[name])).image_processor
    assert processor is not None and type(processor).__name__.endswith("Pil")   # the fallback ran
    torch.testing.assert_close(processor(images=[image], return_tensors="pt")["pixel_values"], expected,
                               rtol=0, atol=1e-6)



def test_image_processor_fallback_warns_when_it_swaps_the_class(tiny_dirs, tmp_path, monkeypatch, caplog):
    """Where AutoImageProcessor fails, a checkpoint that names a …Fast (torchvision) processor gets the PIL twin and
    a warning that says so (the two may resize slightly differently); one that names the PIL class gets it, at INFO."""
    import json
    import logging
    import shutil

    no_torchvision(monkeypatch)
    base = json.loads((tiny_dirs["tiny-llava"] / "preprocessor_config.json").read_text())["image_processor_type"]
    base = base.removesuffix("Fast").removesuffix("Pil")
    for named, level in ((base + "Fast", logging.WARNING), (base + "Pil", logging.INFO)):
        path = tmp_path / named
        shutil.copytree(tiny_dirs["tiny-llava"], path)
        config = path / "preprocessor_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "image_processor_type": named}))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="surgery"):
            processor = load(str(path)).image_processor
        assert type(processor).__name__ == base + "Pil"
        said = [r for r in caplog.records if "which names" in r.getMessage()]
        assert [r.levelno for r in said] == [level] and named in said[0].getMessage()

def test_gathered_answer_loss_matches_the_full_layout():
    """The CUDA path scores the answer positions alone; on fresh random logits it gives the CPU path's losses and
    gradients to float rounding, rows without an answer token included (loss 0)."""
    from surgery.models.adapters import answer_loss_gathered
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for b, length, v in [(4, 40, 1024), (3, 17, 500), (6, 9, 33)]:
        logits = torch.randn(b, length, v, generator=g, dtype=torch.float64).requires_grad_()
        labels = torch.randint(0, v, (b, length), generator=g)
        labels[torch.rand(b, length, generator=g) < 0.6] = -100
        labels[0] = -100  # a row with nothing to score
        full = answer_loss(logits, labels)
        grad_full, = torch.autograd.grad(full.sum(), logits)
        gathered = answer_loss_gathered(logits, labels)
        grad_gathered, = torch.autograd.grad(gathered.sum(), logits)
        assert full[0] == gathered[0] == 0
        torch.testing.assert_close(gathered, full.float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_gathered, grad_full, rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_answer_loss_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, 700, generator=g)
    labels = torch.randint(0, 700, (4, 30), generator=g)
    labels[torch.rand(4, 30, generator=g) < 0.5] = -100
    torch.testing.assert_close(answer_loss(logits.cuda(), labels.cuda()).cpu(), answer_loss(logits, labels),
                               rtol=1e-5, atol=1e-5)


def _one_row_at_a_time(adapter, e: Example, count: int) -> tuple[list[int], list[int]]:
    """encode's ids and labels of one example, written out: the chat template rendered for it, its image token
    repeated `count` times, one tokenizer call for the prompt and one for the answer, then EOS."""
    content = ([{"type": "image"}] if e.image is not None else []) + [{"type": "text", "text": e.prompt}]
    owner = adapter.processor if getattr(adapter.processor, "chat_template", None) else adapter.tokenizer
    text = owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                     tokenize=False)
    if e.image is not None:
        llava = adapter.family.style == "llava"
        token = adapter.tokenizer.convert_ids_to_tokens(adapter.model.config.image_token_id) if llava \
            else "<|image_pad|>"
        text = text.replace("<image>" if llava else token, token * count, 1)
    bos = adapter.tokenizer.bos_token
    special = not (adapter.family.style == "qwen" or (bos is not None and text.startswith(bos)))
    ids = adapter.tokenizer(text, add_special_tokens=special)["input_ids"]
    answer = adapter.tokenizer((" " if adapter.family.style == "llava" else "") + e.answer,
                               add_special_tokens=False)["input_ids"] + [adapter._eos_id()]
    return ids + answer, [-100] * len(ids) + answer


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_token_ids_are_those_of_one_row_at_a_time(name):
    """`token_ids` (batched tokenizer calls, the chat template's frame, no pixels for LLaVA) gives the ids a
    row-by-row rendering and tokenisation gives, and `encode` pads exactly those."""
    adapter = load(name)
    rng = np.random.default_rng(1)
    img = Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8"))
    examples = [Example("Who is this?\nA. Ada\nB. Bo", "A", img), Example("  Where was  she born? ", "Oslo"),
                Example("What is\n\nthe job?", "a long answer, with punctuation!", img), Example("", "x")]
    ids, labels = adapter.token_ids(examples)
    batch = adapter.encode(examples)
    counts = iter(batch.feature_counts)
    for k, e in enumerate(examples):
        expect = _one_row_at_a_time(adapter, e, next(counts) if e.image is not None else 0)
        assert (ids[k], labels[k]) == expect
        keep = batch.inputs["attention_mask"][k].bool()
        assert batch.inputs["input_ids"][k][keep].tolist() == expect[0]
        assert batch.labels[k][keep].tolist() == expect[1]


def test_chat_frame_only_where_the_template_keeps_the_text_verbatim():
    """The rendered frame stands in for the template only when the text comes back as it went in; a template that
    trims the text (or has none) is rendered for every row, and both give what the template gives."""
    adapter = load("tiny-llava")
    prompts = ["Who is this?", "  spaced out \n", "\nnew\nlines\n", ""]
    for has_image in (True, False):
        assert all(adapter.chat(p, has_image) == adapter._render_chat(p, has_image) for p in prompts)
    assert adapter._chat_frames[True] is not None
    trimmed = Adapter(adapter.model, build_tokenizer(chat_template=LLAVA_TEMPLATE.replace(
        "{{ c['text'] }}", "{{ c['text'] | trim }}")), adapter.image_processor)
    for p in prompts:
        content = [{"type": "image"}, {"type": "text", "text": p}]
        assert trimmed.chat(p, True) == trimmed.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert trimmed._chat_frames[True] is None
    assert trimmed.chat("  a  ", True).endswith("<image>\na ASSISTANT:")
