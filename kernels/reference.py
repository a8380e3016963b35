"""Pure-PyTorch reference twins of the Triton kernels: same signatures, the definition of correct."""
import math

import torch


@torch.no_grad()  # statistics, never part of a graph (the Triton kernels are not either)
def activation_stats(z: torch.Tensor, out: torch.Tensor | None = None, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """z: [..., H] -> [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0); added into `out` when given.

    row_mask: bool, shape z.shape[:-1]; rows where it is False are left out (padding).
    """
    z2 = z.reshape(math.prod(z.shape[:-1]), z.shape[-1]).float()
    if row_mask is not None:
        z2 = z2[row_mask.reshape(-1)]
    stats = torch.stack([z2.sum(0), z2.abs().sum(0), (z2 * z2).sum(0), (z2 > 0).sum(0, dtype=torch.float32)])
    if out is None:
        return stats
    return out.add_(stats)


@torch.no_grad()
def fisher_accumulate_(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float = 1.0) -> None:
    """fisher[i] += scale * grads[i]**2, fisher fp32, grads any float dtype, squared in fp32."""
    for f, g in zip(fisher, grads, strict=True):
        f.add_(g.float().square(), alpha=scale)
