"""Triton kernels for saliency collection (installed as `surgery.kernels`)."""
from .reference import activation_stats, fisher_accumulate_

__all__ = ["activation_stats", "fisher_accumulate_"]
