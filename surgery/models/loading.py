"""Resolve --model (a local HF directory, an alias in the local HF cache, or a tiny-* builder) and load it."""
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from .adapters import Adapter, family_of
from .checkpoint import keep_source_weights
from .tiny import TINY, build_tiny, image_processor_class

log = logging.getLogger("surgery")
ALIASES = {"llava": "llava-hf/llava-1.5-7b-hf", "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
           "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct"}


def resolve(model: str) -> str:
    """A local directory for `model`, or the tiny-* name itself. Never downloads."""
    if model in TINY or Path(model).is_dir():
        return model
    repo = ALIASES.get(model, model if model.count("/") == 1 else None)
    if repo is None:
        raise FileNotFoundError(f"--model {model!r}: not a directory, an alias ({', '.join(ALIASES)}) "
                                f"or a tiny model ({', '.join(TINY)})")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:
        raise FileNotFoundError(
            f"--model {model!r} ({repo}) is not in the local Hugging Face cache and surgery never downloads; "
            f"fetch it on a connected machine with `hf download {repo}` (then copy the cache), "
            "or pass --model /path/to/checkpoint_dir") from None


def _named_image_processor(path: str):
    """(processor, the class name preprocessor_config.json gives): that class, PIL-backed where transformers has
    one. Some transformers 5.x releases' AutoImageProcessor needs torchvision even for a processor that has a PIL
    twin."""
    config = Path(path) / "preprocessor_config.json"
    name = json.loads(config.read_text()).get("image_processor_type", "") if config.is_file() else ""
    cls = image_processor_class(name)
    if cls is None:
        raise ValueError(f"{config}: no image_processor_type that this transformers knows ({name!r})")
    return cls.from_pretrained(path), name


def _load_aux(path: str, trust_remote_code: bool):
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = processor = None
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as auto:
        try:
            image_processor, named = _named_image_processor(path)
            # another class than the one named (a PIL twin of a …Fast one) may resize slightly differently
            (log.info if type(image_processor).__name__ == named else log.warning)(
                "image processor %s from %s, which names %s (AutoImageProcessor: %s)", type(image_processor).__name__,
                path, named, str(auto).splitlines()[0])
        except Exception as e:
            log.warning("no image processor loaded from %s: %s; %s", path, auto, e)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # e.g. Qwen2VLProcessor without torchvision: the image processor + tokenizer suffice
        log.debug("no processor loaded from %s: %s", path, e)
    return tok, image_processor, processor


def load(model: str, device="cpu", dtype=torch.float32, trust_remote_code: bool = False, seed: int = 0) -> Adapter:
    """An Adapter over the model: a local directory (safetensors only) or a tiny-* random model."""
    path = resolve(model)
    if path in TINY:
        log.warning("%s is a random-weight model: it knows nothing, so there is nothing to forget "
                    "(use it to try the pipeline)", path)
        m, tok, ip = build_tiny(path, seed=seed)
        return Adapter(m.to(device=device, dtype=dtype), tok, ip, None)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: {path} has no config.json (not a Hugging Face checkpoint directory)")
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family_of(config.model_type)  # unknown type: a clear error before loading any weights
    files = os.listdir(path)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise FileNotFoundError(f"--model {model}: no .safetensors weights in {path} (surgery loads safetensors only"
                                + (f"; {', '.join(pickles)} is a pickle checkpoint, refused because loading it can run "
                                   f"code: convert it to safetensors first)" if pickles else ")"))
    tok, ip, proc = _load_aux(path, trust_remote_code)
    if ip is None:  # training would fail at its first photo
        raise ValueError(f"--model {model}: no image processor could be loaded from {path} "
                         f"(preprocessor_config.json missing or unreadable; see the warning above)")
    from safetensors import SafetensorError
    try:
        m = transformers.AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise ValueError(f"--model {model}: cannot read the safetensors weights in {path} ({e}); "
                         f"is a file truncated?") from None
    adapter = Adapter(m.to(device).eval(), tok, ip, proc)
    adapter.source = Path(path)
    return adapter


def llava_processor(adapter: Adapter):
    """LLaVA's own processor, complete: it expands <image> into one token per patch, so it needs the patch size and
    the feature strategy (a processor assembled by AutoProcessor from a tokenizer and an image processor lacks them
    and fails on the first image)."""
    cfg = adapter.model.config
    return transformers.LlavaProcessor(
        image_processor=adapter.image_processor, tokenizer=adapter.tokenizer, patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1,  # CLS
        chat_template=getattr(adapter.processor, "chat_template", None) or adapter.tokenizer.chat_template)


def save(adapter: Adapter, out: Path, state_dict: dict | None = None) -> dict | None:
    """A normal HF checkpoint: safetensors weights, config, tokenizer, image processor (and processor), loadable
    and usable with AutoModelForImageTextToText + AutoProcessor alone. `state_dict`: the weights to write instead of
    the model's own (a sharded model's, gathered). A model loaded from a checkpoint in another dtype keeps that
    checkpoint's tensors for every weight the run left unchanged (`checkpoint.keep_source_weights`, whose summary
    is returned; None for a model not loaded from a directory)."""
    adapter.model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    kept = None
    if adapter.source is not None:
        kept = keep_source_weights(Path(out), adapter.source)
        if kept["restored"]:
            log.info("%d of %d tensors, left unchanged by the run, are written as the checkpoint's (%s), bit for bit; "
                     "the rest in the run's dtype (%s)", kept["restored"], kept["tensors"],
                     "/".join(kept["checkpoint_dtypes"]), str(adapter.model.dtype).replace("torch.", ""))
    adapter.tokenizer.save_pretrained(out)
    processor = adapter.processor
    if adapter.model_type == "llava" and adapter.image_processor is not None and \
            getattr(processor, "patch_size", None) is None:
        processor = llava_processor(adapter)
    if adapter.image_processor is not None:
        adapter.image_processor.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return kept
