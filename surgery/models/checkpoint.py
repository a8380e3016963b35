"""Keep the input checkpoint's own bytes for every weight a run did not change.

A run loads, trains and saves in one dtype (--dtype). When that is not the checkpoint's (an fp16 LLaVA trained in
bf16 on a GPU, an fp32 checkpoint in bf16), save_pretrained would write every weight in the run's dtype, the frozen
LLM too: rounded (a downcast) or twice the size (an upcast). Here each saved tensor that equals the checkpoint's
tensor of the same name cast to the run's dtype, bit for bit, is replaced by the checkpoint's tensor itself; a
tensor the run changed keeps the run's dtype and values. save_pretrained writes the checkpoint's key names
(`save_original_format`), so the two sides are matched by name, file to file. config.json keeps the run's dtype:
loaded with `dtype="auto"` the output is the model the run evaluated; loaded in the checkpoint's dtype, its frozen
weights are the checkpoint's exactly.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files that hold a checkpoint's weights, as from_pretrained finds them: the index's shards,
    else model.safetensors (other *.safetensors in the directory, such as a surgery run's masks, are not weights)."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        return [directory / s for s in sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))]
    return [directory / SINGLE] if (directory / SINGLE).is_file() else []


def dtypes(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """name -> (file, safetensors dtype string) for every tensor in `files`, read from the headers only."""
    found = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            found.update({k: (f, h.get_slice(k).get_dtype()) for k in h.keys()})
    return found


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals itself, -0 differs from 0)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def keep_source_weights(out: Path, source: Path) -> dict:
    """Rewrite the weight files in `out` so that every tensor the run left unchanged is the one in `source`, in the
    checkpoint's dtype (the module's docstring). Only tensors whose dtype differs from the checkpoint's are read;
    each rewritten file replaces its original atomically. Returns {"tensors", "restored", "checkpoint_dtypes",
    "saved_dtypes"}: how many tensors the output holds, how many were written back from the checkpoint."""
    out = Path(out)
    src, files = dtypes(weight_files(source)), weight_files(out)
    restored = 0
    for f in files:
        with safe_open(f, framework="pt") as h:
            names, meta = list(h.keys()), h.metadata()
            differ = [k for k in names if k in src and src[k][1] != h.get_slice(k).get_dtype()]
            tensors = {k: h.get_tensor(k) for k in names} if differ else {}
        kept = 0
        for k in differ:
            with safe_open(src[k][0], framework="pt") as s:
                original = s.get_tensor(k)
            if original.is_floating_point() and tensors[k].is_floating_point() \
                    and _same_bits(original.to(tensors[k].dtype), tensors[k]):
                tensors[k], kept = original, kept + 1
        if kept:
            tmp = f.with_name(f.name + ".tmp")
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, f)
        restored += kept
    saved = dtypes(files)
    if restored and (out / INDEX).is_file():  # total_size counts bytes, which changed with the dtypes
        index = json.loads((out / INDEX).read_text())
        if "total_size" in index.get("metadata", {}):
            total = 0
            for f in files:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        total += BYTES.get(h.get_slice(k).get_dtype(), 1) * \
                            int(torch.Size(h.get_slice(k).get_shape()).numel())
            index["metadata"]["total_size"] = total
            (out / (INDEX + ".tmp")).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(out / (INDEX + ".tmp"), out / INDEX)
    return {"tensors": len(saved), "restored": restored,
            "checkpoint_dtypes": sorted({d for _, d in src.values()}),
            "saved_dtypes": sorted({d for _, d in saved.values()})}
