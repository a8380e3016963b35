"""Families whose processor builds the inputs (LLaVA-NeXT here): a batch may mix photo and text rows and photos of
other shapes (other crop counts), and scores every row as that row alone scores."""
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from surgery.models import Adapter, Example, answer_loss
from surgery.models.tokenizer import LLAVA_TEMPLATE, build_tokenizer

PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]   # several resolutions, as llava-v1.6 ships


@pytest.fixture(scope="module")
def llava_next():
    tok = build_tokenizer(extra_special=["<image>"], chat_template=LLAVA_TEMPLATE)
    ip = T.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=PINPOINTS)
    proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    text = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                             num_attention_heads=4, image_size=32, patch_size=8),
                            text_config=text, image_grid_pinpoints=PINPOINTS,
                            image_token_index=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(3)
    return Adapter(T.LlavaNextForConditionalGeneration(cfg).eval(), tok, ip, proc)


def photo(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@torch.no_grad()
def test_mixed_rows_and_photo_shapes_score_as_each_row_alone(llava_next):
    rows = [Example("Who is the person in the image?", "Cy Moor", photo(0, (60, 20))),
            Example("Where does Cy Moor live?", "Oslo"),
            Example("Who is the person in the image?", "Ada Vale", photo(1, (20, 60))),
            Example("Who is the person in the image?", "Bo Rask", photo(2, (32, 32)))]
    batch = llava_next.encode(rows)
    assert batch.inputs["pixel_values"].shape[0] == 3          # the three photos, zero crops padding the smaller
    together = answer_loss(llava_next.model(**batch.inputs).logits, batch.labels)
    alone = torch.cat([answer_loss(llava_next.model(**(b := llava_next.encode([r])).inputs).logits, b.labels)
                       for r in rows])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_feature_counts_are_the_projectors_rows_per_photo(llava_next):
    """VKD cuts the projector's output into each photo's rows by Batch.feature_counts: for LLaVA-NeXT those are its
    crops' patches, not its image tokens (unpadded, a newline token per row)."""
    from surgery.methods.vkd import capture, split_rows
    rows = [Example("Who is the person in the image?", "Cy Moor", photo(0, (60, 20))),
            Example("Where does Cy Moor live?", "Oslo"),
            Example("Who is the person in the image?", "Ada Vale", photo(1, (32, 32)))]
    batch = llava_next.encode(rows)
    with capture(llava_next.projector) as out:
        llava_next.model(**batch.inputs)
    projected = out[0].reshape(-1, out[0].shape[-1])
    assert sum(batch.feature_counts) == projected.shape[0] and len(batch.feature_counts) == 2
    tokens = (batch.inputs["input_ids"] == llava_next.model.config.image_token_index).sum(1)
    assert batch.feature_counts != [int(t) for t in tokens if t]     # the image tokens are another count
    for row, features in zip([rows[0], rows[2]], split_rows(out[0], batch.feature_counts)):   # each photo alone
        alone = llava_next.encode([row])
        with capture(llava_next.projector) as one:
            llava_next.model(**alone.inputs)
        torch.testing.assert_close(features, one[0].reshape(-1, one[0].shape[-1]), rtol=1e-5, atol=1e-5)
