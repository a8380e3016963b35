"""GA: gradient ascent on the forget rows, the first MLLMU-Bench baseline (Liu et al., arXiv 2410.22108):

    L = −α · CE(forget)

CE is a row's mean answer-token cross-entropy; forget = fvqa (+ fqa when the scope reaches the language model).
Default scope `full`: MLLMU-Bench fine-tunes the language model (LoRA on its linear layers, vision tower and projector
left out), and every weight is the nearest scope here.
"""
from ..models import answer_loss
from .loop import Context, Method, Term


class GA(Method):
    name = "ga"
    paper = "MLLMU-Bench baselines (Liu et al. 2024, arXiv 2410.22108)"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "combined"}
    forget_splits = ("fvqa", "fqa")
    retain_splits = ()

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        return {split: Term(answer_loss(ctx.forward(batch), batch.labels), -ctx.cfg.alpha)}


METHOD = GA()
