"""Model adapters: where a family keeps its vision MLPs and projector, which layers are live, and how
rows become model inputs. Modules are found by module path (transformers 5.x), never by checkpoint key."""
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("surgery")


@dataclass(frozen=True)
class Family:
    layers: str                 # module path of the vision encoder's layer list
    mlp_in: tuple[str, ...]     # input projections of one MLP (two for gated MLPs)
    mlp_out: str                # output projection; its input is the post-activation hidden z
    projector: str
    style: str                  # "llava" | "qwen" | "prefix" (PaliGemma's prefix-LM rows) | "processor" (the model's
                                # own processor builds the inputs)


FAMILIES = {
    "llava": Family("model.vision_tower.encoder.layers", ("fc1",), "fc2", "model.multi_modal_projector", "llava"),
    "llava_next": Family("model.vision_tower.encoder.layers", ("fc1",), "fc2", "model.multi_modal_projector", "processor"),
    "qwen2_vl": Family("model.visual.blocks", ("fc1",), "fc2", "model.visual.merger", "qwen"),
    "qwen2_5_vl": Family("model.visual.blocks", ("gate_proj", "up_proj"), "down_proj", "model.visual.merger", "qwen"),
    "paligemma": Family("model.vision_tower.encoder.layers", ("fc1",), "fc2", "model.multi_modal_projector", "prefix"),
    "idefics3": Family("model.vision_model.encoder.layers", ("fc1",), "fc2", "model.connector", "processor"),
    "smolvlm": Family("model.vision_model.encoder.layers", ("fc1",), "fc2", "model.connector", "processor"),
}
SCOPES = ("mlp", "vision", "full")


def image_token_id(config) -> int | None:
    """The id of the token the inputs expand into a photo's slots (image_token_id, or older configs'
    image_token_index); None for a config without one."""
    found = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if found is None else found


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


@dataclass
class VisionMLP:
    """One vision-encoder MLP: z = act(fc_in(x)) (gated: act(gate(x))·up(x)), y = fc_out(z)."""
    layer: int
    path: str
    fc_in: list[nn.Linear]
    fc_out: nn.Linear

    @property
    def hidden(self) -> int:
        return self.fc_out.in_features

    def named_params(self, in_names: tuple[str, ...], out_name: str) -> dict[str, nn.Parameter]:
        named = {}
        for name, lin in [*zip(in_names, self.fc_in), (out_name, self.fc_out)]:
            named[f"{self.path}.{name}.weight"] = lin.weight
            if lin.bias is not None:
                named[f"{self.path}.{name}.bias"] = lin.bias
        return named


@dataclass
class Example:
    """One training/eval example: a prompt (question, with options when multiple choice), an answer, an image."""
    prompt: str
    answer: str | None = None
    image: object | None = None    # PIL.Image.Image


@dataclass
class Batch:
    inputs: dict                   # model kwargs (no labels)
    labels: torch.Tensor           # [B, L], -100 outside the answer tokens
    feature_counts: list[int] = field(default_factory=list)   # projector output rows per example with an image

    def to(self, device):
        self.inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        self.labels = self.labels.to(device)
        return self


