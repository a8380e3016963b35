"""Triton kernels for saliency collection (installed as `surgery.kernels`).

Which path a call takes: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference twin
(`surgery.kernels.reference`), except under TRITON_INTERPRET=1, where they run the Triton kernels through
Triton's interpreter (tests without a GPU; where that triton's interpreter cannot run them, `INTERPRETER_PROBLEM`
says why and CPU tensors take the reference path, with one warning). Triton decides at `import triton` whether
its functions are compiled or interpreted, so the variable must be set before triton is first imported;
`INTERPRET` says whether it was. Without triton everything takes the reference path (one warning when a CUDA tensor
arrives). `calls` counts the calls taken per path."""
import os
import warnings
from collections import Counter

import torch

from . import checks, reference

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

calls: Counter = Counter()  # "triton" / "reference": calls taken per path (tests check which path ran)
_warned = False


def _triton_interpreted() -> bool:
    """Whether triton's own @jit functions were defined for the interpreter (TRITON_INTERPRET=1 at its import)."""
    import triton.language.standard as std
    from triton.runtime.jit import JITFunction
    return not any(isinstance(v, JITFunction) for v in vars(std).values())


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why triton's interpreter cannot run our kernels (at these versions; default: the installed ones), or None.
    Before 3.7 it turns a 1-element array into a Python int (`range` over a runtime bound), which NumPy 2.4
    refuses (triton-lang/triton#9171)."""
    import numpy
    triton_version = triton_version or triton.__version__
    numpy_version = numpy_version or numpy.__version__

    def major_minor(text: str) -> tuple[int, int]:
        first, second = text.split("+")[0].split(".")[:2]
        return int(first), int("".join(c for c in second if c.isdigit()) or 0)

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter fails with numpy {numpy_version} (triton-lang/triton#9171): "
                "install triton>=3.7 or numpy<2.4 to run the kernels on CPU tensors")
    return None


INTERPRET = False
INTERPRETER_PROBLEM = None  # set when INTERPRET: why the interpreter cannot run the kernels (None: it can)
if HAS_TRITON:
    from . import activation_stats as _stats  # binds the name to the module; the def below rebinds it
    from . import fisher as _fisher
    if os.environ.get("TRITON_INTERPRET") == "1":
        INTERPRET = _triton_interpreted()
        if not INTERPRET:
            warnings.warn("TRITON_INTERPRET=1 was set after triton was imported: CPU tensors take the "
                          "PyTorch reference path of surgery.kernels", stacklevel=2)
        else:
            INTERPRETER_PROBLEM = interpreter_problem()


def use_triton(t) -> bool:
    """Whether a call on tensor `t` runs the Triton kernel (else the reference twin)."""
    global _warned
    if not isinstance(t, torch.Tensor):
        return False
    if not HAS_TRITON:
        if t.is_cuda and not _warned:
            warnings.warn("triton is not installed: surgery.kernels runs its PyTorch reference path", stacklevel=3)
            _warned = True
        return False
    if t.is_cuda:
        return True
    if not (INTERPRET and t.device.type == "cpu"):
        return False
    if INTERPRETER_PROBLEM:
        if not _warned:
            warnings.warn(f"{INTERPRETER_PROBLEM}; CPU tensors take the PyTorch reference path of surgery.kernels",
                          stacklevel=3)
            _warned = True
        return False
    return True


def activation_stats(z, out=None, row_mask=None):
    """z: [..., H] fp32/fp16/bf16 -> [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0), added into `out` when
    given (fp32 [4, H], same device; returned). row_mask: bool z.shape[:-1]; False rows are left out.
    One read of z, fp32 accumulation, deterministic (same bits on every run)."""
    if use_triton(z):
        calls["triton"] += 1
        result = _stats.activation_stats(z, out, row_mask)
        if out is not None:  # written behind autograd's back: tell it, as an in-place torch op does
            torch.autograd.graph.increment_version(out)
        return result
    checks.stats_args(z, out, row_mask)
    calls["reference"] += 1
    return reference.activation_stats(z, out, row_mask)


def fisher_accumulate_(fisher, grads, scale=1.0):
    """fisher[i] += scale·grads[i]² in place; fisher: list of fp32 contiguous tensors, grads: same shapes,
    any float dtype (squared in fp32). Few launches: one per (device, grad dtype) group."""
    checks.lists(fisher, grads)
    triton_path = [use_triton(f) for f in fisher]
    if len(fisher) and all(triton_path):  # the Triton module checks every pair before its first launch
        calls["triton"] += 1
        _fisher.fisher_accumulate_(fisher, grads, scale)
        return torch.autograd.graph.increment_version(fisher)  # written behind autograd's back
    for i, (f, g) in enumerate(zip(fisher, grads)):  # every pair checked before anything is written
        checks.pair(f"fisher[{i}]", f, f"grads[{i}]", g)
    if any(triton_path):  # a list across devices: the Triton part first, the rest on the reference path
        calls["triton"] += 1
        on = [i for i, t in enumerate(triton_path) if t]
        _fisher.fisher_accumulate_([fisher[i] for i in on], [grads[i] for i in on], scale)
        torch.autograd.graph.increment_version([fisher[i] for i in on])
        fisher, grads = zip(*[(f, g) for f, g, t in zip(fisher, grads, triton_path) if not t])
    calls["reference"] += 1
    return reference.fisher_accumulate_(list(fisher), list(grads), scale)


def fisher_accumulate_flat_(fisher, grad, scale=1.0):
    """fisher: fp32 [N] contiguous += scale·grad² (grad [N], any float dtype), one launch."""
    if use_triton(fisher):
        calls["triton"] += 1
        _fisher.fisher_accumulate_flat_(fisher, grad, scale)
        return torch.autograd.graph.increment_version(fisher)
    checks.pair("fisher", fisher, "grad", grad)
    calls["reference"] += 1
    return reference.fisher_accumulate_([fisher], [grad], scale)


__all__ = ["activation_stats", "fisher_accumulate_", "fisher_accumulate_flat_", "reference", "calls",
           "use_triton", "HAS_TRITON", "INTERPRET", "INTERPRETER_PROBLEM", "interpreter_problem"]
