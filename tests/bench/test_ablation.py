"""The ablation hooks against models ablated by hand: weights zeroed so that a layer computes what the hook
makes it compute."""
import copy

import pytest
import torch

from surgery.bench.ablation import ablated
from surgery.models import Adapter, Example, load


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load(str(tiny_dirs["tiny-llava"]))


def logits(adapter, examples):
    with torch.no_grad():
        return adapter.model(**adapter.encode(examples).inputs).logits


def examples(small_bench):
    from surgery.data import load_jsonl
    rows = [r for r in load_jsonl(small_bench / "eval_retain.jsonl") if r.is_vqa][:3]
    return [Example(r.prompt(), r.answer, r.load_image()) for r in rows]


def by_hand(adapter, zero):
    """A deep copy of the model with `zero(layer_index, layer)` naming the linear layers to zero."""
    model = copy.deepcopy(adapter.model)
    for i, layer in enumerate(model.get_submodule(adapter.family.layers)):
        for linear in zero(i, layer):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    return Adapter(model, adapter.tokenizer, adapter.image_processor, adapter.processor)


def test_mlp_ablation_equals_zeroed_fc2_of_live_layers(llava, small_bench):
    ex = examples(small_bench)
    live = set(llava.live_layers)
    assert len(live) < len(llava.mlps)          # the dead last layer stays as it is (it never reaches the LLM)
    expect = logits(by_hand(llava, lambda i, layer: [layer.mlp.fc2] if i in live else []), ex)
    before = logits(llava, ex)
    with ablated(llava, "mlp"):
        got = logits(llava, ex)
    assert torch.allclose(got, expect, atol=1e-5) and not torch.allclose(got, before, atol=1e-3)
    assert torch.equal(logits(llava, ex), before)                            # hooks removed on exit


def test_embeddings_ablation_equals_identity_layers(llava, small_bench):
    """Zeroing every layer's attention output and MLP output makes each layer return its input: the projector
    then sees pre_layrnorm(patch + position embeddings)."""
    ex = examples(small_bench)
    expect = logits(by_hand(llava, lambda i, layer: [layer.self_attn.out_proj, layer.mlp.fc2]), ex)
    # the hidden states transformers records with its own hooks must be the ablated ones (LLaVA reads layer -2)
    llava.model.model.vision_tower(torch.zeros(1, 3, 32, 32), output_hidden_states=True)
    with ablated(llava, "embeddings"):
        got = logits(llava, ex)
    assert torch.allclose(got, expect, atol=1e-5) and not torch.allclose(got, logits(llava, ex), atol=1e-3)


def test_text_rows_are_untouched_and_bad_kind(llava):
    ex = [Example("Where was Mara Velk born?", "Tarsel", None)]
    before = logits(llava, ex)
    for kind in ("mlp", "embeddings"):
        with ablated(llava, kind):
            assert torch.equal(logits(llava, ex), before)
    with pytest.raises(ValueError, match="--ablate 'attention'"):
        with ablated(llava, "attention"):
            pass
