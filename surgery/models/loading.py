"""Resolve --model (a local HF directory, an alias in the local HF cache, or a tiny-* builder) and load it."""
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from .adapters import Adapter, family_of, image_token_id
from .checkpoint import header, keep_source_weights, readable, weight_files
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
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"--model {path}: no tokenizer could be loaded from it (tokenizer.json, tokenizer.model or "
                         f"tokenizer_config.json missing or unreadable?): {str(e).splitlines()[0]}") from None
    if not getattr(tok, "chat_template", None):   # older exports keep it beside the processor, not the tokenizer
        for name, read in (("chat_template.jinja", lambda t: t), ("chat_template.json",
                                                                  lambda t: json.loads(t).get("chat_template"))):
            if (Path(path) / name).is_file():
                try:
                    tok.chat_template = read((Path(path) / name).read_text(encoding="utf-8"))
                except (ValueError, AttributeError) as e:
                    log.warning("%s: unreadable (%s); the tokenizer has no chat template", Path(path) / name, e)
                if getattr(tok, "chat_template", None):
                    break
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
    processor_error = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # e.g. Qwen2VLProcessor without torchvision: the image processor + tokenizer suffice
        log.debug("no processor loaded from %s: %s", path, e)
        processor_error = f"{type(e).__name__}" + (f": {str(e).splitlines()[0]}" if str(e).strip() else "")
    return tok, image_processor, processor, processor_error


def load(model: str, device="cpu", dtype=torch.float32, trust_remote_code: bool = False, seed: int = 0) -> Adapter:
    """An Adapter over the model: a local directory (safetensors only) or a tiny-* random model."""
    path = resolve(model)
    if path in TINY:
        log.warning("%s is a random-weight model: it knows nothing, so there is nothing to forget "
                    "(use it to try the pipeline)", path)
        m, tok, ip = build_tiny(path, seed=seed)
        return Adapter(m.to(device=device, dtype=dtype), tok, ip, None)
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model {model}: {path} has no config.json (not a Hugging Face checkpoint directory)")
    try:   # an unknown type: our list of families, before transformers' "does not recognize this architecture"
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"--model {model}: {config_file} is not a JSON object ({e})") from None
    if model_type is not None:
        _family(model, model_type)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    _family(model, config.model_type)
    weights = weight_files(path)
    if not weights:
        pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        raise FileNotFoundError(f"--model {model}: no safetensors weights in {path} (neither model.safetensors nor "
                                f"model.safetensors.index.json; surgery loads safetensors only"
                                + (f"; {', '.join(pickles)} is a pickle checkpoint, refused because loading it can run "
                                   f"code: convert it to safetensors first)" if pickles else ")"))
    tok, ip, proc, proc_error = _load_aux(path, trust_remote_code)
    if proc is None and family_of(config.model_type).style == "processor":   # it builds every input of this family
        raise ValueError(f"--model {model}: {config.model_type} needs its processor, which could not be loaded from "
                         f"{path} ({proc_error}); SmolVLM's needs torchvision and num2words installed")
    if ip is None:  # training would fail at its first photo
        raise ValueError(f"--model {model}: no image processor could be loaded from {path} "
                         f"(preprocessor_config.json missing or unreadable; see the warning above)")
    _check_tokenizer(model, path, tok, config)
    from safetensors import SafetensorError
    try:
        source = header(weights)
        m, info = transformers.AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (SafetensorError, OSError) as e:
        unreadable = [f.name for f in weights if not readable(f)]
        raise ValueError(f"--model {model}: cannot read the safetensors weights in {path}"
                         + (f" ({', '.join(unreadable)})" if unreadable else "") + f": {e}; is a file truncated "
                         "or missing?") from None
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing:   # transformers would fill them with random values and carry on
        raise ValueError(f"--model {model}: {len(missing)} of the {config.model_type} model's weights are not in "
                         f"{path} ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); refused, since they "
                         f"would be random. Do the checkpoint's names match the model's (e.g. a PEFT export's "
                         f"'base_model.model.' prefix), and is every shard complete?"
                         + (f" Its unused names: {', '.join(unexpected[:3])}" if unexpected else ""))
    if unexpected:
        log.warning("%s: %d tensors the %s model does not use are not loaded, and not saved with the output (%s%s)",
                    path, len(unexpected), config.model_type, ", ".join(unexpected[:3]), ", …" if len(unexpected) > 3
                    else "")
    adapter = Adapter(m.to(device).eval(), tok, ip, proc)
    adapter.source, adapter.source_header = Path(path), source
    return adapter


def _family(model: str, model_type: str):
    try:
        return family_of(model_type)
    except ValueError as e:
        raise ValueError(f"--model {model}: {e}") from None


def _check_tokenizer(model: str, path: str, tok, config) -> None:
    """A tokenizer that cannot encode text, or that does not know the model's image token, would fail at the first
    row with a message about image features; say what is wrong with the directory instead."""
    if not tok("a photo of a person", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"--model {model}: the tokenizer loaded from {path} ({type(tok).__name__}, {len(tok)} tokens) "
                         f"encodes text to nothing: are tokenizer.json / tokenizer_config.json missing?")
    image_id = image_token_id(config)
    if image_id is not None and not 0 <= image_id < len(tok):
        raise ValueError(f"--model {model}: config.json's image token id {image_id} is not in the tokenizer loaded "
                         f"from {path} ({len(tok)} tokens): is it the model's own tokenizer?")
    if family_of(config.model_type).style == "prefix" and (tok.bos_token is None or tok.eos_token is None):
        raise ValueError(f"--model {model}: the tokenizer loaded from {path} has no "
                         f"{'BOS' if tok.bos_token is None else 'EOS'} token, which PaliGemma's rows begin the prompt "
                         "(BOS) and end the answer (EOS) with: is it the model's own tokenizer?")
    if family_of(config.model_type).style == "qwen" and image_id is not None \
            and tok.convert_tokens_to_ids("<|image_pad|>") != image_id:
        raise ValueError(f"--model {model}: the tokenizer loaded from {path} does not map <|image_pad|> to "
                         f"config.json's image token id {image_id}: is it the model's own tokenizer?")


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
        kept = keep_source_weights(Path(out), adapter.source, adapter.source_header)
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
