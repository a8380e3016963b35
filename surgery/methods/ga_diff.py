"""GA_Diff: gradient ascent on the forget rows, descent on the retain rows (MLLMU-Bench baselines, Liu et al.,
arXiv 2410.22108):

    L = −α · CE(forget) + CE(retain)

forget = fvqa (+ fqa), retain = rvqa (+ rqa) when the scope reaches the language model. Default scope `full` (see ga).
"""
from ..models import answer_loss
from .loop import Context, Method, Term


class GADiff(Method):
    name = "ga_diff"
    paper = "MLLMU-Bench baselines (Liu et al. 2024, arXiv 2410.22108)"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "combined"}
    forget_splits = ("fvqa", "fqa")
    retain_splits = ("rvqa", "rqa")

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        ce = answer_loss(ctx.forward(batch), batch.labels)
        return {split: Term(ce, -ctx.cfg.alpha if split in self.forget_splits else 1.0)}


METHOD = GADiff()
