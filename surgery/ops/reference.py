"""Pure-PyTorch reference twins of the C++/CUDA ops (DESIGN.md "Kernels and ops"): same signatures, and the same
argument checks (`checks`, a port of csrc/checks.h), made before anything is written."""
import torch

from . import checks


def prune_neurons_(fc_in, fc_in_bias, fc_out: torch.Tensor, neurons: torch.Tensor) -> None:
    """Zero rows `neurons` of every input projection (a tensor or a list: gated MLPs) and of its bias
    (a tensor, a list, or None), and columns `neurons` of `fc_out` [D, H], in place."""
    fc_ins = list(fc_in) if isinstance(fc_in, (list, tuple)) else [fc_in]
    # a bare bias is one bias (refused for a gated MLP's two projections, as by the op), not one per projection
    biases = list(fc_in_bias) if isinstance(fc_in_bias, (list, tuple)) else [] if fc_in_bias is None else [fc_in_bias]
    idx = neuron_index(neurons, fc_out)
    checks.prune(fc_ins, biases, fc_out, idx)
    with torch.no_grad():
        for w, b in zip(fc_ins, biases or [None] * len(fc_ins)):
            w[idx] = 0
            if b is not None:
                b[idx] = 0
        fc_out[:, idx] = 0


def neuron_index(neurons, fc_out: torch.Tensor) -> torch.Tensor:
    """`neurons` as int64 indices on fc_out's device; a bool mask or float values are refused, not cast (a cast
    would turn the mask [0, 0, 1] into the indices 0, 0, 1)."""
    if not isinstance(fc_out, torch.Tensor):
        raise TypeError(f"prune_neurons_: fc_out must be a tensor, got {type(fc_out).__name__}")
    if not isinstance(neurons, torch.Tensor) or neurons.dtype == torch.bool or neurons.is_floating_point() \
            or neurons.is_complex():
        raise TypeError(f"prune_neurons_: neurons must be an integer index tensor [n], got "
                        f"{getattr(neurons, 'dtype', type(neurons).__name__)} (for a bool mask, pass mask.nonzero())")
    return neurons.to(device=fc_out.device, dtype=torch.long)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, *, step: int, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float) -> None:
    """torch.optim.AdamW's update on the entries where mask is True; the rest (params and both moments)
    untouched. `step` is the new step count t >= 1. Math in fp32; params may be lower precision."""
    checks.adamw("masked_adamw_", params, grads, exp_avgs, exp_avg_sqs, masks, True, step, beta1, beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    with torch.no_grad():
        for p, g, m, v, mask in zip(params, grads, exp_avgs, exp_avg_sqs, masks, strict=True):
            pf, gf = p.float(), g.float()
            m_new = m.lerp(gf, 1 - beta1)
            v_new = v.mul(beta2).addcmul_(gf, gf, value=1 - beta2)
            denom = (v_new.sqrt() / bc2_sqrt).add_(eps)
            p_new = pf.mul(1 - lr * weight_decay).addcdiv_(m_new, denom, value=-lr / bc1)
            p.copy_(torch.where(mask, p_new, pf))
            m.copy_(torch.where(mask, m_new, m))
            v.copy_(torch.where(mask, v_new, v))


def sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, indices, *, step: int, lr: float, beta1: float,
                  beta2: float, eps: float, weight_decay: float) -> None:
    """masked_adamw_ with compact state: `indices[i]` (int32 [nnz]) are the flat positions of the masked
    entries of params[i]; exp_avgs[i] / exp_avg_sqs[i] are fp32 [nnz]. Other entries are untouched."""
    checks.adamw("sparse_adamw_", params, grads, exp_avgs, exp_avg_sqs, indices, False, step, beta1, beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    with torch.no_grad():
        for p, g, m, v, idx in zip(params, grads, exp_avgs, exp_avg_sqs, indices, strict=True):
            flat, idx = p.view(-1), idx.long()
            pf, gf = flat[idx].float(), g.reshape(-1)[idx].float()
            m.lerp_(gf, 1 - beta1)
            v.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            flat[idx] = pf.mul_(1 - lr * weight_decay).addcdiv_(m, denom, value=-lr / bc1).to(p.dtype)
