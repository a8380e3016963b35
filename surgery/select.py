"""Selection from saliency: neuron importance I_u -> neurons to prune; Fisher ratio R -> weight mask m."""
import logging

import torch

from .saliency import Saliency

log = logging.getLogger("surgery")
REST = ("fqa", "rvqa", "rqa")   # the union the forget split is compared against


def importance_abs(sal: Saliency, split: str, layer: int) -> torch.Tensor:
    """I_abs(D, n) = Σ|z| / tokens (zero for a split that never reached the layer)."""
    return sal.stats[split][layer][1] / max(sal.tokens[split][layer], 1)


def neuron_importance(sal: Saliency, layers: list[int], eps: float = 1e-8) -> dict[int, torch.Tensor]:
    """I_u = I_abs(fvqa) / (I_abs(fqa) + I_abs(rvqa) + I_abs(rqa) + eps), per layer: [H]."""
    return {l: importance_abs(sal, "fvqa", l) / (importance_abs(sal, "fqa", l) + importance_abs(sal, "rvqa", l)
                                                 + importance_abs(sal, "rqa", l) + eps) for l in layers}


def check_fraction(name: str, frac) -> None:
    """Refuse a selection fraction outside [0, 1] (or not a number), before anything is computed."""
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1):
        raise ValueError(f"{name}={frac!r}: expected a fraction in [0, 1] (or None)")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k entries: the k largest scores, ties at the cut broken by position (the earlier entry first)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return chosen


def _top_of_all(scores: dict, frac: float) -> dict:
    """_top over every entry of the tensors in `scores` ranked together (the top `frac` of them all), as a bool
    tensor per key, shaped and placed like its scores."""
    chosen = _top(torch.cat([s.float().flatten().cpu() for s in scores.values()]),
                  round(frac * sum(s.numel() for s in scores.values())))
    out, start = {}, 0
    for key, s in scores.items():
        out[key] = chosen[start:start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return out


def select_neurons(importance: dict[int, torch.Tensor], threshold: float | None = None,
                   frac: float | None = None, per_layer: bool = True) -> dict[int, torch.Tensor]:
    """Neurons with I_u >= threshold, or the top `frac` of each layer (`per_layer`, the default) or of all given
    layers ranked together. Per layer is the default because I_u's scale differs between layers: on the demo model
    one global ranking put 14 of 15 pruned neurons in layer 0. Returns sorted int64 indices per layer."""
    check_fraction("prune_frac", frac)
    if threshold is not None:
        return {l: torch.nonzero(imp >= threshold).flatten().cpu() for l, imp in importance.items()}
    if not frac:
        return {l: torch.empty(0, dtype=torch.long) for l in importance}
    if per_layer:
        return {l: torch.nonzero(_top(imp.float().cpu(), round(frac * imp.numel()))).flatten()
                for l, imp in importance.items()}
    return {l: torch.nonzero(chosen).flatten().cpu() for l, chosen in _top_of_all(importance, frac).items()}


def fisher_union(sal: Saliency, reaches, splits=REST) -> dict[str, torch.Tensor]:
    """F over the union of `splits`, per parameter: the mean over the batches of the splits whose gradient reaches
    that parameter (`reaches(split, name)`). A split that cannot reach a weight has zero Fisher there; counting its
    batches would scale the union down (with the LLM frozen, text rows silently lowered the mask threshold to
    0.75 · F_rvqa on the demo model)."""
    union = {}
    for name in sal.fisher[splits[0]]:
        used = [s for s in splits if sal.batches[s] and reaches(s, name)]
        total = sum(sal.batches[s] for s in used)
        union[name] = sum((sal.fisher[s][name] * sal.batches[s] for s in used),
                          torch.zeros_like(sal.fisher[splits[0]][name])) / max(total, 1)
    return union


def union_splits(sal: Saliency, reaches, splits=REST) -> dict[str, list[str]]:
    """Which splits the union averages, per parameter (for the log and report.json)."""
    return {name: [s for s in splits if sal.batches[s] and reaches(s, name)] for name in sal.fisher[splits[0]]}


def fisher_mask(sal: Saliency, reaches, threshold: float | None = 1.0, frac: float | None = None,
                eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """m = R >= d_F with R = F_fvqa / (F_{fqa∪rvqa∪rqa} + eps); or exactly the global top `frac` of R's entries
    (ties at the cut broken by position: many ratios are exactly 0, and a cut by value would take them all)."""
    check_fraction("mask_frac", frac)
    rest = fisher_union(sal, reaches)
    ratio = {n: f / (rest[n] + eps) for n, f in sal.fisher["fvqa"].items()}
    if frac is None:
        return {n: r >= threshold for n, r in ratio.items()}
    return _top_of_all(ratio, frac)
