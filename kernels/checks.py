"""Argument checks of the public kernel functions, shared by the Triton path and the reference path (no triton
import here): a bad call raises TypeError / ValueError naming the argument, whichever path it would take."""
import torch


def stats_args(z, out, row_mask) -> None:
    """Raise TypeError / ValueError naming the bad argument."""
    if not isinstance(z, torch.Tensor) or z.dim() < 1:
        raise TypeError(f"activation_stats: z must be a tensor of shape [..., H], got {type(z).__name__}"
                        + (f" of shape {list(z.shape)}" if isinstance(z, torch.Tensor) else ""))
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"activation_stats: z must be fp32, fp16 or bf16, got {z.dtype}")
    h = z.shape[-1]
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
            raise TypeError(f"activation_stats: out must be an fp32 tensor [4, {h}], got "
                            f"{getattr(out, 'dtype', type(out).__name__)}")
        if tuple(out.shape) != (4, h) or not out.is_contiguous():
            raise ValueError(f"activation_stats: out must be a contiguous fp32 tensor [4, {h}], got "
                             f"shape {list(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
        if out.device != z.device:
            raise ValueError(f"activation_stats: out is on {out.device} but z is on {z.device}")
        written_leaf("activation_stats", "out", out)
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or row_mask.dtype != torch.bool:
            raise TypeError(f"activation_stats: row_mask must be a bool tensor {list(z.shape[:-1])}, got "
                            f"{getattr(row_mask, 'dtype', type(row_mask).__name__)}")
        if row_mask.shape != z.shape[:-1]:
            raise ValueError(f"activation_stats: row_mask must have shape z.shape[:-1] = {list(z.shape[:-1])}, "
                             f"got {list(row_mask.shape)}")
        if row_mask.device != z.device:
            raise ValueError(f"activation_stats: row_mask is on {row_mask.device} but z is on {z.device}")


def written_leaf(op: str, name: str, t: torch.Tensor) -> None:
    """Refuse to write in place into a leaf that requires grad while grad mode is on, as torch's in-place ops do."""
    if t.requires_grad and t.is_leaf and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: {name} is a leaf tensor that requires grad, and the op writes it in place; "
                           f"torch refuses that too (detach it, or call under torch.no_grad())")


def pair(fname: str, f, gname: str, g) -> None:
    """Raise TypeError / ValueError naming the bad argument."""
    if not isinstance(f, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(f"fisher_accumulate_: {fname} and {gname} must be tensors, got "
                        f"{type(f).__name__} and {type(g).__name__}")
    if f.dtype != torch.float32 or not f.is_contiguous():
        raise TypeError(f"fisher_accumulate_: {fname} must be a contiguous fp32 tensor, got {f.dtype}"
                        f"{'' if f.is_contiguous() else ' (not contiguous)'}")
    if not g.is_floating_point():
        raise TypeError(f"fisher_accumulate_: {gname} must be floating point, got {g.dtype}")
    if f.shape != g.shape:
        raise ValueError(f"fisher_accumulate_: {fname} has shape {list(f.shape)} but {gname} {list(g.shape)}")
    if f.device != g.device:
        raise ValueError(f"fisher_accumulate_: {fname} is on {f.device} but {gname} on {g.device}")
    written_leaf("fisher_accumulate_", fname, f)


def lists(fisher, grads) -> None:
    if not isinstance(fisher, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("fisher_accumulate_: fisher and grads must be lists of tensors")
    if len(fisher) != len(grads):
        raise ValueError(f"fisher_accumulate_: {len(fisher)} fisher tensors but {len(grads)} grads")

