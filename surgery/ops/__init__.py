"""In-place model edits and the masked optimizer step: thin wrappers over `torch.ops.surgery.*` (the
compiled extension `surgery._C`). Where the extension is missing, or was built without a kernel for the
tensors' device, the pure-PyTorch reference twin runs instead, with one warning."""
import warnings

import torch

from . import checks, reference

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
    HAS_EXTENSION = True
except ImportError as e:
    HAS_EXTENSION, _IMPORT_ERROR = False, e

_warned: set = set()
OPS = ("prune_neurons_", "masked_adamw_", "sparse_adamw_")
# (op, dispatch key) -> whether _C has a kernel: looked up once, so that the wrappers trace under torch.compile
_KERNELS = {(op, key): HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"surgery::{op}", key)
            for op in OPS for key in ("CPU", "CUDA")}


def _key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())


def backend(device, op: str = "masked_adamw_") -> str:
    """'extension' if the compiled op has a kernel for `device`, else 'reference'."""
    return "extension" if _KERNELS.get((op, _key(torch.device(device))), False) else "reference"


def _compiled(op: str, device, stacklevel: int = 3) -> bool:
    if backend(device, op) == "extension":
        return True
    if op not in _warned:
        _warned.add(op)
        why = f"surgery._C failed to import ({_IMPORT_ERROR})" if not HAS_EXTENSION else \
            f"surgery._C has no {_key(torch.device(device))} kernel for {op}"
        warnings.warn(f"{why}: running the PyTorch reference path for {op}", RuntimeWarning, stacklevel=stacklevel)
    return False


def prune_neurons_(fc_in, fc_in_bias, fc_out: torch.Tensor, neurons: torch.Tensor) -> None:
    """Zero rows `neurons` of each input projection [H, D] (a tensor, or a list for gated MLPs) and of its
    bias (tensor, list or None), and columns `neurons` of fc_out [D, H], in place."""
    fc_ins = list(fc_in) if isinstance(fc_in, (list, tuple)) else [fc_in]
    index = reference.neuron_index(neurons, fc_out)     # refuses a non-tensor fc_out and a mask, as the twin does
    biases = [] if fc_in_bias is None else list(fc_in_bias) if isinstance(fc_in_bias, (list, tuple)) else [fc_in_bias]
    if any(not isinstance(t, torch.Tensor) for t in fc_ins + biases):  # None biases, or a bad entry: the twin's
        return reference.prune_neurons_(fc_in, fc_in_bias, fc_out, neurons)   # checks name it
    if not _compiled("prune_neurons_", fc_out.device):
        return reference.prune_neurons_(fc_in, fc_in_bias, fc_out, neurons)
    with torch.no_grad():
        torch.ops.surgery.prune_neurons_(fc_ins, biases, fc_out, index.contiguous())


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.AdamW's update where masks[i] is True; other entries (params and moments) untouched."""
    _adamw("masked_adamw_", [params, grads, exp_avgs, exp_avg_sqs, masks], step, lr, beta1, beta2, eps, weight_decay)


def sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, indices, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """masked_adamw_ with compact state addressed by int32 flat `indices` (state fp32 [nnz]). Indices must be
    strictly increasing, as when built from a mask (`torch.nonzero(mask.flatten())`), so no two updates land on
    one entry; order and range are checked before anything is written."""
    _adamw("sparse_adamw_", [params, grads, exp_avgs, exp_avg_sqs, indices], step, lr, beta1, beta2, eps, weight_decay)


def _adamw(op: str, lists: list, step, lr, beta1, beta2, eps, weight_decay) -> None:
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "masks" if op == "masked_adamw_" else "indices")
    lists = [checks.tensor_list(op, name, x) for name, x in zip(names, lists)]  # tuples and generators too
    checks.entries(op, lists)   # before lists[0][0].device, and the dispatcher's own message
    if not lists[0]:  # nothing to dispatch on: the checks alone (lengths, step, betas)
        return checks.adamw(op, *lists, op == "masked_adamw_", step, beta1, beta2)
    if not _compiled(op, lists[0][0].device, stacklevel=4):  # the twin makes every check itself
        return getattr(reference, op)(*lists, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay)
    checks.step_and_betas(op, step, beta1, beta2)  # a float step: our message, not the dispatcher's
    getattr(torch.ops.surgery, op)(*lists, step, lr, beta1, beta2, eps, weight_decay)


__all__ = ["prune_neurons_", "masked_adamw_", "sparse_adamw_", "backend", "HAS_EXTENSION", "reference", "checks"]
