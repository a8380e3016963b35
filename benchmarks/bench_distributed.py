"""Peak memory and step time of VKD unlearning on a random-weight LLaVA-1.5 or Qwen2-VL built from its config (nothing
is downloaded): the plain path, --checkpoint-llm, --checkpoint-vision, --offload-optimizer, under torchrun on >= 2
GPUs --shard-llm, and full-model GA_Diff as the baseline; side by side in one run.

    python benchmarks/bench_distributed.py --size 7b --device cuda --modes plain,checkpoint-llm,ga_diff
    python benchmarks/bench_distributed.py --arch qwen2-vl --size 7b --device cuda --modes plain,ga_diff
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --size 7b --device cuda \
        --modes plain,checkpoint-llm,shard-llm,shard-llm+checkpoint-llm
    python benchmarks/bench_distributed.py --size tiny     # a wiring check on the CPU, in seconds

Each mode rebuilds the model, runs VKD's prepare step (saliency, teacher features, pruning, Fisher mask) and the shared
training loop exactly as `surgery prune-and-mask` does (pipeline.prepare, VKD.prepare, methods.train; nothing is
saved); `ga_diff` does the same with GA_Diff on every weight (its default scope). Then it times --steps training steps after one warm-up step. Reported per mode: the peak memory of the training
steps (CUDA: max_memory_allocated on rank 0; CPU: peak RSS, which never goes down, so only the first mode's is the
mode's own), the mean step time, and both as ratios against the first mode. Rows: --rows image rows and half as
many text rows per side (forget, retain); global batch --batch-size.
"""
import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from surgery import distributed, methods, pipeline
from surgery.config import Config
from surgery.data import load_splits
from surgery.models import Adapter
from surgery.models.tiny import QWEN_SPECIAL, _image_processor
from surgery.models.tokenizer import LLAVA_TEMPLATE, QWEN_TEMPLATE, build_tokenizer

MODES = ("plain", "checkpoint-llm", "checkpoint-vision", "checkpoint-llm+checkpoint-vision", "offload-optimizer",
         "checkpoint-llm+checkpoint-vision+offload-optimizer", "shard-llm", "shard-llm+checkpoint-llm", "ga_diff")
ARCHS = ("llava", "qwen2-vl")


def llava_config(size: str, image_token: int):
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf config.json: CLIP ViT-L/14-336, 2-layer GELU projector,
    Llama-2-7B), or the same at toy size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    if size == "7b":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    else:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=64)
        text = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512)
    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=patches)


