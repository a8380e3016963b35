"""Fisher diagonal accumulation: F += scale·g² in fp32, one fused read-modify-write per tensor."""
import torch
import triton
import triton.language as tl


@triton.jit
def _fisher_kernel(f_ptr, g_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=ok, other=0.0)
    tl.store(f_ptr + offs, f + scale * g * g, mask=ok)


def fisher_accumulate_flat_(fisher: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> None:
    """One launch over flat buffers: fisher [N] fp32 += scale·grad² (grad [N], any float dtype)."""
    n = fisher.numel()
    block = 4096 if fisher.is_cuda else 1024
    _fisher_kernel[(triton.cdiv(n, block),)](fisher, grad, n, float(scale), BLOCK=block, num_warps=8)


def fisher_accumulate_(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float = 1.0) -> None:
    """fisher[i] += scale·grads[i]², fisher fp32 (contiguous), grads any float dtype; one launch per tensor
    (a single launch when the caller passes flat buffers to `fisher_accumulate_flat_`)."""
    check(fisher, grads)
    for f, g in zip(fisher, grads):
        if f.numel():
            fisher_accumulate_flat_(f.view(-1), g.contiguous().view(-1), scale)


def check(fisher, grads) -> None:
    if len(fisher) != len(grads):
        raise ValueError(f"fisher_accumulate_: {len(fisher)} fisher tensors but {len(grads)} grads")
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if f.dtype != torch.float32 or not f.is_contiguous():
            raise TypeError(f"fisher_accumulate_: fisher[{i}] must be contiguous fp32, got {f.dtype}")
        if not g.is_floating_point():
            raise TypeError(f"fisher_accumulate_: grads[{i}] must be floating point, got {g.dtype}")
        if f.shape != g.shape or f.device != g.device:
            raise ValueError(f"fisher_accumulate_: fisher[{i}] {list(f.shape)} on {f.device} vs "
                             f"grads[{i}] {list(g.shape)} on {g.device}")
