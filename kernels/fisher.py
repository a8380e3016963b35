"""Fisher diagonal accumulation: F += scale·g² in fp32, one fused read-modify-write.

A list of tensors goes out in one launch per (device, grad dtype) group: a small int64 table gives, for every
tensor, its element offset from the group's first fisher / grad tensor, its length, and where its chunks end
in the grid; each program finds its tensor in that table and updates one chunk of it."""
import torch
import triton
import triton.language as tl

from . import checks

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def _fisher_flat_kernel(f_ptr, g_ptr, n, scale, BLOCK: tl.constexpr):
    """f[i] += scale·g[i]² for i in this program's block; f: fp32 [n], g: any float [n]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=ok, other=0.0)
    tl.store(f_ptr + offs, f + scale * (g * g), mask=ok)


@triton.jit
def _fisher_multi_kernel(f_base, g_base, table_ptr, n_tensors, scale, ALIGN: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, TBLOCK: tl.constexpr):
    """table: int64 [4, T] rows = fisher offsets from f_base, grad offsets from g_base (elements), lengths,
    cumulative chunk ends. Program p updates chunk p - ends[t-1] of tensor t = #{u : ends[u] <= p}.
    ALIGN: every offset and length is a multiple of it (16-byte vectors when it is 8)."""
    pid = tl.program_id(0)
    t = tl.full([], 0, tl.int32)
    for i in range(0, n_tensors, TBLOCK):
        idx = i + tl.arange(0, TBLOCK)
        ends = tl.load(table_ptr + 3 * n_tensors + idx, mask=idx < n_tensors, other=0)
        t += tl.sum(((ends <= pid) & (idx < n_tensors)).to(tl.int32), axis=0)
    f_off = tl.multiple_of(tl.load(table_ptr + t), ALIGN)
    g_off = tl.multiple_of(tl.load(table_ptr + n_tensors + t), ALIGN)
    n = tl.multiple_of(tl.load(table_ptr + 2 * n_tensors + t), ALIGN)
    first = tl.load(table_ptr + 3 * n_tensors + t - 1, mask=t > 0, other=0)
    start = (pid - first) * CHUNK
    for b in tl.static_range(CHUNK // BLOCK):  # independent tiles: the compiler can issue all loads first
        offs = start + b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(g_base + g_off + offs, mask=ok, other=0.0).to(tl.float32)
        f = tl.load(f_base + f_off + offs, mask=ok, other=0.0)
        tl.store(f_base + f_off + offs, f + scale * (g * g), mask=ok)


# GPU launch shapes (chosen on the H100 by `python benchmarks/bench_kernels.py --sweep`).
FLAT_CONFIG = dict(block=4096, num_warps=8)
MULTI_CONFIG = dict(block=4096, chunk_blocks=4, num_warps=8)
_tables: dict = {}  # (device, layout key) -> device table; a hit skips building and copying it


def _launch_flat(f: torch.Tensor, g: torch.Tensor, scale: float) -> None:
    """f: fp32 [N] contiguous, g: [N] contiguous."""
    n = f.numel()
    if n:
        block = FLAT_CONFIG["block"] if f.is_cuda else 1024
        _fisher_flat_kernel[(triton.cdiv(n, block),)](f, g, n, scale, BLOCK=block,
                                                      num_warps=FLAT_CONFIG["num_warps"])


def _launch_multi(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float) -> None:
    """One launch: fisher fp32 contiguous, grads contiguous, all of one dtype and on one device."""
    cfg = MULTI_CONFIG
    block = cfg["block"] if fisher[0].is_cuda else 256
    chunk = block * (cfg["chunk_blocks"] if fisher[0].is_cuda else 2)
    f_base, g_base = fisher[0], grads[0]
    fb, gb, gsize = f_base.data_ptr(), g_base.data_ptr(), g_base.element_size()
    key = (f_base.device, gsize, chunk, fb, gb, *[(f.data_ptr(), g.data_ptr(), f.numel()) for f, g in zip(fisher, grads)])
    table = _tables.get(key)
    if table is None:
        f_offs = [(f.data_ptr() - fb) // 4 for f in fisher]
        g_offs = [(g.data_ptr() - gb) // gsize for g in grads]
        numels = [f.numel() for f in fisher]
        ends, total = [], 0
        for n in numels:
            total += triton.cdiv(n, chunk)
            ends.append(total)
        vec = 16 // gsize  # elements per 16-byte grad vector (fp32 fisher vectors need 4, which divides it)
        align = vec if all(o % vec == 0 for o in f_offs + g_offs + numels) and fb % 16 == 0 and gb % 16 == 0 else 1
        host = torch.tensor([f_offs, g_offs, numels, ends], dtype=torch.int64)
        if f_base.is_cuda:
            host = host.pin_memory()
        table = (host.to(f_base.device, non_blocking=True), total, align, _overlapping(fisher))
        if len(_tables) >= 32:
            _tables.pop(next(iter(_tables)))
        _tables[key] = table
    dev_table, total, align, overlapping = table
    if overlapping:  # one launch would race on the shared entries; in order, each adds its term as the loop does
        for f, g in zip(fisher, grads):
            _launch_flat(f.view(-1), g.view(-1), scale)
    elif total:
        _fisher_multi_kernel[(total,)](f_base, g_base, dev_table, len(fisher), scale, ALIGN=align, CHUNK=chunk,
                                       BLOCK=block, TBLOCK=128, num_warps=cfg["num_warps"])


def _overlapping(fisher: list[torch.Tensor]) -> bool:
    """Whether two of the fisher tensors share memory (the same tensor listed twice, or overlapping views)."""
    spans = sorted((f.data_ptr(), f.data_ptr() + 4 * f.numel()) for f in fisher if f.numel())
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))


def fisher_accumulate_flat_(fisher: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> None:
    """One launch over flat buffers: fisher fp32 [N] (contiguous) += scale·grad² (grad [N], any float dtype).
    Use this when the gradients live in one flat buffer (e.g. views of a single allocation)."""
    checks.pair("fisher", fisher, "grad", grad)
    _launch_flat(fisher.view(-1), grad.contiguous().view(-1), float(scale))


def fisher_accumulate_(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float = 1.0) -> None:
    """fisher[i] += scale·grads[i]² in place, for every i. fisher[i]: fp32, contiguous; grads[i]: same shape and
    device, any float dtype (squared in fp32). One launch for a single pair, else one per (device, dtype) group."""
    checks.lists(fisher, grads)
    groups: dict = {}
    for i, (f, g) in enumerate(zip(fisher, grads)):
        # one cheap test per pair (this loop is most of the host time for ~100 tensors); details only on failure
        if not (type(f) is torch.Tensor and type(g) is torch.Tensor and f.dtype is torch.float32
                and g.dtype in _TL_DTYPE and f.is_contiguous() and f.shape == g.shape and f.device == g.device
                and not f.requires_grad):
            checks.pair(f"fisher[{i}]", f, f"grads[{i}]", g)
            if g.dtype not in _TL_DTYPE:
                g = g.float()
        fs, gs = groups.setdefault((f.device, g.dtype), ([], []))
        fs.append(f)
        gs.append(g if g.is_contiguous() else g.contiguous())
    scale = float(scale)
    for fs, gs in groups.values():
        if len(fs) == 1:
            _launch_flat(fs[0].view(-1), gs[0].view(-1), scale)
        else:
            _launch_multi(fs, gs, scale)
