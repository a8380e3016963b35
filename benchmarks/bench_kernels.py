"""Triton kernels vs their PyTorch reference path: achieved bandwidth, % of peak, speed-up, and the overhead
of whole saliency collection on a random-weight CLIP-L/14-336 vision tower.

    python benchmarks/bench_kernels.py [--json kernels.json] [--sweep]   # on a GPU
    python benchmarks/bench_kernels.py --quick                           # CPU smoke run (small shapes)

GPU times: `triton.testing.do_bench` medians (L2 flushed before every repetition). Bandwidth = bytes that must
move (each input read once, each output written once) / time. Peak = a 1 GiB device-to-device copy in the same
run, counting bytes read + written. The CLIP-L input (151 MB) is 3x the H100's 50 MB L2, the others larger than
4x; do_bench's flush keeps every repetition cold. Progress goes to stderr; the table and --json carry results."""
import argparse
import itertools
import json
import statistics
import sys
import time

import torch

import surgery.kernels as K
from surgery.kernels import reference

DATASHEET_GBS = {"H100": 3350.0, "H200": 4800.0}  # SXM, HBM3 / HBM3e


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bench(fn, quick=False, rep_ms=100):
    """Median seconds per call."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms if not quick else 20, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(3 if quick else 7):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_bandwidth():
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    x = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    return 2 * x.numel() / bench(lambda: torch.empty_like(x).copy_(x))


def row(case, shape, dtype, moved, fast, ref, peak, ref_name="reference", **extra):
    r = {"case": case, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "ms": fast * 1e3,
         "ref_ms": ref * 1e3, "ref": ref_name, "GB/s": moved / fast / 1e9, "speedup": ref / fast}
    if peak == peak:  # not NaN
        r["peak_%"] = 100 * moved / fast / peak
    r.update(extra)
    return r


def stats_case(name, shape, dtype, device, peak, quick):
    torch.manual_seed(0)
    z = torch.randn(shape, device=device).to(dtype)
    got, ref = K.activation_stats(z), reference.activation_stats(z)
    assert torch.equal(got[3], ref[3]) and torch.allclose(got[:3], ref[:3], rtol=1e-3, atol=1e-1), "wrong result"
    moved = z.numel() * z.element_size() + 4 * shape[-1] * 4
    fast = bench(lambda: K.activation_stats(z), quick)
    slow = bench(lambda: reference.activation_stats(z), quick)
    extra = {"input_MB": moved / 2**20}
    if torch.cuda.is_available():  # GPU time alone, without the host's per-call work (checks, allocation, launches)
        import triton.testing
        try:
            graph = triton.testing.do_bench_cudagraph(lambda: K.activation_stats(z), rep=100, return_mode="median")
            extra.update(graph_ms=graph, graph_GBs=moved / (graph * 1e-3) / 1e9)
            if peak == peak:
                extra["graph_peak_%"] = 100 * moved / (graph * 1e-3) / peak
        except Exception as e:  # noqa: BLE001 - a call that cannot be captured is a result too
            extra["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row(f"activation_stats {name}", list(shape), dtype, moved, fast, slow, peak, **extra)


def clip_mlp_shapes(layers, d=1024, h=4096):
    """fc1 weight + bias, fc2 weight + bias of every CLIP-L MLP."""
    return [s for _ in range(layers) for s in [(h, d), (h,), (d, h), (d,)]]


def fisher_cases(dtype, device, peak, quick, layers):
    torch.manual_seed(0)
    shapes = clip_mlp_shapes(layers) if not quick else clip_mlp_shapes(layers, d=64, h=256)
    fisher = [torch.rand(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    n = sum(f.numel() for f in fisher)
    moved = n * (8 + grads[0].element_size())
    expect = [f.clone() for f in fisher]
    reference.fisher_accumulate_(expect, grads, 0.5)
    K.fisher_accumulate_(fisher, grads, 0.5)
    assert all(torch.allclose(f, e, rtol=1e-5, atol=1e-6) for f, e in zip(fisher, expect)), "wrong result"
    fast = bench(lambda: K.fisher_accumulate_(fisher, grads, 0.5), quick)
    loop = bench(lambda: reference.fisher_accumulate_(fisher, grads, 0.5), quick)
    try:  # mixed fp32/bf16 lists: torch takes its per-tensor slow path
        foreach = bench(lambda: torch._foreach_addcmul_(fisher, grads, grads, value=0.5), quick)
    except RuntimeError:
        foreach = float("nan")
    g32 = [g.float() for g in grads] if dtype != torch.float32 else grads
    foreach32 = bench(lambda: torch._foreach_addcmul_(fisher, g32, g32, value=0.5), quick)
    del g32
    label = f"CLIP-L MLP params, {layers} layers, {len(shapes)} tensors"
    rows = [row(f"fisher_accumulate_ {label}", [n], dtype, moved, fast, loop, peak, "per-tensor loop",
                foreach_ms=foreach * 1e3, foreach_fp32_grads_ms=foreach32 * 1e3,
                speedup_vs_foreach=foreach / fast)]
    flat_f, flat_g = torch.rand(n, device=device), torch.randn(n, device=device).to(dtype)
    flat = bench(lambda: K.fisher_accumulate_flat_(flat_f, flat_g, 0.5), quick)
    rows.append(row("fisher_accumulate_flat_ (one flat buffer)", [n], dtype, moved, flat, loop, peak,
                    "per-tensor loop"))
    return rows


def collection_overhead(device, dtype, batch, quick):
    """Plain forward+backward of a CLIP-L/14-336 vision tower vs the same with activation-statistics pre-hooks
    on every fc2 and streaming Fisher (post-accumulate-grad hooks that fold p.grad in and free it), once with
    the Triton kernels and once with the reference path. One model for all runs."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    small = quick or device == "cpu"
    cfg = CLIPVisionConfig(hidden_size=64 if small else 1024, intermediate_size=256 if small else 4096,
                           num_hidden_layers=2 if small else 24, num_attention_heads=4 if small else 16,
                           image_size=56 if small else 336, patch_size=14)
    torch.manual_seed(0)
    model = CLIPVisionModel(cfg).to(device, dtype)
    model.requires_grad_(False)
    mlps = [layer.mlp for layer in getattr(model, "vision_model", model).encoder.layers]
    params = [p for m in mlps for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    stats = [torch.zeros(4, cfg.intermediate_size, device=device) for _ in mlps]
    fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    rep, rounds = (20, 1) if quick else (800, 5)

    def step():
        model(pixel_values=x).pooler_output.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    def with_hooks(acc):
        def stats_hook(s):  # the input of fc2 is the post-activation z; a pre-hook returning None keeps it
            def hook(module, args):
                acc.activation_stats(args[0].detach(), out=s)
            return hook

        def fisher_hook(p):
            acc.fisher_accumulate_([fisher[p]], [p.grad])
            p.grad = None

        hooks = [m.fc2.register_forward_pre_hook(stats_hook(s)) for m, s in zip(mlps, stats)]
        hooks += [p.register_post_accumulate_grad_hook(fisher_hook) for p in params]
        try:
            return bench(step, quick, rep_ms=rep)
        finally:
            for h in hooks:
                h.remove()

    # interleaved rounds (plain, kernels, reference, plain, ...), each figure the median over the rounds: a drift of
    # the clock or of the host during the run falls on all three alike (one plain run before and one after differed
    # by 1.7 % on an H200 on 2026-12-04, a third of the overhead measured)
    runs = {"plain": (None, []), "Triton kernels": (K, []), "reference path": (reference, [])}
    before = dict(K.calls)
    for _ in range(rounds):
        for acc, times in runs.values():
            times.append(bench(step, quick, rep_ms=rep) if acc is None else with_hooks(acc))
    paths = {k: v - before.get(k, 0) for k, v in K.calls.items()}  # the Triton hooks' calls by the path they took
    plain = runs["plain"][1]
    base = statistics.median(plain)
    return [{"case": f"collection overhead ({name})", "shape": [batch, 3, cfg.image_size, cfg.image_size],
             "layers": cfg.num_hidden_layers, "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
             "plain_ms": base * 1e3, "plain_range_ms": [min(plain) * 1e3, max(plain) * 1e3],
             "collect_ms": statistics.median(times) * 1e3, "collect_range_ms": [min(times) * 1e3, max(times) * 1e3],
             "overhead_%": 100 * (statistics.median(times) / base - 1), **({"paths": paths} if acc is K else {})}
            for name, (acc, times) in runs.items() if name != "plain"]


SWEEP_STATS = [  # block_h, block_r, unroll, num_stages, num_warps, programs_per_sm
    *[c + (pps,) for c in [(512, 8, 1, 3, 4), (512, 8, 1, 4, 4), (512, 4, 2, 3, 4), (256, 8, 2, 3, 4),
                           (256, 16, 1, 3, 8), (256, 8, 1, 4, 4), (1024, 4, 1, 3, 8), (512, 8, 1, 1, 4),
                           (512, 4, 2, 1, 4), (512, 4, 4, 1, 4), (256, 4, 4, 1, 4), (1024, 4, 2, 1, 8),
                           (256, 8, 2, 1, 4)] for pps in (2, 3, 4)],
    (256, 8, 1, 4, 4, 8), (256, 4, 4, 1, 4, 8), (512, 4, 2, 1, 4, 8), (256, 8, 2, 3, 4, 8)]
SWEEP_FINISH = [(1024, 1), (256, 8), (256, 16), (128, 8), (128, 16), (128, 32), (64, 32), (64, 64)]  # the finish


def sweep(peak):
    """Launch shapes for activation_stats (CLIP-L bf16: the finish first, then the partial kernel) and the
    multi-tensor Fisher kernel (bf16 grads)."""
    import triton.testing
    mod_s, mod_f = sys.modules["surgery.kernels.activation_stats"], sys.modules["surgery.kernels.fisher"]
    results = []
    z = torch.randn(32, 577, 4096, device="cuda").to(torch.bfloat16)
    ref = reference.activation_stats(z)
    saved = dict(mod_s.CUDA_CONFIG)
    shapes = [(f"stats finish block={fb} parts={fp}", dict(finish_block=fb, finish_parts=fp))
              for fb, fp in SWEEP_FINISH]
    shapes += [(f"stats bh={bh} br={br} unroll={un} stages={ns} warps={nw} pps={pps}",
                dict(block_h=bh, block_r=br, unroll=un, num_stages=ns, num_warps=nw, programs_per_sm=pps))
               for bh, br, un, ns, nw, pps in SWEEP_STATS]
    for name, update in shapes:
        mod_s.CUDA_CONFIG.clear()
        mod_s.CUDA_CONFIG.update(saved, **update)
        try:
            got = K.activation_stats(z)
            ok = torch.equal(got[3], ref[3]) and torch.allclose(got[:3], ref[:3], rtol=1e-3, atol=1e-1)
            t = bench(lambda: K.activation_stats(z), rep_ms=25)
            graph = (triton.testing.do_bench_cudagraph(lambda: K.activation_stats(z), rep=25, return_mode="median")
                     * 1e-3 if "finish_block" in update else None)
        except Exception as e:  # noqa: BLE001 - a launch shape that does not compile is a sweep result too
            log(name, "failed:", type(e).__name__, str(e)[:200])
            continue
        gbs = z.numel() * 2 / t / 1e9
        graph_gbs = None if graph is None else z.numel() * 2 / graph / 1e9
        results.append({"kernel": "activation_stats", "config": name, "GB/s": gbs, "peak_%": 100 * gbs * 1e9 / peak,
                        "correct": ok, **({} if graph_gbs is None else {"graph_GB/s": graph_gbs})})
        log(f"{name}: {gbs:.0f} GB/s ({100 * gbs * 1e9 / peak:.1f} % of peak) correct={ok}"
            + ("" if graph_gbs is None else f"; in a CUDA graph {graph_gbs:.0f} GB/s"))
    mod_s.CUDA_CONFIG.clear()
    mod_s.CUDA_CONFIG.update(saved)
    del z
    shapes = clip_mlp_shapes(24)
    fisher = [torch.rand(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    moved = sum(f.numel() for f in fisher) * 10
    saved = dict(mod_f.MULTI_CONFIG)
    for block, cb, nw in itertools.product((1024, 2048, 4096), (1, 4), (4, 8)):
        mod_f.MULTI_CONFIG.update(block=block, chunk_blocks=cb, num_warps=nw)
        t = bench(lambda: K.fisher_accumulate_(fisher, grads, 0.5), rep_ms=25)
        name = f"fisher multi block={block} chunk_blocks={cb} warps={nw}"
        results.append({"kernel": "fisher_accumulate_", "config": name, "GB/s": moved / t / 1e9,
                        "peak_%": 100 * moved / t / peak})
        log(f"{name}: {moved / t / 1e9:.0f} GB/s ({100 * moved / t / peak:.1f} % of peak)")
    mod_f.MULTI_CONFIG.clear()
    mod_f.MULTI_CONFIG.update(saved)
    return results


def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also time a set of launch shapes (GPU only)")
    ap.add_argument("--json", help="write environment and results to this path")
    ap.add_argument("--overhead-only", action="store_true", help="only the saliency collection's overhead")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "kernel_path": "triton" if K.use_triton(torch.empty(0, device=device)) else "reference"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    peak = float("nan")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["sms"], env["L2_MB"] = props.multi_processor_count, props.L2_cache_size / 2**20
        peak = peak_bandwidth()
        env["peak_copy_GB/s"] = peak / 1e9
        env["datasheet_GB/s"] = next((v for k, v in DATASHEET_GBS.items() if k in env["device"]), None)
        env["stats_config"] = sys.modules["surgery.kernels.activation_stats"].CUDA_CONFIG
        env["fisher_config"] = sys.modules["surgery.kernels.fisher"].MULTI_CONFIG
    log(json.dumps(env))
    big = cuda and not args.quick
    results = []
    stats_cases = [("CLIP-L/14-336 MLP", (32, 577, 4096) if big else (2, 17, 256)),
                   ("CLIP-L/14-336 MLP, batch 128", (128, 577, 4096) if big else (3, 17, 256)),
                   ("Qwen2-VL MLP", (32 * 1024, 5120) if big else (40, 320))]
    for name, shape in [] if args.overhead_only else stats_cases:
        results.append(stats_case(name, shape, dtype, device, peak, args.quick))
        log(results[-1])
    for g_dtype in [] if args.overhead_only else [torch.bfloat16, torch.float32] if cuda else [torch.float32]:
        results += fisher_cases(g_dtype, device, peak, args.quick, 24 if big else 2)
        log(results[-2:])
    if cuda:
        torch.cuda.empty_cache()
    overhead = collection_overhead(device, dtype, 16 if big else 2, args.quick)
    for o in overhead:
        log(o)
    swept = sweep(peak) if args.sweep and cuda else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results, "overhead": overhead, "sweep": swept}, f, indent=2)
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, kernels: {env['kernel_path']}"
          + (f", peak copy {peak / 1e9:.0f} GB/s (datasheet {env['datasheet_GB/s']})" if cuda else ""))
    cols = ["case", "shape", "dtype", "ms", "ref_ms", "ref", "GB/s", "peak_%", "speedup"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(fmt(r.get(c, "")) for c in cols))
        if "graph_ms" in r:
            print(f"   in a CUDA graph (GPU time alone): {fmt(r['graph_ms'])} ms, {r['graph_GBs']:.0f} GB/s"
                  + (f", {r['graph_peak_%']:.1f} % of peak" if "graph_peak_%" in r else ""))
        if "foreach_ms" in r:
            print(f"   _foreach_addcmul_: {fmt(r['foreach_ms'])} ms as given, {fmt(r['foreach_fp32_grads_ms'])} ms "
                  f"on fp32 grads (conversion not timed); kernel vs foreach: {fmt(r['speedup_vs_foreach'])}x")
    for o in overhead:
        print(f"{o['case']}, median of {o['rounds']} interleaved rounds: plain {o['plain_ms']:.2f} ms "
              f"({o['plain_range_ms'][0]:.2f}-{o['plain_range_ms'][1]:.2f}), "
              f"with stats + Fisher {o['collect_ms']:.2f} ms, overhead {o['overhead_%']:.1f} %")
    if swept:
        best = {k: max((s for s in swept if s["kernel"] == k), key=lambda s: s["GB/s"]) for k in
                ("activation_stats", "fisher_accumulate_")}
        for b in best.values():
            print(f"sweep best: {b['config']}: {b['GB/s']:.0f} GB/s ({b['peak_%']:.1f} %)")


if __name__ == "__main__":
    main()
