"""The run configuration: the CLI fills it in, report.json records it."""
from dataclasses import asdict, dataclass, field


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
    lr: float = 1e-4
    weight_decay: float = 0.0
    steps: int | None = None            # optimizer steps ...
    epochs: float | None = None         # ... or passes over the retain-VQA rows (default: 1 epoch)
    schedule: str = "combined"          # combined: one update per step; alternating: a forget update, then a retain one
    batch_size: int = 4
    max_grad_norm: float = 1.0
    collect_batch_size: int = 8
    saliency: str | None = None         # reuse this saliency.safetensors (same data, batch size and weights)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
