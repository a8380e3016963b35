import pytest
import torch

from surgery.saliency import Saliency
from surgery.select import fisher_mask, fisher_union, neuron_importance, select_neurons


def saliency(seed=0, H=6):
    g = torch.Generator().manual_seed(seed)
    sal = Saliency()
    for s, n in {"fvqa": 2, "fqa": 1, "rvqa": 3, "rqa": 2}.items():
        sal.stats[s] = {l: torch.rand(4, H, generator=g) * (s != "fqa") for l in (0, 1)}
        sal.tokens[s] = {l: 10 * (s != "fqa") for l in (0, 1)}
        sal.fisher[s] = {"w": torch.rand(3, 4, generator=g)}
        sal.batches[s] = n
    return sal


def test_importance_is_the_ratio_of_mean_abs_activations():
    sal = saliency()
    imp = neuron_importance(sal, [0, 1], eps=1e-8)
    for l in (0, 1):
        num = sal.stats["fvqa"][l][1] / 10
        den = sal.stats["rvqa"][l][1] / 10 + sal.stats["rqa"][l][1] / 10 + 1e-8
        torch.testing.assert_close(imp[l], num / den)


def test_select_by_threshold_and_by_fraction():
    imp = {0: torch.tensor([0.1, 5.0, 2.0]), 1: torch.tensor([3.0, 0.2, 9.0, 1.0])}
    assert {l: v.tolist() for l, v in select_neurons(imp, threshold=2.0).items()} == {0: [1, 2], 1: [0, 2]}
    top = select_neurons(imp, frac=3 / 7, per_layer=False)
    assert {l: v.tolist() for l, v in top.items()} == {0: [1], 1: [0, 2]}
    assert all(v.numel() == 0 for v in select_neurons(imp, frac=0.0).values())


def test_fraction_is_taken_per_layer_by_default():
    """A layer whose importances are all larger must not take every pruned neuron."""
    imp = {0: torch.tensor([50.0, 60.0, 70.0, 80.0]), 1: torch.tensor([0.1, 0.4, 0.3, 0.2])}
    assert {l: v.tolist() for l, v in select_neurons(imp, frac=0.5).items()} == {0: [2, 3], 1: [1, 2]}
    assert {l: v.tolist() for l, v in select_neurons(imp, frac=0.5, per_layer=False).items()} == {0: [0, 1, 2, 3],
                                                                                                  1: []}


def vision_only(split, name):
    """The LLM frozen, every weight a vision weight: only the image splits reach them."""
    return split in ("fvqa", "rvqa")


def test_fisher_union_averages_only_the_splits_that_reach_a_weight():
    sal = saliency()
    union = fisher_union(sal, vision_only)["w"]
    torch.testing.assert_close(union, sal.fisher["rvqa"]["w"])        # fqa and rqa batches are not counted
    everything = fisher_union(sal, lambda s, n: True)["w"]
    manual = (sal.fisher["fqa"]["w"] * 1 + sal.fisher["rvqa"]["w"] * 3 + sal.fisher["rqa"]["w"] * 2) / 6
    torch.testing.assert_close(everything, manual)
    ratio = sal.fisher["fvqa"]["w"] / (sal.fisher["rvqa"]["w"] + 1e-8)
    assert torch.equal(fisher_mask(sal, vision_only, threshold=1.0)["w"], ratio >= 1.0)
    top = fisher_mask(sal, vision_only, threshold=None, frac=0.25)["w"]
    assert int(top.sum()) == 3 and torch.equal(top, ratio >= ratio.flatten().topk(3).values.min())


