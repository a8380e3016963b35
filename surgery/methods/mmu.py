"""MMUnlearner (Huo et al., ACL 2025 Findings, arXiv 2502.11051): GA_Diff whose forget gradient only reaches the
weights that matter more to the forget images than to what must be kept (a Fisher weight-saliency mask):

    m = F_fvqa / (F_{fqa∪rvqa∪rqa} + eps) ≥ d_F          (--mask-threshold, default 1 as in MMUnlearner)
    update: −α · m ⊙ ∇CE(fvqa)   then   ∇CE(rvqa) (+ ∇CE(rqa))

F is MMUnlearner's estimator (the squared batch-mean gradient, averaged over batches) at the vanilla model; the union
averages, per weight, only the splits whose gradient reaches it: vision weights are kept for the retain images (their
"vision preserve" set), language-model weights for the retain images and every person's text (their "language
preserve" set). The forget set is the images only: MMUnlearner keeps the forget people's facts in text. Its updates
alternate, a forget update then a retain update (`--schedule alternating`, the default here). MMUnlearner clips the
gradient before masking it; the shared loop masks first. Default scope `full`: MMUnlearner's masks cover the language
model ("language" mask, its README's example) and the vision tower ("both"); every weight is the scope that holds both.
"""
from ..models import answer_loss
from .loop import Context, Method, Term
from .vkd import saliency_of, select_and_mask


class MMU(Method):
    name = "mmu"
    reads = ("mask_threshold", "mask_frac", "saliency")
    paper = "MMUnlearner (Huo et al. 2025, arXiv 2502.11051)"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "alternating"}
    forget_splits = ("fvqa",)
    retain_splits = ("rvqa", "rqa")

    def prepare(self, ctx: Context) -> None:
        select_and_mask(ctx, saliency_of(ctx), prune_neurons=False)

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        ce = answer_loss(ctx.forward(batch), batch.labels)
        return {split: Term(ce, -ctx.cfg.alpha if split == "fvqa" else 1.0)}


METHOD = MMU()
