"""MANU: Modality-Aware Neuron Unlearning (Liu et al., ACL 2025, arXiv 2502.15910), training-free: prune the MLP
neurons that matter far more to the forget data than to the retain data, scored separately per modality.

For a neuron n with post-activation output z (the input of the MLP's output projection), over the N tokens of a split
(padding excluded), from the statistics Σz, Σ|z|, Σz², count(z>0) of one streaming pass:

    I_abs = Σ|z|/N    I_freq = count(z>0)/N    I_var = sqrt(Σz²/N − (Σz/N)²)    I_rms = sqrt(Σz²/N)
    S(n)  = Σ_k w_k · (I_k(forget) / (I_k(retain) + eps) − 1)          k ∈ {abs, freq, var, rms}

and prune the top `--prune-frac` of neurons by S (or S ≥ --prune-threshold). Modality-aware: vision-MLP neurons are
scored on the image rows (fvqa against rvqa); when the scope reaches the language model, its MLP neurons are scored
on the text rows (fqa against rqa) and pruned the same way. Pruning a neuron zeroes its input-projection rows (and
bias) and its output-projection column.

Where MANU's released code differs, we follow the paper: all four functions with equal weights (the code's
incremental script weights them 2, 0, 2, 2: `--manu-weights`), I_freq counts z > 0 (the code counts |z| > 0.1),
I_var is the standard deviation over all tokens (the code's is over the batch at each position, averaged), no
padding enters a statistic (the code pads with zeros), and neurons are ranked per layer unless --prune-global
(the code ranks all layers of a modality together). Default scope `full`: MANU prunes the vision tower's MLPs and
the language model's.
"""
import logging
import math
import time

import torch
from safetensors.torch import save_file

from .. import kernels, ops
from ..prune import prune, pruned_entries
from ..saliency import batches, examples
from ..select import select_neurons
from .loop import Context, Method
from .vkd import saliency_of

log = logging.getLogger("surgery")
FUNCTIONS = ("abs", "freq", "var", "rms")


