"""Triton kernels vs their PyTorch reference path: achieved bandwidth, % of measured peak, speed-up, and
whole-collection overhead on a random-weight CLIP-L/14-336 vision tower.  python benchmarks/bench_kernels.py"""
import argparse
import json
import time

import torch

import surgery.kernels as K
from surgery.kernels import reference


def bench(fn, quick):
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100 if not quick else 20, return_mode="median") * 1e-3
    times = []
    for _ in range(3 if quick else 10):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_bandwidth(device):
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / bench(lambda: y.copy_(x), False)


def stats_case(name, shape, dtype, device, peak, quick):
    z = torch.randn(shape, device=device).to(dtype)
    moved = z.numel() * z.element_size() + 4 * shape[-1] * 4
    fast, ref = bench(lambda: K.activation_stats(z), quick), bench(lambda: reference.activation_stats(z), quick)
    return {"case": f"activation_stats {name}", "shape": list(shape), "dtype": str(dtype), "ms": fast * 1e3,
            "ref_ms": ref * 1e3, "GB/s": moved / fast / 1e9, "peak_%": 100 * moved / fast / peak, "speedup": ref / fast}


def clip_mlp_shapes(layers=24, d=1024, h=4096):
    return [s for _ in range(layers) for s in [(h, d), (h,), (d, h), (d,)]]


def fisher_case(dtype, device, peak, quick, layers):
    shapes = clip_mlp_shapes(layers)
    fisher = [torch.zeros(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    n = sum(f.numel() for f in fisher)
    moved = n * (8 + grads[0].element_size())
    fast = bench(lambda: K.fisher_accumulate_(fisher, grads, 0.5), quick)
    loop = bench(lambda: [f.add_(g.float() * g.float(), alpha=0.5) for f, g in zip(fisher, grads)], quick)
    g32 = [g.float() for g in grads]
    foreach = bench(lambda: torch._foreach_addcmul_(fisher, g32, g32, value=0.5), quick)
    return {"case": f"fisher_accumulate_ CLIP-L MLPs ({layers} layers)", "dtype": str(dtype), "elements": n,
            "ms": fast * 1e3, "ref_ms": loop * 1e3, "foreach_fp32_grads_ms": foreach * 1e3,
            "GB/s": moved / fast / 1e9, "peak_%": 100 * moved / fast / peak, "speedup": loop / fast}


def collection_overhead(device, dtype, batch, quick, use_kernels=True):
    """Plain forward+backward of a CLIP-L/14-336 tower vs the same with stats hooks and streaming Fisher."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    small = quick or device == "cpu"
    cfg = CLIPVisionConfig(hidden_size=1024 if not small else 64, intermediate_size=4096 if not small else 256,
                           num_hidden_layers=24 if not small else 2, num_attention_heads=16 if not small else 4,
                           image_size=336 if not small else 56, patch_size=14)
    model = CLIPVisionModel(cfg).to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    tower = getattr(model, "vision_model", model)
    mlps = [l.mlp for l in tower.encoder.layers]
    params = [p for m in mlps for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    stats = [torch.zeros(4, cfg.intermediate_size, device=device) for _ in mlps]
    fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    acc = K if use_kernels else reference

    def step():
        model(pixel_values=x).pooler_output.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    plain = bench(step, quick)
    def stats_hook(s):  # a pre-hook must return None, or its value replaces the module's input
        return lambda mod, a: (acc.activation_stats(a[0].detach(), out=s), None)[1]
    hooks = [m.fc2.register_forward_pre_hook(stats_hook(s)) for m, s in zip(mlps, stats)]
    def fisher_hook(p):
        acc.fisher_accumulate_([fisher[p]], [p.grad])
        p.grad = None
    hooks += [p.register_post_accumulate_grad_hook(fisher_hook) for p in params]
    with_stats = bench(step, quick)
    for h in hooks:
        h.remove()
    return {"case": f"collection overhead ({'kernels' if use_kernels else 'reference'})", "batch": batch,
            "dtype": str(dtype), "plain_ms": plain * 1e3, "collect_ms": with_stats * 1e3,
            "overhead_%": 100 * (with_stats / plain - 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    peak = peak_bandwidth(device) if cuda else float("nan")
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "peak_copy_GB/s": peak / 1e9}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    big = not args.quick and cuda
    rows = [stats_case("CLIP-L/14-336", (32, 577, 4096) if big else (2, 17, 256), dtype, device, peak, args.quick),
            stats_case("Qwen2-VL", (32 * 1024, 5120) if big else (40, 320), dtype, device, peak, args.quick),
            fisher_case(dtype, device, peak, args.quick, 24 if big else 1)]
    if cuda:
        rows.append(fisher_case(torch.float32, device, peak, args.quick, 24 if big else 1))
    rows += [collection_overhead(device, dtype, 16 if big else 2, args.quick, k) for k in (True, False)]
    print(json.dumps(env))
    for r in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
