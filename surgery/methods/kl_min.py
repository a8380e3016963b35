"""KL_Min: gradient ascent on the forget rows while the retain rows keep the vanilla model's next-token
distributions (MLLMU-Bench baselines, Liu et al., arXiv 2410.22108; TOFU's "KL" method):

    L = −α · CE(forget) + KL(π_vanilla ‖ π_θ)(retain)

The KL is taken at the answer positions and averaged over them per row. MLLMU-Bench's released script also adds
CE(retain) to the retain term; we follow the paper's description (KL only). Default scope `full` (see ga).
"""
from ..models import answer_loss
from .loop import Context, Method, Term
from .losses import answer_kl


class KLMin(Method):
    name = "kl_min"
    paper = "MLLMU-Bench baselines (Liu et al. 2024, arXiv 2410.22108)"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "combined"}
    needs_vanilla = True
    forget_splits = ("fvqa", "fqa")
    retain_splits = ("rvqa", "rqa")

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        logits = ctx.forward(batch)
        if split in self.forget_splits:
            return {split: Term(answer_loss(logits, batch.labels), -ctx.cfg.alpha)}
        return {f"kl_{split}": Term(answer_kl(ctx.vanilla_logits(batch), batch.labels, logits, batch.labels))}


METHOD = KLMin()