class Adapter:
    """A loaded model plus what the method needs to know about its family."""

    def __init__(self, model, tokenizer, image_processor=None, processor=None):
        self.model, self.tokenizer, self.image_processor, self.processor = model, tokenizer, image_processor, processor
        self.source: Path | None = None  # the checkpoint directory it was loaded from (models.load sets it) ...
        self.source_header: dict = {}    # ... and its tensors' names, files and dtypes (checkpoint.header)
        self.model_type = model.config.model_type
        self.family = family_of(self.model_type)
        layers = model.get_submodule(self.family.layers)
        self.mlps = [VisionMLP(i, f"{self.family.layers}.{i}.mlp",
                               [layer.mlp.get_submodule(n) for n in self.family.mlp_in],
                               layer.mlp.get_submodule(self.family.mlp_out)) for i, layer in enumerate(layers)]
        self.projector = model.get_submodule(self.family.projector)
        self.live_layers = self._live_layers(len(layers))
        self._answers: dict[str, tuple[int, ...]] = {}
        self._chat_frames: dict[bool, tuple[str, str] | None] = {}

    def _live_layers(self, n: int) -> range:
        """Layers whose output reaches the LLM. LLaVA reads hidden_states[vision_feature_layer] (default -2):
        hidden_states[k] is layer k-1's output, so layers past that index are dead."""
        vfl = getattr(self.model.config, "vision_feature_layer", None)
        if vfl is None or self.family.style == "qwen":
            return range(n)
        last = max(vfl) if isinstance(vfl, (list, tuple)) else vfl
        return range(n + 1 + last if last < 0 else last)

    # ----- scope -----
    def mlp_params(self, mlp: VisionMLP) -> dict[str, nn.Parameter]:
        return mlp.named_params(self.family.mlp_in, self.family.mlp_out)

    def select_layers(self, layers: range | None) -> list[VisionMLP]:
        """Live MLPs within `layers` (None = all live). Dead layers asked for are warned about and dropped."""
        wanted = range(len(self.mlps)) if layers is None else layers
        dead = [i for i in wanted if i not in self.live_layers and i < len(self.mlps)]
        if dead and layers is not None:
            log.warning("layers %s are dead (their output never reaches the LLM: vision_feature_layer=%s); excluded",
                        dead, getattr(self.model.config, "vision_feature_layer", None))
        bad = [i for i in wanted if i >= len(self.mlps)]
        if bad:
            raise ValueError(f"--layers {layers.start}-{layers.stop - 1}: the vision encoder has {len(self.mlps)} layers")
        return [self.mlps[i] for i in wanted if i in self.live_layers]

    def scope_params(self, scope: str, mlps: list[VisionMLP] | None = None) -> dict[str, nn.Parameter]:
        """Trainable parameters by name: 'mlp' (the given vision MLPs, default every live one), 'vision'
        (encoder + projector), 'full' (everything)."""
        if scope == "mlp":
            mlps = self.select_layers(None) if mlps is None else mlps
            return {k: p for m in mlps for k, p in self.mlp_params(m).items()}
        named = dict(self.model.named_parameters())
        if scope == "full":
            return named
        if scope == "vision":
            return {k: p for k, p in named.items() if self.is_vision(k)}
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")

    @property
    def vision_prefixes(self) -> tuple[str, str]:
        """Module paths of the vision tower and the projector: a row without an image never reaches them."""
        tower = self.family.layers.removesuffix(".layers").removesuffix(".blocks").removesuffix(".encoder")
        return tower + ".", self.family.projector + "."

    def is_vision(self, name: str) -> bool:
        """Does parameter `name` belong to the vision tower or the projector?"""
        return name.startswith(self.vision_prefixes)

    def train_only(self, params: dict[str, nn.Parameter]) -> None:
        """requires_grad on `params` only: everything else (the LLM, by default) is frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)

    # ----- inputs -----
    @property
    def device(self):
        return next(self.model.parameters()).device

    def chat(self, prompt: str, has_image: bool, answer: str | None = None) -> str:
        """The user turn holding `prompt` (after an image when `has_image`), ready for the answer: the model's chat
        template, rendered once per kind of turn when it holds the text verbatim (`_chat_frame`)."""
        if has_image not in self._chat_frames:
            self._chat_frames[has_image] = self._chat_frame(has_image)
        frame = self._chat_frames[has_image]
        return frame[0] + prompt + frame[1] if frame else self._render_chat(prompt, has_image)

    def _render_chat(self, prompt: str, has_image: bool) -> str:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if getattr(template_owner, "chat_template", None):
            return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.family.style == "qwen":   # the family's own turn, as its template renders it
            image = "<|vision_start|><|image_pad|><|vision_end|>" if has_image else ""
            return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + image + prompt
                    + "<|im_end|>\n<|im_start|>assistant\n")
        return ("USER: <image>\n" if has_image else "USER: ") + prompt + " ASSISTANT:"

    def _chat_frame(self, has_image: bool) -> tuple[str, str] | None:
        """(prefix, suffix) such that the rendered turn is prefix + prompt + suffix, when the template places the
        text verbatim: two probe texts (one with spaces and newlines at both ends, which a `trim` would cut) must
        each come back framed by the same prefix and suffix. Else None: every turn is rendered (a jinja render per
        row was half the time of tokenising the benchmark's training rows)."""
        probes = [" \n\x00surgery-a\x00 \n", "\x00surgery-b\x00"]
        rendered = [self._render_chat(p, has_image) for p in probes]
        if rendered[1].count(probes[1]) != 1:
            return None
        frame = tuple(rendered[1].split(probes[1]))
        return frame if rendered[0] == frame[0] + probes[0] + frame[1] else None

    @cached_property
    def image_placeholder(self) -> str | None:
        """The text of the model's image token ("<image>", "<|image_pad|>"), which the inputs expand into a photo's
        slots: in a prompt or an answer it would be read as one, not as text. None when the model has no image token
        or it is an ordinary piece of the vocabulary rather than a token of its own (then text cannot name it).
        Looked up once: every encode checks its rows against it."""
        image_id = image_token_id(self.model.config)
        mark = None if image_id is None else self.tokenizer.convert_ids_to_tokens(image_id)
        return mark if mark in self.tokenizer.get_added_vocab() else None

    def _check_text(self, examples: list[Example]) -> None:
        mark = self.image_placeholder
        bad = next((t for e in examples for t in (e.prompt, e.answer) if t and mark in t), None) if mark else None
        if bad is not None:
            raise ValueError(f"the text {bad[:80]!r} holds the model's image token {mark!r}, which the inputs would "
                             "read as a slot for a photo's features; remove it from the data (the photo is placed by "
                             "the row's 'image')")

    def encode(self, examples: list[Example], padding_side: str = "right") -> Batch:
        """Token ids, attention mask, pixels, and labels covering the answer tokens (+EOS) only.
        Examples without an answer give prompts for generation (use padding_side='left')."""
        self._check_text(examples)
        if self.family.style == "processor":
            return self._encode_with_processor(examples, padding_side)
        if self.family.style == "prefix":
            return self._encode_prefix_lm(examples, padding_side)
        images = [e.image for e in examples if e.image is not None]
        pixel_inputs, counts = self._pixels(images) if images else ({}, [])
        inputs, labels = self._pad(*self._token_ids(examples, counts), padding_side)
        if self.family.style == "qwen":
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.model.config.image_token_id).int()
        inputs.update(pixel_inputs)
        return Batch(inputs, labels, counts)

    def token_ids(self, examples: list[Example]) -> tuple[list[list[int]], list[list[int]]]:
        """`encode`'s token ids and labels of each example, unpadded, without its pixels: for rows whose image
        features come from elsewhere. LLaVA's image-token count is the config's, so no image is processed (an
        example's image only says that it has one); other families count the tokens of the image given."""
        if self.family.style in ("processor", "prefix"):
            raise ValueError(f"{self.model_type}: its rows need what encode adds (the processor's image tokens, or "
                             "PaliGemma's token_type_ids); use encode")
        self._check_text(examples)
        images = [e.image for e in examples if e.image is not None]
        if self.family.style == "llava":
            counts = [self._image_tokens()] * len(images)
        else:
            counts = self._pixels(images)[1] if images else []
        return self._token_ids(examples, counts)

    def _token_ids(self, examples: list[Example], counts: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt (chat template, image tokens expanded to `counts`) + answer + EOS ids per example, and labels
        that are -100 on the prompt. One tokenizer call for every prompt and one for every answer."""
        texts, k = [], 0
        for e in examples:
            text = self.chat(e.prompt, e.image is not None)
            if e.image is not None:
                text = self._expand_image_tokens(text, counts[k]); k += 1
            texts.append(text)
        seqs = self._tokenize(texts, [not self._template_has_bos(t) for t in texts])
        labels = [[-100] * len(ids) for ids in seqs]
        answered = [i for i, e in enumerate(examples) if e.answer is not None]
        lead = " " if self.family.style == "llava" else ""
        answers = self._tokenize([lead + examples[i].answer for i in answered], [False] * len(answered))
        eos = self._eos_id()
        for i, ans in zip(answered, answers):
            ans = ans + [eos]
            seqs[i], labels[i] = seqs[i] + ans, labels[i] + ans
        return seqs, labels

    def _tokenize(self, texts: list[str], special: list[bool]) -> list[list[int]]:
        """`tokenizer(text, add_special_tokens=flag)["input_ids"]` of each text: one batched call per flag."""
        out: list[list[int]] = [[] for _ in texts]
        for flag in (True, False):
            where = [i for i, f in enumerate(special) if f == flag]
            if where:
                batch = self.tokenizer([texts[i] for i in where], add_special_tokens=flag)["input_ids"]
                for i, ids in zip(where, batch):
                    out[i] = list(ids)
        return out

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """The answer's tokens as `encode` appends them to a prompt (EOS included); tokenized once per adapter."""
        if answer not in self._answers:
            batch = self.encode([Example("", answer, None)])
            self._answers[answer] = tuple(batch.inputs["input_ids"][0][batch.labels[0] != -100].tolist())
        return self._answers[answer]

    def _template_has_bos(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return self.family.style == "qwen" or (bos is not None and text.startswith(bos))

    def _eos_id(self) -> int:
        if self.family.style == "qwen":
            im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if im_end is not None and im_end != self.tokenizer.unk_token_id:
                return im_end
        return self.tokenizer.eos_token_id

    def _pixels(self, images):
        if self.family.style == "llava":
            px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": px}, [self._image_tokens()] * len(images)
        out = self.image_processor(images=images, return_tensors="pt")
        merge = self.model.config.vision_config.spatial_merge_size
        counts = [int(t.prod()) // merge**2 for t in out["image_grid_thw"]]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, counts

    def _image_tokens(self) -> int:
        """Projector rows (= image tokens) one image gets in LLaVA and PaliGemma: its patches, and CLS with LLaVA's
        'full' strategy (PaliGemma has none)."""
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + int(getattr(self.model.config, "vision_feature_select_strategy", "default") == "full")

    def _expand_image_tokens(self, text: str, n: int) -> str:
        token = "<image>" if self.family.style == "llava" else "<|image_pad|>"
        if self.family.style == "llava":
            token = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
            return text.replace("<image>", token * n, 1) if "<image>" in text else token * n + "\n" + text
        return text.replace(token, token * n, 1)

    def _pad(self, seqs, labels, side):
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_id()
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, sl], lab[i, sl], att[i, sl] = torch.tensor(s), torch.tensor(l), 1
        return {"input_ids": ids, "attention_mask": att}, lab

    def _encode_with_processor(self, examples, side):
        """Families whose image-token expansion the model's own processor owns (LLaVA-NeXT, Idefics3, SmolVLM)."""
        if self.processor is None:
            raise RuntimeError(f"{self.model_type} needs its processor (AutoProcessor) to build inputs; "
                               "it could not be loaded from the model directory")
        rows, seqs, labels = [], [], []
        for e in examples:
            prompt = self.chat(e.prompt, e.image is not None)
            kw = {"images": [e.image]} if e.image is not None else {}
            p = self.processor(text=[prompt], return_tensors="pt", **kw)
            full = self.processor(text=[prompt + (" " + e.answer if e.answer else "")], return_tensors="pt", **kw) \
                if e.answer is not None else p
            ids = full["input_ids"][0].tolist() + ([self.tokenizer.eos_token_id] if e.answer is not None else [])
            seqs.append(ids)
            labels.append([-100] * p["input_ids"].shape[1] + ids[p["input_ids"].shape[1]:])
            rows.append({k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")})
        inputs, labels = self._pad(seqs, labels, side)
        for key in sorted({k for r in rows for k in r}):   # a text row has no pixels: the image rows' only
            parts = [r[key] for r in rows if key in r]
            crops = {p.shape[1] for p in parts if p.dim() > 1}
            if len(crops) > 1:   # photos of other shapes cut into other crop counts: zero crops pad them, as the
                n = max(crops)   # processors do for a batch (LLaVA-NeXT reads image_sizes, Idefics3 drops them)
                parts = [torch.cat([p, p.new_zeros(p.shape[0], n - p.shape[1], *p.shape[2:])], 1) for p in parts]
            inputs[key] = torch.cat(parts)
        if self.model_type == "llava_next":   # the projector's rows: each crop's patches (the image tokens,
            counts = self._llava_next_rows(inputs.get("image_sizes", []))   # unpadded, with newlines, differ)
        else:                                 # projector outputs land 1:1 on the image placeholder tokens
            image_id = image_token_id(self.model.config)
            counts = [int(n) for n, e in zip((inputs["input_ids"] == image_id).sum(1), examples) if e.image is not None]
        return Batch(inputs, labels, counts)

    def _encode_prefix_lm(self, examples, side):
        """PaliGemma's rows, as its processor builds them: the prefix (one image token per projector row, BOS, the
        prompt, a newline; token_type_ids 0, attended both ways) and the suffix (answer + EOS; type 1, causal, the
        labels). A row without a photo is the same without image tokens: the processor refuses one, the model does
        not. No chat template: PaliGemma's prompts are plain task prefixes."""
        tok, per_photo = self.tokenizer, self._image_tokens()
        image = tok.convert_ids_to_tokens(image_token_id(self.model.config))
        seqs = self._tokenize([image * per_photo * (e.image is not None) + tok.bos_token + e.prompt + "\n"
                               for e in examples], [False] * len(examples))
        labels = [[-100] * len(ids) for ids in seqs]
        answered = [i for i, e in enumerate(examples) if e.answer is not None]
        for i, ids in zip(answered, self._tokenize([examples[i].answer + tok.eos_token for i in answered],
                                                   [False] * len(answered))):
            seqs[i], labels[i] = seqs[i] + ids, labels[i] + ids
        inputs, labels = self._pad(seqs, labels, side)
        inputs["token_type_ids"] = (labels != -100).long()
        photos = [e.image for e in examples if e.image is not None]
        if photos:
            processor = self.image_processor or self.processor.image_processor
            inputs["pixel_values"] = processor(images=photos, return_tensors="pt")["pixel_values"]
        return Batch(inputs, labels, [per_photo] * len(photos))

    def _llava_next_rows(self, image_sizes: torch.Tensor) -> list[int]:
        """The projector rows LLaVA-NeXT gives each photo: its crops (the base image and the grid's tiles, by its
        size) times the patches of one crop (+ CLS with the 'full' strategy), as its get_image_features cuts them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        cfg, per_crop = self.model.config, self._image_tokens()   # one crop's rows are one LLaVA image's
        return [image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) * per_crop for size in image_sizes]


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean token cross-entropy over the answer tokens: [B, L, V], [B, L] -> [B].

    On CUDA only the answer positions are scored (`answer_loss_gathered`): the [B, V, L] layout below runs ATen's
    spatial softmax over every position, a quarter of a 7B VKD step's GPU time (benchmarks/RESULTS.md). The CPU keeps
    this layout, whose rounding the benchmark's recorded numbers were computed with; the two agree to float rounding."""
    if logits.is_cuda:
        return answer_loss_gathered(logits, labels)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n = (labels != -100).sum(1).clamp(min=1)
    return tok.sum(1) / n


def answer_loss_gathered(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`answer_loss` computed on the answer positions alone, softmax over the last dimension."""
    labels = labels[:, 1:]
    keep = labels != -100
    tok = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    tok = tok.masked_scatter(keep, nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[keep],
                                                                reduction="none"))
    return tok.sum(1) / keep.sum(1).clamp(min=1)
