"""Triton kernels for saliency collection (installed as `surgery.kernels`).

CUDA tensors run the Triton kernels; CPU tensors take the reference twin, except under
TRITON_INTERPRET=1 (set before this module is imported), where they run the Triton kernels too."""
import os
import warnings

from . import reference

try:
    from . import activation_stats as _stats
    from . import fisher as _fisher
    HAS_TRITON = True
except ImportError:  # no triton: everything takes the reference path
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_warned = False


def use_triton(t) -> bool:
    """Whether a call on tensor `t` runs the Triton kernel."""
    global _warned
    if t.is_cuda and not HAS_TRITON and not _warned:
        warnings.warn("triton is not installed: surgery.kernels runs its PyTorch reference path", stacklevel=3)
        _warned = True
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def activation_stats(z, out=None, row_mask=None):
    """z: [..., H] fp32/fp16/bf16 -> [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0); added into `out` if given.
    row_mask: bool z.shape[:-1], False rows excluded. Deterministic, fp32 accumulation."""
    if use_triton(z):
        return _stats.activation_stats(z, out, row_mask)
    return reference.activation_stats(z, out, row_mask)


def fisher_accumulate_(fisher, grads, scale=1.0):
    """fisher[i] += scale * grads[i]**2 (fisher fp32, grads any float dtype)."""
    if fisher and use_triton(fisher[0]):
        return _fisher.fisher_accumulate_(fisher, grads, scale)
    return reference.fisher_accumulate_(fisher, grads, scale)


__all__ = ["activation_stats", "fisher_accumulate_", "reference", "HAS_TRITON", "INTERPRET"]
