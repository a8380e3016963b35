"""Selection from saliency: neuron importance I_u -> neurons to prune; Fisher ratio R -> weight mask m."""
import torch

from .saliency import Saliency


def importance_abs(sal: Saliency, split: str, layer: int) -> torch.Tensor:
    """I_abs(D, n) = Σ|z| / tokens (zero for a split that never reached the layer)."""
    return sal.stats[split][layer][1] / max(sal.tokens[split][layer], 1)


def neuron_importance(sal: Saliency, layers: list[int], eps: float = 1e-8) -> dict[int, torch.Tensor]:
    """I_u = I_abs(fvqa) / (I_abs(fqa) + I_abs(rvqa) + I_abs(rqa) + eps), per layer: [H]."""
    return {l: importance_abs(sal, "fvqa", l) / (importance_abs(sal, "fqa", l) + importance_abs(sal, "rvqa", l)
                                                 + importance_abs(sal, "rqa", l) + eps) for l in layers}


def select_neurons(importance: dict[int, torch.Tensor], threshold: float | None = None,
                   frac: float | None = None) -> dict[int, torch.Tensor]:
    """Neurons with I_u >= threshold, or the global top `frac` over all given layers (ties broken by
    layer order, then index). Returns sorted int64 indices per layer (possibly empty)."""
    if threshold is not None:
        return {l: torch.nonzero(imp >= threshold).flatten().cpu() for l, imp in importance.items()}
    if not frac:
        return {l: torch.empty(0, dtype=torch.long) for l in importance}
    layers = list(importance)
    flat = torch.cat([importance[l].float().cpu() for l in layers])
    k = round(frac * flat.numel())
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for l in layers:
        n = importance[l].numel()
        out[l] = torch.nonzero(chosen[start:start + n]).flatten()
        start += n
    return out


def fisher_union(sal: Saliency, splits=("fqa", "rvqa", "rqa")) -> dict[str, torch.Tensor]:
    """F over the union of splits: the mean over all their batches (each split's mean weighted by its
    batch count)."""
    total = sum(sal.batches[s] for s in splits)
    names = sal.fisher[splits[0]].keys()
    return {n: sum(sal.fisher[s][n] * sal.batches[s] for s in splits) / max(total, 1) for n in names}


def fisher_mask(sal: Saliency, threshold: float | None = 1.0, frac: float | None = None,
                eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """m = R >= d_F with R = F_fvqa / (F_{fqa∪rvqa∪rqa} + eps); or the global top `frac` of R."""
    rest = fisher_union(sal)
    ratio = {n: f / (rest[n] + eps) for n, f in sal.fisher["fvqa"].items()}
    if frac is None:
        return {n: r >= threshold for n, r in ratio.items()}
    flat = torch.cat([r.flatten().cpu() for r in ratio.values()])
    k = round(frac * flat.numel())
    cut = torch.topk(flat, k).values.min() if k else float("inf")
    return {n: r >= cut for n, r in ratio.items()}
