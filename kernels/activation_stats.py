"""Fused per-neuron activation statistics: one read of z -> Σz, Σ|z|, Σz², count(z>0) in fp32.

Deterministic two-stage reduction, no atomics: stage 1 reduces a block of rows × a block of columns per
program into partials [row_blocks, 4, H]; stage 2 sums the partials over row blocks in a fixed order and
writes (or adds into) the [4, H] result. The launch shape is fixed per device kind (no autotuning), so the
same input gives the same bits on every run."""
import math

import torch
import triton
import triton.language as tl

from . import checks


@triton.jit
def _stats_partial_kernel(z_ptr, mask_ptr, part_ptr, n_rows, H, stride_row, rows_per_prog,
                          HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                          UNROLL: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (r, h): rows [r·rows_per_prog, +rows_per_prog) × columns [h·BLOCK_H, +BLOCK_H) -> part[r, :, cols].
    Each loop step loads UNROLL·BLOCK_R rows at once and folds them into [BLOCK_R, BLOCK_H] accumulators."""
    pid_r, pid_h = tl.program_id(0), tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    # 2-D accumulators: the loop body is element-wise (the UNROLL fold stays inside each thread); rows are
    # reduced across threads once, after the loop. Reducing across rows inside the loop costs a
    # shared-memory round trip and two barriers per tile, which stalled the loads of the first version.
    s1 = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    s_abs = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    pos = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    row_start = pid_r * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    # NUM_STAGES > 1: software-pipelined loop (asynchronous copies of the next tiles while this one is summed)
    for r0 in tl.range(row_start, row_end, BLOCK_R * UNROLL, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_R * UNROLL)
        row_ok = rows < row_end
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :], mask=ok, other=0.0)
        z = tl.reshape(z.to(tl.float32), (UNROLL, BLOCK_R, BLOCK_H))
        s1 += tl.sum(z, axis=0)
        s_abs += tl.sum(tl.abs(z), axis=0)
        s2 += tl.sum(z * z, axis=0)
        pos += tl.sum((z > 0).to(tl.float32), axis=0)
    base = part_ptr + pid_r.to(tl.int64) * 4 * H + cols
    tl.store(base, tl.sum(s1, axis=0), mask=col_ok)
    tl.store(base + H, tl.sum(s_abs, axis=0), mask=col_ok)
    tl.store(base + 2 * H, tl.sum(s2, axis=0), mask=col_ok)
    tl.store(base + 3 * H, tl.sum(pos, axis=0), mask=col_ok)


@triton.jit
def _stats_finish_kernel(part_ptr, out_ptr, n_parts, n_out, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
                         PARTS: tl.constexpr):
    """out[j] (+)= Σ_p part[p, j] for j in this program's block. Each step loads PARTS partials at once (their
    loads in flight together, not one L2 round trip per partial) and sums them as a tree; steps add in order:
    a fixed order, so the same bits on every run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, n_parts, PARTS):
        parts = p0 + tl.arange(0, PARTS)
        tile = tl.load(part_ptr + parts[:, None].to(tl.int64) * n_out + offs[None, :],
                       mask=(parts[:, None] < n_parts) & ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    if ACCUMULATE:
        acc += tl.load(out_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


# GPU launch shape: columns and rows per tile, tiles folded per loop step, software-pipeline depth (cp.async
# stages), programs per SM, warps per program. 168 registers per thread at this shape (sm_90, Triton 3.9):
# 3 programs of 4 warps fit on an SM; two tiles (16 KB) in flight per program. The finish: finish_block columns
# per program, finish_parts partials per step. On an H200 (2026-12-04, CLIP-L 32x577x4096 bf16, in a CUDA graph, one
# run): 2761 GB/s with the first version's 1024 and 1 (16 programs, each waiting on 49 loads one after another),
# 3052 GB/s at 128 and 16, 3143 and 3160 GB/s at 64 and 32 or 64 (a tie within one run's noise; 64 and 64 taken).
# `python benchmarks/bench_kernels.py --sweep` times the alternatives.
CUDA_CONFIG = dict(block_h=512, block_r=8, unroll=1, num_stages=3, programs_per_sm=3, num_warps=4,
                   finish_block=64, finish_parts=64)
# The interpreter runs programs one after another in Python: few, wide programs (still more than one row
# block, so the two-stage path is exercised).
INTERPRETER_CONFIG = dict(block_h=128, block_r=8, unroll=2, num_stages=1, row_blocks=3, num_warps=4,
                          finish_block=1024, finish_parts=2)


def _launch(z2: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """z2: [N, H], unit column stride; mask: int8 [N] or None; out: fp32 [4, H] or None -> [4, H] fp32."""
    n, h = z2.shape
    accumulate = out is not None
    if not accumulate:
        out = torch.empty((4, h), device=z2.device, dtype=torch.float32)
    if h == 0:
        return out
    if z2.is_cuda:
        cfg = CUDA_CONFIG
        block_h = min(cfg["block_h"], triton.next_power_of_2(h))
        col_blocks = triton.cdiv(h, block_h)
        # one full wave: programs_per_sm is how many programs fit on an SM at once (registers), and rounding
        # down keeps a few leftover programs from running alone in a second wave
        slots = cfg["programs_per_sm"] * torch.cuda.get_device_properties(z2.device).multi_processor_count
        row_blocks = min(triton.cdiv(n, cfg["block_r"] * cfg["unroll"]), slots // col_blocks)
    else:
        cfg = INTERPRETER_CONFIG
        block_h = min(cfg["block_h"], triton.next_power_of_2(h))
        col_blocks = triton.cdiv(h, block_h)
        row_blocks = min(cfg["row_blocks"], triton.cdiv(n, cfg["block_r"] * cfg["unroll"]))
    row_blocks = max(row_blocks, 1)
    partial = torch.empty((row_blocks, 4, h), device=z2.device, dtype=torch.float32)
    _stats_partial_kernel[(row_blocks, col_blocks)](
        z2, z2 if mask is None else mask, partial, n, h, z2.stride(0), triton.cdiv(n, row_blocks),
        HAS_MASK=mask is not None, BLOCK_R=cfg["block_r"], BLOCK_H=block_h, UNROLL=cfg["unroll"],
        NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])
    block = cfg["finish_block"]
    _stats_finish_kernel[(triton.cdiv(4 * h, block),)](partial, out, row_blocks, 4 * h, ACCUMULATE=accumulate,
                                                       BLOCK=block, PARTS=cfg["finish_parts"], num_warps=4)
    return out


def rows_view(z: torch.Tensor) -> torch.Tensor:
    """z: [..., H] as [N, H] with unit column stride; no copy when the leading dims flatten to one row stride."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    shape = (math.prod(z.shape[:-1]), z.shape[-1])  # explicit: -1 is ambiguous when H is 0
    try:
        return z.view(shape)
    except RuntimeError:  # leading dims not flattenable to one stride
        return z.reshape(shape)


def activation_stats(z: torch.Tensor, out: torch.Tensor | None = None,
                     row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """z: [..., H] fp32/fp16/bf16 -> [4, H] fp32 rows Σz, Σ|z|, Σz², count(z>0); added into `out` when given
    (then `out` is returned). row_mask: bool, shape z.shape[:-1]; rows where it is False are left out."""
    checks.stats_args(z, out, row_mask)
    mask = None if row_mask is None else row_mask.reshape(-1).contiguous().view(torch.int8)
    return _launch(rows_view(z), mask, out)

