"""PaliGemma: its prefix-LM rows (prefix attended both ways, the answer a causal suffix marked by token_type_ids),
built as its own processor builds them, text rows beside photo rows, and prune-and-mask end to end on a saved model."""
import json

import numpy as np
import pytest
import torch
import transformers as T
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from surgery.cli import main
from surgery.models import Adapter, Example, answer_loss, load, save
from surgery.models.tiny import image_processor_class
from surgery.models.tokenizer import build_tokenizer

from rowdata import write_split


def tiny_paligemma(seed=3):
    tok = build_tokenizer(extra_special=["<image>"], chat_template=None)
    ip = image_processor_class("SiglipImageProcessor")(size={"height": 32, "width": 32})
    ip.image_seq_length = 16                       # (32 / 8)², as PaliGemma's preprocessor_config.json says it
    proc = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)   # adds its location and segment tokens
    text = T.GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = T.PaliGemmaConfig(vision_config=T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                               num_attention_heads=4, image_size=32, patch_size=8),
                            text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=64)
    torch.manual_seed(seed)
    return Adapter(T.PaliGemmaForConditionalGeneration(cfg).eval(), tok, ip, proc)


@pytest.fixture(scope="module")
def paligemma():
    return tiny_paligemma()


def photo(seed, size=(30, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def unpadded(batch, i):
    keep = batch.inputs["attention_mask"][i].bool()
    return {"input_ids": batch.inputs["input_ids"][i][keep], "token_type_ids": batch.inputs["token_type_ids"][i][keep],
            "labels": batch.labels[i][keep]}


@pytest.mark.parametrize("answered", [True, False])
def test_rows_are_those_its_processor_builds(paligemma, answered):
    rows = [Example("Who is the person in the image?", "Cy Moor" if answered else None, photo(0)),
            Example("Name?", "Ada Vale Rask" if answered else None, photo(1, (50, 20)))]
    for side in ("right", "left"):
        batch = paligemma.encode(rows, padding_side=side)
        assert batch.feature_counts == [16, 16]
        for i, row in enumerate(rows):
            kw = {"suffix": [row.answer]} if answered else {}
            ref = paligemma.processor(text=[row.prompt], images=[row.image], return_tensors="pt", **kw)
            mine = unpadded(batch, i)
            assert torch.equal(mine["input_ids"], ref["input_ids"][0])
            assert torch.equal(mine["token_type_ids"], ref["token_type_ids"][0])
            if answered:
                assert torch.equal(mine["labels"], torch.as_tensor(ref["labels"][0]))
            else:
                assert (mine["labels"] == -100).all() and (mine["token_type_ids"] == 0).all()
            torch.testing.assert_close(batch.inputs["pixel_values"][i], ref["pixel_values"][0], rtol=0, atol=0)


def test_a_text_row_is_a_photo_row_without_its_image_tokens(paligemma):
    """The processor refuses a row without a photo; the language model reads one as the same prefix and suffix."""
    ref = paligemma.processor(text=["Where does Cy Moor live?"], images=[photo(2)], suffix=["Oslo"],
                              return_tensors="pt")
    keep = ref["input_ids"][0] != paligemma.model.config.image_token_id
    batch = paligemma.encode([Example("Where does Cy Moor live?", "Oslo")])
    assert "pixel_values" not in batch.inputs and batch.feature_counts == []
    mine = unpadded(batch, 0)
    assert torch.equal(mine["input_ids"], ref["input_ids"][0][keep])
    assert torch.equal(mine["token_type_ids"], ref["token_type_ids"][0][keep])


@torch.no_grad()
def test_mixed_rows_score_as_each_row_alone_and_the_prefix_is_bidirectional(paligemma):
    rows = [Example("Who is the person in the image?", "Cy Moor", photo(0)),
            Example("Where does Cy Moor live?", "Oslo"),
            Example("Who is this?", "Ada Vale", photo(1, (20, 60)))]
    batch = paligemma.encode(rows)
    together = answer_loss(paligemma.model(**batch.inputs).logits, batch.labels)
    alone = torch.cat([answer_loss(paligemma.model(**(b := paligemma.encode([r])).inputs).logits, b.labels)
                       for r in rows])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # without token_type_ids the prefix is causal, and the answer's loss is another
    causal = {k: v for k, v in batch.inputs.items() if k != "token_type_ids"}
    assert not torch.allclose(answer_loss(paligemma.model(**causal).logits, batch.labels), together)


def test_prune_and_mask_on_a_saved_paligemma(tmp_path):
    model_dir = tmp_path / "paligemma"
    save(tiny_paligemma(), model_dir)
    before = load_file(str(model_dir / "model.safetensors"))
    forget = write_split(tmp_path / "forget.jsonl", 5, 3, seed=1, prefix="f")
    retain = write_split(tmp_path / "retain.jsonl", 7, 4, seed=2, prefix="r")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(a) for a in (
        "prune-and-mask", "--model", model_dir, "--forget", forget, "--retain", retain, "--out", out, "--steps", 3,
        "--lr", 1e-2, "--prune-frac", 0.05, "--json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["losses"]) == 3 and sum(report["pruned_neurons"].values()) > 0
    adapter = load(str(model_dir))
    assert type(adapter.processor).__name__ == "PaliGemmaProcessor"
    scope = set(adapter.scope_params("mlp"))
    assert all(torch.equal(v, load_file(str(model_dir / "model.safetensors"))[k]) for k, v in before.items())
    after = T.AutoModelForImageTextToText.from_pretrained(out, use_safetensors=True).state_dict()
    original = adapter.model.state_dict()
    assert set(after) == set(original)
    assert any(not torch.equal(after[k], original[k]) for k in scope)
    assert all(torch.equal(after[k], original[k]) for k in original if k not in scope)


@torch.no_grad()
def test_greedy_decoding_reads_the_prefix_both_ways_and_each_new_token_causally(paligemma):
    """Decoding from encode's left-padded prompts (as evaluate.generate runs it) against a loop that runs the whole
    sequence each step: the prompt as prefix (type 0), the tokens so far as suffix (type 1). Each step's logits."""
    rows = [Example("Who is the person in the image?", None, photo(0)), Example("Where does Cy Moor live?", None),
            Example("Name?", None, photo(1, (50, 20)))]
    tok, model = paligemma.tokenizer, paligemma.model
    batch = paligemma.encode(rows, padding_side="left")
    out = model.generate(**batch.inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    for i, row in enumerate(rows):
        prompt = paligemma.encode([row])
        ids, kw = prompt.inputs["input_ids"], {k: v for k, v in prompt.inputs.items() if k == "pixel_values"}
        new = []
        for step in range(4):
            seq = torch.cat([ids, torch.tensor([new], dtype=torch.long).view(1, -1)], 1)
            types = torch.cat([torch.zeros_like(ids), torch.ones(1, len(new), dtype=torch.long)], 1)
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), token_type_ids=types, **kw).logits[0, -1]
            torch.testing.assert_close(out.logits[step][i], logits, rtol=1e-4, atol=1e-4)
            new.append(int(out.sequences[i, step - 4]))


def test_a_tokenizer_without_bos_is_refused_at_load(tmp_path):
    adapter = tiny_paligemma()
    adapter.tokenizer.bos_token = None
    save(adapter, tmp_path / "m")
    with pytest.raises(ValueError, match=r"has no BOS token, which PaliGemma's rows begin the prompt"):
        load(str(tmp_path / "m"))


def test_the_image_token_in_a_prompt_or_answer_is_refused(paligemma):
    """Its processor would take a prompt's own "<image>" as the photo's place; surgery's rows place the photo by the
    row's image, so a text holding the token is refused rather than read as a 17th slot."""
    for row in (Example("<image>Who is this?", "Cy Moor", photo(0)), Example("Who?", "Cy <image>"),
                Example("Where does <image> live?", None)):
        with pytest.raises(ValueError, match=r"holds the model's image token '<image>'"):
            paligemma.encode([row])
