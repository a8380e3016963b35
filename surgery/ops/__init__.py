"""In-place model edits and the masked optimizer step: thin wrappers over `torch.ops.surgery.*` (the
compiled extension `surgery._C`). Where the extension is missing, or was built without a kernel for the
tensors' device, the pure-PyTorch reference twin runs instead, with one warning."""
import warnings

import torch

from . import reference

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
    HAS_EXTENSION = True
except ImportError as e:
    HAS_EXTENSION, _IMPORT_ERROR = False, e

_warned: set = set()


def _key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device.type, device.type.upper())


def backend(device, op: str = "masked_adamw_") -> str:
    """'extension' if the compiled op has a kernel for `device`, else 'reference'."""
    device = torch.device(device)
    if HAS_EXTENSION and device.type in ("cpu", "cuda") and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"surgery::{op}", _key(device)):
        return "extension"
    return "reference"


def _compiled(op: str, device) -> bool:
    if backend(device, op) == "extension":
        return True
    if op not in _warned:
        _warned.add(op)
        why = f"surgery._C failed to import ({_IMPORT_ERROR})" if not HAS_EXTENSION else \
            f"surgery._C has no {_key(torch.device(device))} kernel for {op}"
        warnings.warn(f"{why}: running the PyTorch reference path for {op}", RuntimeWarning, stacklevel=3)
    return False


def prune_neurons_(fc_in, fc_in_bias, fc_out: torch.Tensor, neurons: torch.Tensor) -> None:
    """Zero rows `neurons` of each input projection [H, D] (a tensor, or a list for gated MLPs) and of its
    bias (tensor, list or None), and columns `neurons` of fc_out [D, H], in place."""
    fc_ins = list(fc_in) if isinstance(fc_in, (list, tuple)) else [fc_in]
    biases = [] if fc_in_bias is None else list(fc_in_bias) if isinstance(fc_in_bias, (list, tuple)) else [fc_in_bias]
    if any(b is None for b in biases):
        return reference.prune_neurons_(fc_in, fc_in_bias, fc_out, neurons)
    if not _compiled("prune_neurons_", fc_out.device):
        return reference.prune_neurons_(fc_in, fc_in_bias, fc_out, neurons)
    with torch.no_grad():
        torch.ops.surgery.prune_neurons_(fc_ins, biases, fc_out, reference.neuron_index(neurons, fc_out).contiguous())


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.AdamW's update where masks[i] is True; other entries (params and moments) untouched."""
    if not params:
        return
    if not _compiled("masked_adamw_", params[0].device):
        return reference.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, step=step, lr=lr, beta1=beta1,
                                       beta2=beta2, eps=eps, weight_decay=weight_decay)
    torch.ops.surgery.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, step, lr, beta1, beta2, eps,
                                    weight_decay)


def sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, indices, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """masked_adamw_ with compact state addressed by int32 flat `indices` (state fp32 [nnz]). Indices must be
    strictly increasing, as when built from a mask (`torch.nonzero(mask.flatten())`), so no two updates land on
    one entry; order and range are checked before anything is written."""
    if not params:
        return
    if not _compiled("sparse_adamw_", params[0].device):
        return reference.sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, indices, step=step, lr=lr, beta1=beta1,
                                       beta2=beta2, eps=eps, weight_decay=weight_decay)
    torch.ops.surgery.sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, indices, step, lr, beta1, beta2, eps,
                                    weight_decay)


__all__ = ["prune_neurons_", "masked_adamw_", "sparse_adamw_", "backend", "HAS_EXTENSION", "reference"]