def qwen2_vl_config(size: str, tokenizer):
    """Qwen2-VL-7B's architecture (Qwen/Qwen2-VL-7B-Instruct config.json: a 32-block 1280-wide ViT with 2x2 patch
    merging, a 28-layer 3584-wide Qwen2 with grouped-query attention), or the same at toy size."""
    from transformers import Qwen2VLConfig
    if size == "7b":
        vision = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584}
        text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    else:
        vision = {"depth": 4, "embed_dim": 64, "mlp_ratio": 4, "num_heads": 4, "hidden_size": 64}
        text = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 512,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    return Qwen2VLConfig(vision_config={"in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                                        "temporal_patch_size": 2, "hidden_act": "quick_gelu", **vision},
                         text_config={"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                                      "eos_token_id": tokenizer.eos_token_id, **text},
                         image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], video_token_id=tokenizer.unk_token_id)


def image_side(arch: str, size: str) -> int:
    return 336 if size == "7b" else (32 if arch == "llava" else 56)


def build(arch: str, size: str, device: str, dtype: torch.dtype, seed: int) -> Adapter:
    """A random-weight LLaVA-1.5 or Qwen2-VL with an offline tokenizer and the family's image processor (seeded: the
    same on every rank)."""
    from transformers import (
        LlavaForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )
    side = image_side(arch, size)
    if arch == "llava":
        tokenizer = build_tokenizer(None, 1024, extra_special=["<image>"], chat_template=LLAVA_TEMPLATE)
        config, cls = llava_config(size, tokenizer.convert_tokens_to_ids("<image>")), LlavaForConditionalGeneration
        processor = _image_processor("CLIPImageProcessor", size={"shortest_edge": side},
                                     crop_size={"height": side, "width": side})
    else:
        tokenizer = build_tokenizer(None, 1024, extra_special=QWEN_SPECIAL, chat_template=QWEN_TEMPLATE)
        config, cls = qwen2_vl_config(size, tokenizer), Qwen2VLForConditionalGeneration
        processor = _image_processor("Qwen2VLImageProcessor", patch_size=14, merge_size=2, temporal_patch_size=2,
                                     min_pixels=side * side, max_pixels=side * side)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(default)
    return Adapter(model, tokenizer, processor, None)


def write_rows(folder: Path, n_image: int, side: int, seed: int) -> tuple[Path, Path]:
    """forget.jsonl and retain.jsonl: n_image rows with a random image and n_image // 2 without, each."""
    rng = np.random.default_rng(seed)
    files = []
    for side_name, prefix in (("forget", "f"), ("retain", "r")):
        lines = []
        for i in range(n_image):
            pixels = rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{prefix}{i}.png")
            lines.append({"question": "Who is the person in the image?", "answer": f"Person {prefix}{i}",
                          "image": f"{prefix}{i}.png"})
        lines += [{"question": f"Where does person {prefix}{i} live?", "answer": "Oslo"} for i in range(n_image // 2)]
        files.append(folder / f"{side_name}.jsonl")
        files[-1].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return files[0], files[1]


def _replay(trace: list[dict]):
    """After each event of an allocator trace: (index, event, the allocations made in the trace and live, the bytes
    allocated against the trace's start, the bytes freed of memory allocated before it). Allocated memory drops at
    free_requested (free_completed follows; alone, in a trace recorded without free_requested, it counts)."""
    live, now, earlier = {}, 0, 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif e["action"] == "free_requested" or (e["action"] == "free_completed" and e["addr"] in live):
            gone = live.pop(e["addr"], None)
            if gone is None:  # allocated before the recording
                earlier += e.get("size", 0)
            now -= e.get("size", 0) if gone is None else gone["size"]
        yield i, e, live, now, earlier


def live_at_peak(trace: list[dict], top: int, skip: str = str(Path(torch.__file__).parent)) -> dict:
    """Replay an allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]) to its highest point of allocated
    memory: the net change there against the trace's start (frees of memory allocated before the recording count
    too), what was freed of that earlier memory by then, and what was allocated during the trace and is live there,
    grouped by the innermost Python frame outside `skip` (torch's own files) that allocated it (none: the autograd
    engine's backward). (The 2026-12-04 runs skipped every path holding "/torch/", the device's whole venv
    /opt/torch/.venv with transformers in it: their places are our frames that called into transformers; and their
    peak was found without the earlier memory's frees, which came before it: the same event.)"""
    def place(frames):
        for f in frames:  # innermost first
            if not f["filename"].startswith(skip + "/"):
                return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
        return "(no Python frame: autograd backward)"
    peak, at, earlier_at_peak = 0, -1, 0
    for i, e, _, now, earlier in _replay(trace):
        if e["action"] == "alloc" and now > peak:
            peak, at, earlier_at_peak = now, i, earlier
    live = {}
    for _, _, live, _, _ in _replay(trace[:at + 1]):  # again, to the peak: what is live there
        pass
    groups = {}
    for e in live.values():
        key = place(e.get("frames", []))
        groups[key] = groups.get(key, 0) + e["size"]
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    return {"net_peak_bytes": peak, "earlier_freed_bytes": earlier_at_peak,
            "transient_peak_bytes": sum(groups.values()), "event": at, "events": len(trace),
            "by_place": [{"place": k, "bytes": v} for k, v in rows[:top]],
            "other_bytes": sum(v for _, v in rows[top:])}


def measure(mode: str, args, world: distributed.World, device: str, folder: Path) -> dict:
    """One mode: build, prepare as the pipeline does, then time the training steps."""
    forget, retain = write_rows(folder, args.rows, image_side(args.arch, args.size), seed=0)
    cfg = Config(model=f"random {args.arch} ({args.size})", forget=str(forget), retain=str(retain),
                 out=str(folder / "out"), device=device, seed=0, dtype=args.dtype, batch_size=args.batch_size,
                 collect_batch_size=args.batch_size, lr=1e-4, shard_llm="shard-llm" in mode,
                 checkpoint_llm="checkpoint-llm" in mode, checkpoint_vision="checkpoint-vision" in mode,
                 offload_optimizer="offload-optimizer" in mode,
                 method="ga_diff" if mode == "ga_diff" else "vkd")
    cfg, method = pipeline.resolve(cfg)
    splits = load_splits(cfg.forget, cfg.retain)
    adapter = build(args.arch, args.size, "cpu" if pipeline.shards_llm(cfg, world) else device, pipeline.resolve_dtype(cfg), cfg.seed)
    mlps = adapter.select_layers(None)
    params = adapter.scope_params(cfg.scope, mlps)
    adapter.train_only(params)
    pipeline.lay_out(cfg, adapter, world)
    cuda = device.startswith("cuda")
    held = {}  # bytes allocated after each stage (CUDA): where the peak's floor comes from
    if cuda:
        held["model"] = torch.cuda.memory_allocated(device)
    ctx = methods.Context(cfg, adapter, splits, params, [m.layer for m in mlps], world=world)
    method.prepare(ctx)
    if cuda:
        held["prepared"] = torch.cuda.memory_allocated(device)
    ctx.cfg = replace(cfg, steps=1)
    methods.train(ctx, method, progress=False)        # warm-up: one step (DDP is built here under torchrun)
    if cuda:
        torch.cuda.synchronize(device)
        held["after_warm_up_step"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ctx.cfg = replace(cfg, steps=args.steps)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])) if args.profile else contextlib.nullcontext()
    t = time.perf_counter()
    with profiler:
        history = methods.train(ctx, method, progress=False)
        if cuda:
            torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t) / args.steps
    if args.profile and world.main:  # where a step's time goes (the profiler's own overhead is in step_s)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"{mode}: top ops by {sort}, {args.steps} steps\n"
              + profiler.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)
    peak = torch.cuda.max_memory_allocated(device) if cuda else pipeline.peak_memory(device)["peak_rss_bytes"]
    breakdown = {}
    if args.memory_top and cuda:  # one more step, recorded (after the timing: recording slows allocation)
        ctx.cfg = replace(cfg, steps=1)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python", clear_history=True)
        try:
            methods.train(ctx, method, progress=False)
            torch.cuda.synchronize(device)
            snapshot = torch.cuda.memory._snapshot(device)
            breakdown = live_at_peak(snapshot["device_traces"][torch.device(device).index or 0], args.memory_top)
        except Exception as e:  # a diagnosis that fails must not cost the mode's measurement
            breakdown = {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        print(f"{mode}: allocated in the step and live at its peak (by place; net of what it freed of the memory held "
              f"before: {breakdown.get('net_peak_bytes', 0) / 1e9:.3f} GB):\n" + ("\n".join(
            f"  {r['bytes'] / 1e9:7.3f} GB  {r['place']}" for r in breakdown["by_place"])
            + f"\n  {breakdown['other_bytes'] / 1e9:7.3f} GB  (other)" if "by_place" in breakdown
            else f"  {breakdown['error']}"), file=sys.stderr)
    return {"mode": mode, "method": cfg.method, "scope": cfg.scope, "world_size": world.size, "peak_bytes": peak,
            "peak_kind": "cuda_max_allocated" if cuda else "rss (monotonic: only the first mode's is its own)",
            "step_s": step_s, "trainable_weights": sum(p.numel() for p in params.values()), "held_bytes": held,
            "live_at_peak": breakdown, "loss_last": {k: v for k, v in history[-1].items() if k.startswith("loss")}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=ARCHS, default="llava")
    parser.add_argument("--size", choices=["7b", "tiny"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK per rank)")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--modes", default="plain,checkpoint-llm")
    parser.add_argument("--rows", type=int, default=8, help="image rows per side (forget, retain)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the timed steps and print the top N ops (step times then include its overhead)")
    parser.add_argument("--memory-top", type=int, default=0, metavar="N",
                        help="CUDA: after the timing, record one more step's allocations and print the N places that "
                             "hold the most at its peak")
    args = parser.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes {','.join(bad)}: choose from {', '.join(MODES)}")
    results = []
    with distributed.launch(args.device) as (world, device):
        env = pipeline.environment(device)
        for mode in modes:
            if "shard-llm" in mode and world.size == 1:
                print(f"{mode}: skipped (sharding needs torchrun with >= 2 processes)", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory() as folder:
                try:
                    results.append(measure(mode, args, world, device, Path(folder)))
                except torch.OutOfMemoryError as e:  # a mode that does not fit is a result too ...
                    if world.size > 1:  # ... in one process: other ranks would wait in its collectives forever
                        raise
                    results.append({"mode": mode, "world_size": world.size, "error": str(e).splitlines()[0]})
            print(f"{mode}: {results[-1]}", file=sys.stderr, flush=True)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if args.json and world.main:  # after every mode: a run cut short keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "environment": env, "results": results}, indent=2))
    if not world.main:
        return
    base = next((r for r in results if "error" not in r), None)
    name = base["mode"] if base else "-"
    print(f"| mode | method (scope) | ranks | peak memory (GiB) | step (s) | memory vs {name} | step vs {name} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | | {r['world_size']} | {r['error'][:60]} | | | |")
            continue
        print(f"| {r['mode']} | {r['method']} ({r['scope']}) | {r['world_size']} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{r['step_s']:.3f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | {r['step_s'] / base['step_s']:.2f} |")
    print(f"{args.arch} {args.size}, batch {args.batch_size}, {args.steps} steps, {env.get('gpu', env['cpu'])}, "
          f"torch {env['torch']}, transformers {env['transformers']}", file=sys.stderr)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
