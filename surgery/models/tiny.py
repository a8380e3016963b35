"""Tiny random-weight models for trying the pipeline offline. A random model has nothing to forget."""
import torch
import transformers
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)

from .tokenizer import LLAVA_TEMPLATE, QWEN_TEMPLATE, build_tokenizer

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
TINY = ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl")


def image_processor_class(name: str):
    """The class for image processor `name` (…Fast and …Pil accepted), PIL-backed where this transformers has one (no
    torchvision needed); None when transformers has no such class."""
    base = name.removesuffix("Fast").removesuffix("Pil")
    return (getattr(transformers, base + "Pil", None) or getattr(transformers, base, None)) if base else None


def _image_processor(name: str, **kw):
    """The PIL-backed image processor where this transformers has one (no torchvision needed)."""
    return image_processor_class(name)(**kw)


def tiny_llava(seed: int = 0, corpus: list[str] | None = None, image_size: int = 32, patch_size: int = 8,
               vision_layers: int = 4, vision_hidden: int = 64, vision_intermediate: int = 256,
               text_hidden: int = 64, text_layers: int = 2, vocab_size: int = 1024):
    """LLaVA-1.5 architecture (CLIP vision tower, 2-layer MLP projector, Llama LM) at toy size."""
    tokenizer = build_tokenizer(corpus, vocab_size, extra_special=["<image>"], chat_template=LLAVA_TEMPLATE)
    image_processor = _image_processor(
        "CLIPImageProcessor", size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                                       num_hidden_layers=vision_layers, num_attention_heads=4,
                                       image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), tokenizer, image_processor


def _tiny_qwen(config_cls, model_cls, vision_kw, seed, corpus, image_size, vocab_size, text_hidden, text_layers):
    tokenizer = build_tokenizer(corpus, vocab_size, extra_special=QWEN_SPECIAL, chat_template=QWEN_TEMPLATE)
    pixels = image_size * image_size
    image_processor = _image_processor("Qwen2VLImageProcessor", patch_size=14, merge_size=2, temporal_patch_size=2,
                                       min_pixels=pixels, max_pixels=pixels)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    head_dim = text_hidden // 4
    config = config_cls(
        vision_config=dict(depth=4, num_heads=4, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, **vision_kw),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=tokenizer.unk_token_id,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval(), tokenizer, image_processor


def tiny_qwen2_vl(seed: int = 0, corpus=None, image_size: int = 56, vocab_size: int = 1024,
                  text_hidden: int = 64, text_layers: int = 2):
    """Qwen2-VL architecture (fc1/fc2 vision MLPs, patch merger) at toy size."""
    return _tiny_qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                      dict(embed_dim=64, hidden_size=text_hidden, mlp_ratio=4, hidden_act="quick_gelu"),
                      seed, corpus, image_size, vocab_size, text_hidden, text_layers)


def tiny_qwen2_5_vl(seed: int = 0, corpus=None, image_size: int = 56, vocab_size: int = 1024,
                    text_hidden: int = 64, text_layers: int = 2):
    """Qwen2.5-VL architecture (gated gate/up/down vision MLPs, window attention) at toy size."""
    return _tiny_qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                      dict(hidden_size=64, intermediate_size=128, out_hidden_size=text_hidden, hidden_act="silu",
                           window_size=56, fullatt_block_indexes=[1, 3]),
                      seed, corpus, image_size, vocab_size, text_hidden, text_layers)


def build_tiny(name: str, seed: int = 0, corpus=None):
    """(model, tokenizer, image_processor) for one of TINY."""
    builders = {"tiny-llava": tiny_llava, "tiny-qwen2-vl": tiny_qwen2_vl, "tiny-qwen2.5-vl": tiny_qwen2_5_vl}
    if name not in builders:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY)}")
    return builders[name](seed=seed, corpus=corpus)