def test_fisher_mask_fraction_takes_exactly_k_when_ratios_tie():
    """Most ratios are exactly 0 (weights the forget split never reaches): the top 50 % must be 50 % of the
    entries, every non-zero ratio first, then the zeros in position order, not every entry tied at the cut."""
    g = torch.Generator().manual_seed(3)
    sal = Saliency()
    forget = torch.zeros(10, 10)
    forget[:2] = torch.rand(2, 10, generator=g) + 0.1                      # 20 non-zero ratios
    for s, f in {"fvqa": forget, "fqa": torch.zeros(10, 10), "rvqa": torch.rand(10, 10, generator=g) + 0.1,
                 "rqa": torch.zeros(10, 10)}.items():
        sal.fisher[s] = {"w": f, "b": torch.zeros(5)}
        sal.batches[s] = 2
    mask = fisher_mask(sal, vision_only, threshold=None, frac=0.5)
    assert sum(int(m.sum()) for m in mask.values()) == 52                   # round(0.5 * 105)
    assert bool(mask["w"][:2].all())                                        # every non-zero ratio
    flat = torch.cat([mask["w"].flatten(), mask["b"]])
    assert flat.tolist() == [True] * 52 + [False] * 53                      # then the zeros, first positions first
    assert mask["w"].shape == (10, 10) and mask["b"].shape == (5,)


def test_fractions_outside_zero_one_are_refused():
    imp = {0: torch.tensor([0.1, 5.0, 2.0])}
    for bad in (1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="prune_frac"):
            select_neurons(imp, frac=bad)
        with pytest.raises(ValueError, match="mask_frac"):
            fisher_mask(saliency(), vision_only, threshold=None, frac=bad)


def test_nonsense_selections_are_refused_naming_the_argument():
    """NaN scores used to be taken first by a fraction and never by a threshold; a threshold with a fraction dropped
    the fraction; a 2-D importance gave indices of no neuron; Fisher of mismatched shapes broadcast."""
    import numpy as np
    nan = {0: torch.tensor([float("nan"), 1.0, 2.0, 0.5])}
    for kw in ({"frac": 0.25}, {"threshold": 0.0}):
        with pytest.raises(ValueError, match="importance of 0 is NaN at 1 of 4 entries \\(first at \\[0\\]\\)"):
            select_neurons(nan, **kw)
    imp = {0: torch.tensor([0.1, 5.0, 2.0, 0.3])}
    with pytest.raises(ValueError, match="not both"):
        select_neurons(imp, threshold=1.0, frac=0.5)
    assert select_neurons(imp, frac=np.float32(0.5))[0].tolist() == [1, 2]          # numpy numbers are numbers
    assert select_neurons(imp)[0].numel() == 0 and select_neurons({}, frac=0.5, per_layer=False) == {}
    with pytest.raises(ValueError, match="shape \\[2, 2\\]: expected one score per neuron"):
        select_neurons({0: torch.tensor([[0.1, 5.0], [3.0, 0.2]])}, frac=0.5)
    with pytest.raises(ValueError, match="neither given"):
        fisher_mask(saliency(), vision_only, threshold=None)
    sal = saliency()
    sal.fisher["rvqa"]["w"] = torch.rand(4)
    with pytest.raises(ValueError, match="Fisher of 'w' is \\[4\\] in split rvqa, \\[3, 4\\] in fvqa"):
        fisher_mask(sal, vision_only)
    sal = saliency()
    sal.fisher["fvqa"]["w"][1, 2] = float("nan")
    with pytest.raises(ValueError, match="the Fisher ratio of 'w' is NaN at 1 of 12 entries \\(first at \\[1, 2\\]\\)"):
        fisher_mask(sal, vision_only, threshold=None, frac=0.5)


def test_eps_zero_leaves_what_no_split_reaches_at_zero():
    """With eps = 0 a weight or neuron that no split reaches is 0 / 0: scored 0 (never selected by a positive
    threshold), not NaN (which the NaN check would refuse)."""
    sal = saliency()
    for s in sal.fisher:
        sal.fisher[s]["w"][0, 0] = 0.0
        sal.stats[s][0][1][2] = 0.0
    mask = fisher_mask(sal, vision_only, threshold=0.5, eps=0.0)
    assert not mask["w"][0, 0]
    imp = neuron_importance(sal, [0, 1], eps=0.0)
    assert imp[0][2] == 0 and not torch.isnan(imp[0]).any()
    assert fisher_mask(sal, vision_only, threshold=None, frac=0.5, eps=0.0)["w"].sum() == 6
