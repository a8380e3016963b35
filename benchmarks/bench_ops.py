"""masked_adamw_ / sparse_adamw_ / prune_neurons_ vs the reference twin and torch's AdamW + masking.
python benchmarks/bench_ops.py [--device cuda] [--quick] [--json PATH]"""
import argparse
import json
import time

import torch

import surgery.ops as ops
from surgery.ops import reference

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def bench(fn, device, reps):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def adamw_rows(device, total, density, reps):
    n_t = 12
    shape = (total // n_t,)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=g).to(device) for _ in range(n_t)]
    grads = [torch.randn(shape, generator=g).to(device) for _ in range(n_t)]
    masks = [(torch.rand(shape, generator=g) < density).to(device) for _ in range(n_t)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    idx = [torch.nonzero(k).flatten().int() for k in masks]
    cm = [torch.zeros(i.numel(), device=device) for i in idx]
    cv = [torch.zeros(i.numel(), device=device) for i in idx]
    dense = bench(lambda: ops.masked_adamw_(params, grads, m, v, masks, step=3, **HP), device, reps)
    compact = bench(lambda: ops.sparse_adamw_(params, grads, cm, cv, idx, step=3, **HP), device, reps)
    ref = bench(lambda: reference.masked_adamw_(params, grads, m, v, masks, step=3, **HP), device, reps)
    tp = [p.clone().requires_grad_(True) for p in params]
    for p, gr in zip(tp, grads):
        p.grad = gr
    kw = {"fused": True} if device == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(tp, lr=1e-3, weight_decay=0.01, **kw)
    saved = [p.detach().clone() for p in tp]

    def torch_masked():  # torch's AdamW, then restore the masked-out entries
        opt.step()
        with torch.no_grad():
            for p, s, k in zip(tp, saved, masks):
                torch.where(k, p, s, out=p)
    baseline = bench(torch_masked, device, reps)
    moved = total * (4 * 2 + 4 + 4 * 2 + 4 * 2 + 1)  # p rw, g r, m rw, v rw, mask r
    row = {"density": density, "params": total, "dense_ms": dense * 1e3, "compact_ms": compact * 1e3,
           "reference_ms": ref * 1e3, f"torch_adamw_{'fused' if device == 'cuda' else 'foreach'}+mask_ms": baseline * 1e3,
           "dense_vs_reference": ref / dense, "dense_vs_torch+mask": baseline / dense,
           "dense_GB/s": moved / dense / 1e9, "state_bytes_dense": total * 9,
           "state_bytes_compact": sum(i.numel() for i in idx) * 12}
    return row


def prune_row(device, reps):
    fc1, b, fc2 = torch.randn(4096, 1024, device=device), torch.randn(4096, device=device), torch.randn(1024, 4096, device=device)
    neurons = torch.randperm(4096, device=device)[:1229]
    fast = bench(lambda: ops.prune_neurons_(fc1, b, fc2, neurons), device, reps)
    ref = bench(lambda: reference.prune_neurons_(fc1, b, fc2, neurons), device, reps)
    return {"case": "prune_neurons_ CLIP-L layer, 30% neurons", "ms": fast * 1e3, "reference_ms": ref * 1e3,
            "speedup": ref / fast}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    total = 1_200_000 if a.quick else 50_331_648
    reps = 3 if a.quick else 7
    env = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "backend": ops.backend(a.device), "threads": torch.get_num_threads()}
    if a.device == "cuda":
        x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
        env["peak_copy_GB/s"] = 2 * x.numel() / bench(lambda: y.copy_(x), "cuda", 1) / 1e9
        del x, y
    rows = [adamw_rows(a.device, total, d, reps) for d in (0.01, 0.1, 0.5)] + [prune_row(a.device, reps)]
    print(json.dumps(env))
    for r in rows:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
