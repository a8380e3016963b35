"""Peak memory and step time of VKD unlearning on a random-weight LLaVA-1.5 built from its config (nothing is
downloaded): the plain path, --checkpoint-llm, and, under torchrun on >= 2 GPUs, --shard-llm; side by side in one run.

    python benchmarks/bench_distributed.py --size 7b --device cuda --json gpu_out/distributed.json
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --size 7b --device cuda \
        --modes plain,checkpoint-llm,shard-llm,shard-llm+checkpoint-llm
    python benchmarks/bench_distributed.py --size tiny     # a wiring check on the CPU, in seconds

Each mode rebuilds the model, runs VKD's prepare step (saliency, teacher features, pruning, Fisher mask) and the shared
training loop exactly as `surgery prune-and-mask` does (pipeline.prepare, VKD.prepare, methods.train; nothing is
saved), then times --steps training steps after one warm-up step. Reported per mode: the peak memory of the training
steps (CUDA: max_memory_allocated on rank 0; CPU: peak RSS, which never goes down, so only the first mode's is the
mode's own), the mean step time, and both as ratios against the first mode. Rows: --rows image rows and half as
many text rows per side (forget, retain); global batch --batch-size.
"""
import argparse
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

import surgery.pipeline as pipeline
from surgery import distributed, methods
from surgery.config import Config
from surgery.data import load_splits
from surgery.models import Adapter
from surgery.models.tiny import _image_processor
from surgery.models.tokenizer import LLAVA_TEMPLATE, build_tokenizer

MODES = ("plain", "checkpoint-llm", "shard-llm", "shard-llm+checkpoint-llm")


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


def build(size: str, device: str, dtype: torch.dtype, seed: int) -> Adapter:
    """A random-weight LLaVA-1.5 with an offline tokenizer and a CLIP image processor (seeded: the same on every
    rank)."""
    from transformers import LlavaForConditionalGeneration
    tokenizer = build_tokenizer(None, 1024, extra_special=["<image>"], chat_template=LLAVA_TEMPLATE)
    config = llava_config(size, tokenizer.convert_tokens_to_ids("<image>"))
    side = config.vision_config.image_size
    processor = _image_processor("CLIPImageProcessor", size={"shortest_edge": side},
                                 crop_size={"height": side, "width": side})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
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


def measure(mode: str, args, world: distributed.World, device: str, folder: Path) -> dict:
    """One mode: build, prepare as the pipeline does, then time the training steps."""
    side = 336 if args.size == "7b" else 32
    forget, retain = write_rows(folder, args.rows, side, seed=0)
    cfg = Config(model=f"random LLaVA-1.5 ({args.size})", forget=str(forget), retain=str(retain),
                 out=str(folder / "out"), device=device, seed=0, dtype=args.dtype, batch_size=args.batch_size,
                 collect_batch_size=args.batch_size, lr=1e-4, shard_llm="shard-llm" in mode,
                 checkpoint_llm="checkpoint-llm" in mode, method="vkd")
    cfg, method = pipeline.resolve(cfg)
    splits = load_splits(cfg.forget, cfg.retain)
    shard = cfg.shard_llm and world.size > 1
    adapter = build(args.size, "cpu" if shard else device, pipeline.resolve_dtype(cfg), cfg.seed)
    params = adapter.scope_params("mlp", adapter.select_layers(None))
    adapter.train_only(params)
    if shard:
        distributed.shard_llm(adapter, world, device)
    if cfg.checkpoint_llm:
        distributed.checkpoint_llm(adapter)
    cuda = device.startswith("cuda")
    ctx = methods.Context(cfg, adapter, splits, params, [m.layer for m in adapter.select_layers(None)], world=world)
    method.prepare(ctx)
    ctx.cfg = replace(cfg, steps=1)
    methods.train(ctx, method, progress=False)        # warm-up: one step (DDP is built here under torchrun)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ctx.cfg = replace(cfg, steps=args.steps)
    t = time.perf_counter()
    history = methods.train(ctx, method, progress=False)
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if cuda else pipeline.peak_memory(device)["rss_bytes"]
    return {"mode": mode, "world_size": world.size, "peak_bytes": peak, "peak_kind":
            "cuda_max_allocated" if cuda else "rss (monotonic: only the first mode's is its own)",
            "step_s": step_s, "trainable_weights": sum(p.numel() for p in params.values()),
            "loss_fvqa_last": history[-1].get("loss_fvqa")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["7b", "tiny"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK per rank)")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--modes", default="plain,checkpoint-llm")
    parser.add_argument("--rows", type=int, default=8, help="image rows per side (forget, retain)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes {','.join(bad)}: choose from {', '.join(MODES)}")
    results = []
    with distributed.launch(args.device) as (world, device):
        for mode in modes:
            if "shard-llm" in mode and world.size == 1:
                print(f"{mode}: skipped (sharding needs torchrun with >= 2 processes)", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory() as folder:
                results.append(measure(mode, args, world, device, Path(folder)))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if not world.main:
        return
    env = pipeline.environment(device)
    base = results[0] if results else None
    print(f"| mode | ranks | peak memory (GiB) | step (s) | memory vs {base['mode'] if base else '-'} | "
          f"step vs {base['mode'] if base else '-'} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['world_size']} | {r['peak_bytes'] / 2**30:.2f} | {r['step_s']:.3f} | "
              f"{r['peak_bytes'] / base['peak_bytes']:.2f} | {r['step_s'] / base['step_s']:.2f} |")
    print(f"size {args.size}, batch {args.batch_size}, {args.steps} steps, {env.get('gpu', env['cpu'])}, "
          f"torch {env['torch']}, transformers {env['transformers']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "environment": env,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