def importance(stats: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
    """The four importance functions of each neuron from its [4, H] statistics Σz, Σ|z|, Σz², count(z>0)."""
    n = max(tokens, 1)
    mean, mean_abs, mean_sq, freq = (s / n for s in stats.double())
    return {"abs": mean_abs, "freq": freq, "var": (mean_sq - mean**2).clamp(min=0).sqrt(), "rms": mean_sq.sqrt()}


def score(forget: dict, retain: dict, weights, eps: float) -> torch.Tensor:
    """S = Σ_k w_k · (I_k(forget) / (I_k(retain) + eps) − 1), per neuron."""
    return sum(w * (forget[k] / (retain[k] + eps) - 1) for k, w in zip(FUNCTIONS, weights)).float()


def language_mlps(adapter) -> dict[str, torch.nn.Module]:
    """The language model's MLPs (gate/up/down projections), by module path."""
    return {name: m for name, m in adapter.model.named_modules()
            if hasattr(m, "up_proj") and hasattr(m, "down_proj") and not adapter.is_vision(name + ".")}


@torch.no_grad()
def language_stats(adapter, mlps: dict, rows, batch_size: int) -> tuple[dict, int]:
    """Σz, Σ|z|, Σz², count(z>0) of each language-model MLP neuron over the non-padding tokens of `rows`, and the token
    count. z is the input of down_proj (act(gate(x)) · up(x))."""
    stats = {name: torch.zeros(4, m.down_proj.in_features, device=adapter.device) for name, m in mlps.items()}
    current, tokens = {}, 0

    def hook(name):
        def accumulate(module, args):     # returns None: a pre-hook's return value would replace the input
            kernels.activation_stats(args[0].detach(), out=stats[name], row_mask=current["mask"])
        return accumulate
    handles = [m.down_proj.register_forward_pre_hook(hook(name)) for name, m in mlps.items()]
    try:
        for chunk in batches(rows, batch_size):
            batch = adapter.encode(examples(chunk)).to(adapter.device)
            current["mask"] = batch.inputs["attention_mask"].bool()
            tokens += int(current["mask"].sum())
            adapter.model(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
    return stats, tokens


def prune_language(mlps: dict, neurons: dict[str, torch.Tensor]) -> None:
    for name, idx in neurons.items():
        if idx.numel():
            m = mlps[name]
            fc_in = [lin for lin in (getattr(m, "gate_proj", None), m.up_proj) if lin is not None]
            biases = [lin.bias for lin in fc_in]
            ops.prune_neurons_([lin.weight for lin in fc_in], biases if any(b is not None for b in biases) else None,
                               m.down_proj.weight, idx.to(m.down_proj.weight.device))


def vision_neurons(ctx: Context, weights, frac) -> tuple[dict, dict]:
    """Scores of the vision-MLP neurons in scope on the images (fvqa against rvqa), and the neurons to prune."""
    cfg = ctx.cfg
    sal = saliency_of(ctx, fisher=False)
    scores = {l: score(importance(sal.stats["fvqa"][l], sal.tokens["fvqa"][l]),
                       importance(sal.stats["rvqa"][l], sal.tokens["rvqa"][l]), weights, cfg.eps) for l in ctx.layers}
    return scores, select_neurons(scores, cfg.prune_threshold, frac, cfg.prune_per_layer)


def text_neurons(ctx: Context, mlps: dict, weights, frac) -> tuple[dict, dict]:
    """Scores of the language model's MLP neurons on the text rows (fqa against rqa), and the neurons to prune."""
    cfg = ctx.cfg
    (f_stats, f_tokens), (r_stats, r_tokens) = (language_stats(ctx.adapter, mlps, ctx.splits[s],
                                                               cfg.collect_batch_size) for s in ("fqa", "rqa"))
    scores = {n: score(importance(f_stats[n], f_tokens), importance(r_stats[n], r_tokens), weights, cfg.eps)
              for n in mlps}
    return scores, select_neurons(scores, cfg.prune_threshold, frac, cfg.prune_per_layer)


class MANU(Method):
    name = "manu"
    reads = ("prune_threshold", "prune_frac", "prune_per_layer", "saliency", "manu_weights")
    paper = "MANU: Modality-Aware Neuron Unlearning (Liu et al. 2025, arXiv 2502.15910)"
    default_scope = "full"
    defaults = {"schedule": "combined"}
    trains = False

    def prepare(self, ctx: Context) -> None:
        cfg, weights = ctx.cfg, tuple(ctx.cfg.manu_weights)
        if len(weights) != 4 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"--manu-weights must be four non-negative numbers (abs, freq, var, rms), not all zero; "
                             f"got {weights}")
        frac = None if cfg.prune_threshold is not None else cfg.prune_frac
        scores, neurons = vision_neurons(ctx, weights, frac)
        t = time.perf_counter()
        prune(ctx.adapter, neurons)
        ctx.pruned = pruned_entries(ctx.adapter, neurons, ctx.params)
        mlps = language_mlps(ctx.adapter) if ctx.reaches("fqa") else {}
        if mlps and ctx.splits.fqa and ctx.splits.rqa:
            text_scores, text = text_neurons(ctx, mlps, weights, frac)
            prune_language(mlps, text)
            scores, neurons = {**scores, **text_scores}, {**neurons, **text}
        elif mlps:
            log.info("manu: no forget or retain text rows: the language model's neurons are not scored")
        ctx.timings["select_prune_s"] = time.perf_counter() - t
        if ctx.out is not None:
            save_file({**{f"neurons.{k}": i.contiguous() for k, i in neurons.items()},
                       **{f"score.{k}": v.contiguous().cpu() for k, v in scores.items()}},
                      str(ctx.out / "masks.safetensors"))
        ctx.info["pruned_neurons"] = {str(k): int(i.numel()) for k, i in neurons.items()}
        ctx.info["manu_weights"] = dict(zip(FUNCTIONS, weights))
        log.info("manu: pruned %d neurons %s", sum(ctx.info["pruned_neurons"].values()), ctx.info["pruned_neurons"])


METHOD = MANU()
