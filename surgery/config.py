"""The run configuration: the CLI fills it in, report.json records it."""
import math
from dataclasses import asdict, dataclass, field

SEED_LIMIT = 2**32  # numpy's seeds are below it


def check_seeds(seeds) -> None:
    """Refuse a list of benchmark seeds (the demo's and compare's --seeds) that is empty, repeats one, or holds one
    outside [0, SEED_LIMIT)."""
    if not seeds or any(not 0 <= s < SEED_LIMIT for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds in [0, 2^32), got {list(seeds)}")


EXCLUSIVE = (("steps", "epochs"), ("prune_threshold", "prune_frac"), ("mask_threshold", "mask_frac"))


def exclusive(given: dict) -> dict:
    """`given` settings (the demo's and compare's --set) with, for each pair of settings of which a run uses one
    (EXCLUSIVE), the other nulled when only one is given, as the CLI's options do: the user's choice replaces the
    default, and the report shows the one used. Both given is refused."""
    out = dict(given)
    for a, b in EXCLUSIVE:
        if out.get(a) is not None and out.get(b) is not None:
            raise ValueError(f"--set {a}={out[a]!r} and {b}={out[b]!r}: a run uses one of them; give one, not both")
        for one, other in ((a, b), (b, a)):
            if one in given and other not in given:
                out[other] = None
    return out


@dataclass
class Config:
    method: str = "vkd"                 # see surgery.methods.METHODS
    model: str = "tiny-llava"
    forget: str = ""
    retain: str = ""
    out: str = "out"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"                 # auto: fp32 on CPU, bf16 on GPU
    trust_remote_code: bool = False
    # scope and selection
    scope: str | None = None            # mlp | vision | full; None: the method's own (its paper's)
    layers: tuple[int, int] | None = None   # inclusive layer range, None = every live layer
    prune_threshold: float | None = None    # d_I: prune neurons with I_u >= d_I ...
    prune_frac: float | None = 0.02         # ... or the top fraction (used when no threshold) ...
    prune_per_layer: bool = True            # ... of each layer (False: one ranking over all layers)
    mask_threshold: float | None = 1.0      # d_F: weight mask m = R >= d_F ...
    mask_frac: float | None = None          # ... or the top fraction of R (overrides the threshold)
    eps: float = 1e-8
    # unlearning (paper Eq. 3-5)
    alpha: float | None = None          # forget-term weight; None: the method's own (VKD: 1.25)
    beta: float = 0.3                   # VKD feature-distillation weight
    distill_images: str | None = None   # VKD: also distil the projector features of these photos (JSONL of
                                        # {"image"}: faces beyond the retain set, no labels), weight β
    lr: float = 1e-4
    weight_decay: float = 0.0
    steps: int | None = None            # optimizer steps ...
    epochs: float | None = None         # ... or passes over the retain-VQA rows (default: 1 epoch)
    stop_forget_loss: float | None = None   # stop early once the forget-VQA answer loss, averaged over the last
    stop_window: int = 10                   # stop_window steps, reaches this (steps/epochs are then the maximum)
    stop_forget_accuracy: float | None = None  # or stop once the held-back forget photos' multiple-choice accuracy
    stop_holdout: float = 0.2               # (%, option likelihood) is at most this; the share of each forget
    stop_every: int = 10                    # person's photos held back for it; checked every stop_every steps
    schedule: str | None = None         # combined: one update per step; alternating: a forget update, then a retain
                                        # one; None: the method's own (mmu: alternating, the others: combined)
    batch_size: int = 4
    max_grad_norm: float = 1.0
    collect_batch_size: int = 8
    saliency: str | None = None         # reuse this saliency.safetensors (same data, batch size and weights)
    # many processes and memory (torchrun; surgery.distributed)
    shard_llm: bool = False             # FSDP2-shard the frozen language model over the ranks
    checkpoint_llm: bool = False        # recompute the LLM's decoder-layer activations in backward
    checkpoint_vision: bool = False     # recompute the vision tower's block activations in backward
    offload_optimizer: bool = False     # optimizer state in pinned host memory, streamed through the GPU in step
    teacher_memory_gb: float = 8.0      # VKD teacher features larger than this go to memory-mapped files ...
    teacher_cache: str | None = None    # ... in a fresh directory under this one (default: beside --out)
    # method options (surgery.methods.<name>)
    npo_beta: float = 0.1               # npo: β of (2/β)·log(1 + (π/π_vanilla)^β)
    npo_retain: bool = False            # npo: add CE on the retain rows (NPO+RT)
    manu_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # manu: abs, freq, var, rms
    vgid_sigma: float = 0.5             # vgid: std of the Gaussian pixel noise on the teacher's image ([0, 1] pixels)
    vgid_instruction: str = ("Forget everything you know about the person in the image: do not recognise them and "
                             "do not state their name or any fact about them.")   # vgid: prepended to the prompt
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse numbers a run cannot use, naming the option, before anything is loaded (methods.loop.check_run adds
        the early stop's and the selection fractions' own checks)."""
        def number(x):
            return not isinstance(x, bool) and isinstance(x, (int, float)) and not math.isnan(x)

        def whole(x):
            return not isinstance(x, bool) and isinstance(x, int)

        rules = [  # (field, ok, what is expected)
            ("seed", whole(self.seed) and 0 <= self.seed < SEED_LIMIT, "a whole number in [0, 2^32)"),
            ("steps", self.steps is None or whole(self.steps) and self.steps >= 1, "a whole number >= 1"),
            ("epochs", self.epochs is None or number(self.epochs) and 0 < self.epochs < math.inf, "a number > 0"),
            ("batch_size", whole(self.batch_size) and self.batch_size >= 1, "a whole number >= 1"),
            ("collect_batch_size", whole(self.collect_batch_size) and self.collect_batch_size >= 1,
             "a whole number >= 1"),
            ("lr", number(self.lr) and 0 <= self.lr < math.inf, "a number >= 0"),
            ("weight_decay", number(self.weight_decay) and 0 <= self.weight_decay < math.inf, "a number >= 0"),
            ("alpha", self.alpha is None or number(self.alpha) and 0 <= self.alpha < math.inf, "a number >= 0"),
            ("beta", number(self.beta) and 0 <= self.beta < math.inf, "a number >= 0"),
            ("max_grad_norm", number(self.max_grad_norm) and self.max_grad_norm > 0,
             "a number > 0 (clipping to a negative norm turns the gradient around; inf: no clipping)"),
            ("prune_threshold", self.prune_threshold is None or number(self.prune_threshold)
             and self.prune_threshold >= 0, "a number >= 0 (I_u is never negative)"),
            ("mask_threshold", self.mask_threshold is None or number(self.mask_threshold)
             and self.mask_threshold >= 0, "a number >= 0 (the Fisher ratio is never negative)"),
            ("mask_threshold", self.mask_threshold is not None or self.mask_frac is not None,
             "a number >= 0 when --mask-frac is not given (the Fisher mask needs one of them)"),
            ("eps", number(self.eps) and 0 <= self.eps < math.inf, "a number >= 0"),
            ("teacher_memory_gb", number(self.teacher_memory_gb) and self.teacher_memory_gb >= 0, "a number >= 0"),
            ("steps", self.steps is None or self.epochs is None, "one of --steps and --epochs, not both"),
            ("schedule", self.schedule in (None, "combined", "alternating"), "combined or alternating"),
            ("scope", self.scope in (None, "mlp", "vision", "full"), "mlp, vision or full"),
            ("dtype", self.dtype in ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
             "auto, fp32, bf16 or fp16"),
            ("layers", self.layers is None or isinstance(self.layers, (tuple, list)) and len(self.layers) == 2
             and all(whole(x) for x in self.layers) and 0 <= self.layers[0] <= self.layers[1],
             "two layer numbers A <= B, e.g. --layers 4-6 (--set layers=[4,6])"),
            ("manu_weights", isinstance(self.manu_weights, (tuple, list)) and len(self.manu_weights) == 4
             and all(number(x) and 0 <= x < math.inf for x in self.manu_weights),
             "four weights >= 0 (abs, freq, var, rms)"),
        ]
        for name, ok, expected in rules:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected {expected}")
