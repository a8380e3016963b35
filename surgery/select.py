"""Selection from saliency: neuron importance I_u -> neurons to prune; Fisher ratio R -> weight mask m."""
import logging
import numbers

import torch

from .saliency import Saliency

log = logging.getLogger("surgery")
REST = ("fqa", "rvqa", "rqa")   # the union the forget split is compared against


def importance_abs(sal: Saliency, split: str, layer: int) -> torch.Tensor:
    """I_abs(D, n) = Σ|z| / tokens (zero for a split that never reached the layer)."""
    return sal.stats[split][layer][1] / max(sal.tokens[split][layer], 1)


def neuron_importance(sal: Saliency, layers: list[int], eps: float = 1e-8) -> dict[int, torch.Tensor]:
    """I_u = I_abs(fvqa) / (I_abs(fqa) + I_abs(rvqa) + I_abs(rqa) + eps), per layer: [H]."""
    return {l: _ratio(importance_abs(sal, "fvqa", l), importance_abs(sal, "fqa", l) + importance_abs(sal, "rvqa", l)
                      + importance_abs(sal, "rqa", l), eps) for l in layers}


def _ratio(forget: torch.Tensor, rest: torch.Tensor, eps: float) -> torch.Tensor:
    """forget / (rest + eps), and 0 where forget is 0 (with eps = 0, a neuron or weight no split reaches would be
    0 / 0 = NaN)."""
    return torch.where(forget == 0, torch.zeros_like(forget), forget / (rest + eps))


def check_fraction(name: str, frac) -> None:
    """Refuse a selection fraction outside [0, 1] (or not a number), before anything is computed."""
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, numbers.Real) or not 0 <= frac <= 1):
        raise ValueError(f"{name}={frac!r}: expected a fraction in [0, 1] (or None)")


def _check_choice(what: str, threshold, frac, neither: bool = False) -> None:
    """One way to select: a threshold or a fraction, not both (and not neither unless `neither`: nothing selected)."""
    if threshold is not None and frac is not None:
        raise ValueError(f"{what}: give a threshold or a fraction, not both (threshold={threshold!r}, frac={frac!r})")
    if threshold is None and frac is None and not neither:
        raise ValueError(f"{what}: give a threshold or a fraction (neither given)")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or threshold != threshold):
        raise ValueError(f"{what}: threshold={threshold!r} is not a number")


def _check_scores(what: str, scores: dict, one_dim: bool = False) -> None:
    """Scores to rank: tensors (one score per neuron where `one_dim`) without NaN, which no order places."""
    for key, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{what} of {key!r} is a {type(s).__name__}, not a tensor")
        if one_dim and s.dim() != 1:
            raise ValueError(f"{what} of {key!r} has shape {list(s.shape)}: expected one score per neuron (1-D)")
        bad = torch.isnan(s)
        if bad.any():
            raise ValueError(f"{what} of {key!r} is NaN at {int(bad.sum())} of {s.numel()} entries (first at "
                             f"{torch.nonzero(bad)[0].tolist()}): the statistics it comes from are not finite")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k entries: the k largest scores, ties at the cut broken by position (the earlier entry first)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return chosen


def _top_of_all(scores: dict, frac: float) -> dict:
    """_top over every entry of the tensors in `scores` ranked together (the top `frac` of them all), as a bool
    tensor per key, shaped and placed like its scores."""
    if not scores:
        return {}
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
    one global ranking put 14 of 15 pruned neurons in layer 0. Returns sorted int64 indices per layer (none with
    neither a threshold nor a fraction). NaN scores are refused."""
    check_fraction("prune_frac", frac)
    _check_choice("select_neurons", threshold, frac, neither=True)
    _check_scores("importance", importance, one_dim=True)
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
    _same_shapes(sal, splits)
    union = {}
    for name in sal.fisher[splits[0]]:
        used = [s for s in splits if sal.batches[s] and reaches(s, name)]
        total = sum(sal.batches[s] for s in used)
        union[name] = sum((sal.fisher[s][name] * sal.batches[s] for s in used),
                          torch.zeros_like(sal.fisher[splits[0]][name])) / max(total, 1)
    return union


def _same_shapes(sal: Saliency, splits) -> None:
    """Every split's Fisher holds the first split's parameters, each of the same shape."""
    first = sal.fisher[splits[0]]
    for s in splits[1:]:
        for name, f in first.items():
            theirs = sal.fisher[s].get(name)
            if theirs is None or theirs.shape != f.shape:
                raise ValueError(f"saliency: Fisher of {name!r} is {'missing' if theirs is None else list(theirs.shape)}"
                                 f" in split {s}, {list(f.shape)} in {splits[0]}")


def union_splits(sal: Saliency, reaches, splits=REST) -> dict[str, list[str]]:
    """Which splits the union averages, per parameter (for the log and report.json)."""
    return {name: [s for s in splits if sal.batches[s] and reaches(s, name)] for name in sal.fisher[splits[0]]}


def fisher_mask(sal: Saliency, reaches, threshold: float | None = 1.0, frac: float | None = None,
                eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """m = R >= d_F with R = F_fvqa / (F_{fqa∪rvqa∪rqa} + eps); or exactly the global top `frac` of R's entries
    (ties at the cut broken by position: many ratios are exactly 0, and a cut by value would take them all)."""
    check_fraction("mask_frac", frac)
    _check_choice("fisher_mask", None if frac is not None else threshold, frac)
    _same_shapes(sal, ("fvqa", *REST))
    rest = fisher_union(sal, reaches)
    ratio = {n: _ratio(f, rest[n], eps) for n, f in sal.fisher["fvqa"].items()}
    _check_scores("the Fisher ratio", ratio)
    if frac is None:
        return {n: r >= threshold for n, r in ratio.items()}
    return _top_of_all(ratio, frac)
