"""NPO: Negative Preference Optimization (Zhang et al., COLM 2024, arXiv 2404.05868), with the vanilla model as the
reference, optionally with a retain term (NPO+RT, `--npo-retain`):

    L = α · (2/β) · E_forget[log(1 + (π_θ(y|x) / π_vanilla(y|x))^β)]  (+ CE(retain))
      = α · (2/β) · E_forget[softplus(β · (log π_θ(y|x) − log π_vanilla(y|x)))]

log π(y|x) is the answer's log-likelihood (summed over its tokens, as in the NPO paper; MLLMU-Bench's script uses the
batch-mean token loss with β = 0.4). β = --npo-beta (default 0.1, the NPO paper's). forget = fvqa (+ fqa), retain =
rvqa (+ rqa) when the scope reaches the language model. Without the retain term (MLLMU-Bench's NPO, the default) one
epoch is one pass over the forget-VQA rows. Default scope `full` (see ga).
"""
import torch.nn.functional as F

from ..models import answer_loss
from .loop import Context, Method, Term
from .losses import answer_logprob


class NPO(Method):
    name = "npo"
    reads = ("npo_beta", "npo_retain")
    paper = "Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868); MLLMU-Bench baseline"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "combined"}
    needs_vanilla = True
    forget_splits = ("fvqa", "fqa")
    logs_forget_loss = False        # its forget terms are not the answer loss
    retain_splits = ("rvqa", "rqa")

    def prepare(self, ctx: Context) -> None:
        if not ctx.cfg.npo_beta > 0:
            raise ValueError(f"--npo-beta must be > 0, got {ctx.cfg.npo_beta}")
        self.retain_splits = NPO.retain_splits if ctx.cfg.npo_retain else ()
        ctx.info["npo"] = {"beta": ctx.cfg.npo_beta, "retain_term": ctx.cfg.npo_retain}

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        logits = ctx.forward(batch)
        if split not in self.forget_splits:
            return {split: Term(answer_loss(logits, batch.labels))}
        beta = ctx.cfg.npo_beta
        log_ratio = answer_logprob(logits, batch.labels) - answer_logprob(ctx.vanilla_logits(batch), batch.labels)
        return {f"npo_{split}": Term(2 / beta * F.softplus(beta * log_ratio), ctx.cfg.alpha)}


METHOD = NPO()
