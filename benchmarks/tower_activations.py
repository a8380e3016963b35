"""What the vision tower keeps for backward, with and without --checkpoint-vision, at the published 7B models' tower
sizes (LLaVA-1.5-7B's CLIP ViT-L/14-336, Qwen2-VL-7B's 32-block ViT; random weights, nothing downloaded), counted on
the CPU: the activation memory per batch that `--checkpoint-vision` takes off a GPU run's peak.

    python benchmarks/tower_activations.py --arch qwen2-vl --images 4 --dtype bf16

The vision MLPs are trainable, everything else frozen (VKD's default scope). Counted: every tensor autograd saves for
backward that is not a weight (saved_tensors_hooks), and, when the blocks are checkpointed, the inputs each block
keeps instead (its hidden states; the position embeddings all blocks share), each storage once and whole. The shared
loop runs forward and backward one split at a time, so this is the tower's share of what one batch adds to a step's
peak. The same scalar loss on the tower's output is backpropagated both ways and the MLP gradients compared.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed import llava_config, qwen2_vl_config  # noqa: E402

from surgery.distributed import checkpoint_layers  # noqa: E402
from surgery.models.tiny import QWEN_SPECIAL  # noqa: E402
from surgery.models.tokenizer import QWEN_TEMPLATE, build_tokenizer  # noqa: E402


def tower(arch: str, dtype: torch.dtype):
    """The tower, its repeated blocks (LLaVA: the 23 whose output the projector reads), and a batch maker."""
    from transformers import CLIPVisionModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if arch == "llava":
            config = llava_config("7b", image_token=32000).vision_config
            model = CLIPVisionModel(config)
            layers = next(m for n, m in model.named_modules() if n.endswith("encoder.layers"))  # 5.23: no vision_model
            del layers[len(layers) - 1]                 # vision_feature_layer -2: the last block is never run
            side = config.image_size

            def run(n):
                return model(pixel_values=torch.randn(n, 3, side, side)).last_hidden_state
            return model, list(layers), run
        tokenizer = build_tokenizer(None, 1024, extra_special=QWEN_SPECIAL, chat_template=QWEN_TEMPLATE)
        config = qwen2_vl_config("7b", tokenizer).vision_config
        model = Qwen2VisionTransformerPretrainedModel._from_config(config)
        grid = 336 // config.patch_size                  # 24 x 24 patches per 336 x 336 image

        def run(n):
            pixels = torch.randn(n * grid * grid, 3 * config.temporal_patch_size * config.patch_size ** 2)
            return model(pixels, grid_thw=torch.tensor([[1, grid, grid]] * n)).pooler_output
        return model, list(model.blocks), run
    finally:
        torch.set_default_dtype(default)


def measure(model, layers, run, images: int, checkpointed: bool) -> tuple[dict, dict]:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inputs, seen = [0], [0], set()

    def count(t, total):
        """Each storage once, whole: a view (Qwen2-VL's q, k, v of one fused projection) keeps all of it alive."""
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()

    def pack(t):
        count(t, saved)
        return t

    def kept(module, args, kwargs):                     # what a checkpointed block holds until backward
        for t in [*args, *kwargs.values()]:
            for x in (t if isinstance(t, tuple) else (t,)):
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    count(x, inputs)
    handles = [layer.register_forward_pre_hook(kept, with_kwargs=True) for layer in layers] if checkpointed else []
    torch.manual_seed(1)
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(images)
    out.float().pow(2).mean().backward()
    seconds = time.perf_counter() - t
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": saved[0], "kept_inputs_bytes": inputs[0], "seconds": seconds}, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["llava", "qwen2-vl"], default="qwen2-vl")
    ap.add_argument("--images", type=int, default=4, help="images in the batch (bench_distributed: 4 per side)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, layers, run = tower(args.arch, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model.eval()
    model.requires_grad_(False)
    for layer in layers:
        layer.mlp.requires_grad_(True)
    plain, g_plain = measure(model, layers, run, args.images, checkpointed=False)
    checkpoint_layers(layers)
    ckpt, g_ckpt = measure(model, layers, run, args.images, checkpointed=True)
    same = g_plain.keys() == g_ckpt.keys() and all(torch.equal(g_plain[k], g_ckpt[k]) for k in g_plain)
    print(f"{args.arch} 7B tower, {len(layers)} blocks, {args.images} images, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f} M trainable (the MLPs)")
    for name, r in (("plain", plain), ("checkpoint-vision", ckpt)):
        total = r["saved_bytes"] + r["kept_inputs_bytes"]
        print(f"{name}: saved for backward {r['saved_bytes'] / 1e9:.3f} GB + block inputs kept "
              f"{r['kept_inputs_bytes'] / 1e9:.3f} GB = {total / 1e9:.3f} GB; forward + backward {r['seconds']:.1f} s")
    print(f"MLP gradients equal bit for bit: {same}")


if __name__ == "__main__":
    main()
