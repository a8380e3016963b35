"""Fused per-neuron activation statistics: one read of z -> Σz, Σ|z|, Σz², count(z>0) in fp32."""
import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(z_ptr, mask_ptr, part_ptr, n_rows, H, stride_row, rows_per_prog,
                  HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (r, h): rows [r·rows_per_prog, ...) × columns [h·BLOCK_H, ...) -> partial[r, 0:4, cols]."""
    pid_r, pid_h = tl.program_id(0), tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    s1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    s_abs = tl.zeros([BLOCK_H], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    pos = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = pid_r * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s1 += tl.sum(z, axis=0)
        s_abs += tl.sum(tl.abs(z), axis=0)
        s2 += tl.sum(z * z, axis=0)
        pos += tl.sum((z > 0).to(tl.float32), axis=0)
    base = part_ptr + pid_r * 4 * H + cols
    tl.store(base, s1, mask=col_ok)
    tl.store(base + H, s_abs, mask=col_ok)
    tl.store(base + 2 * H, s2, mask=col_ok)
    tl.store(base + 3 * H, pos, mask=col_ok)


# GPU launch shape: columns per program, rows per tile, programs per SM, warps (set from the sweep
# in benchmarks/sweep_activation_stats.py)
CUDA_CONFIG = dict(block_h=128, block_r=64, programs_per_sm=8, num_warps=4)


def _launch(z2: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """z2: [N, H] with unit column stride -> [4, H] fp32 (two stages: partials, then a fixed-order sum)."""
    n, h = z2.shape
    cfg = CUDA_CONFIG if z2.is_cuda else dict(block_h=128, block_r=16, programs_per_sm=0, num_warps=4)
    block_h = min(cfg["block_h"], triton.next_power_of_2(h))
    col_blocks = triton.cdiv(h, block_h)
    if z2.is_cuda:
        target = cfg["programs_per_sm"] * torch.cuda.get_device_properties(z2.device).multi_processor_count
        row_blocks = max(1, min(triton.cdiv(n, cfg["block_r"]), triton.cdiv(target, col_blocks)))
    else:  # the interpreter: few programs
        row_blocks = max(1, min(4, triton.cdiv(n, 16)))
    rows_per_prog = triton.cdiv(max(n, 1), row_blocks)
    partial = torch.empty((row_blocks, 4, h), device=z2.device, dtype=torch.float32)
    mask = row_mask if row_mask is not None else z2  # unused pointer when HAS_MASK is False
    _stats_kernel[(row_blocks, col_blocks)](z2, mask, partial, n, h, z2.stride(0), rows_per_prog,
                                            HAS_MASK=row_mask is not None, BLOCK_R=cfg["block_r"],
                                            BLOCK_H=block_h, num_warps=cfg["num_warps"])
    return partial.sum(0)


def rows_view(z: torch.Tensor) -> torch.Tensor:
    """z as [N, H] with unit column stride, without a copy when the leading dims flatten to one stride."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    try:
        return z.view(-1, z.shape[-1])
    except RuntimeError:
        return z.reshape(-1, z.shape[-1])


def activation_stats(z: torch.Tensor, out: torch.Tensor | None = None,
                     row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """z: [..., H] fp32/fp16/bf16 -> [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0), added into `out` if given.
    row_mask: bool [...] (z.shape[:-1]); False rows are left out. Deterministic: no atomics."""
    check(z, out, row_mask)
    stats = _launch(rows_view(z), None if row_mask is None else row_mask.reshape(-1).contiguous().to(torch.int8))
    return stats if out is None else out.add_(stats)


def check(z, out, row_mask) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() < 1:
        raise TypeError("activation_stats: z must be a tensor of shape [..., H]")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"activation_stats: z must be fp32, fp16 or bf16, got {z.dtype}")
    if out is not None and (out.shape != (4, z.shape[-1]) or out.dtype != torch.float32 or out.device != z.device):
        raise ValueError(f"activation_stats: out must be fp32 [4, {z.shape[-1]}] on {z.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    if row_mask is not None and (row_mask.shape != z.shape[:-1] or row_mask.dtype != torch.bool
                                 or row_mask.device != z.device):
        raise ValueError(f"activation_stats: row_mask must be bool {list(z.shape[:-1])} on {z.device}, "
                         f"got {row_mask.dtype} {list(row_mask.shape)} on {row_mask.device}")
