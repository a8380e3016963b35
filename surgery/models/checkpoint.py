"""A checkpoint's weight files, and keeping its own bytes for every weight a run did not change.

A run loads, trains and saves in one dtype (--dtype). When that is not the checkpoint's (an fp16 LLaVA trained in
bf16 on a GPU, an fp32 checkpoint in bf16), save_pretrained would write every weight in the run's dtype, the frozen
LLM too: rounded (a downcast) or twice the size (an upcast). `keep_source_weights` replaces each saved tensor that
equals the checkpoint's tensor of the same name cast to the run's dtype, bit for bit, by the checkpoint's tensor
itself; a tensor the run changed keeps the run's dtype and values. save_pretrained writes the checkpoint's key names
(`save_original_format`), so the two sides are matched by name. config.json keeps the run's dtype: loaded with
`dtype="auto"` the output is the model the run evaluated; loaded in the checkpoint's dtype, its frozen weights are
the checkpoint's exactly.
"""
import json
import logging
import os
import struct
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger("surgery")
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files that hold a checkpoint's weights, as from_pretrained picks them: model.safetensors,
    else the shards its index names (other *.safetensors in the directory, such as a surgery run's masks, are not
    weights)."""
    directory = Path(directory)
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    if (directory / INDEX).is_file():
        try:
            shards = json.loads((directory / INDEX).read_text(encoding="utf-8"))["weight_map"].values()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{directory / INDEX}: not a weight index (a JSON object with a weight_map of "
                             f"name -> shard file): {type(e).__name__}: {e}") from None
        return [directory / s for s in sorted(set(shards))]
    return []


def header(files: list[Path]) -> dict[str, tuple[Path, str]]:
    """name -> (file, safetensors dtype) of every tensor in `files`, read from the files' headers only."""
    found = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            found.update({k: (Path(f), h.get_slice(k).get_dtype()) for k in h.keys()})
    return found


def readable(f: Path) -> bool:
    """Whether safetensors can open `f` (its header is whole and covers the file)."""
    try:
        with safe_open(f, framework="pt") as h:
            h.keys()
        return True
    except Exception:
        return False


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals itself, -0 differs from 0)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def write_streaming(path: Path, specs: dict[str, tuple[str, list[int]]], get, metadata: dict | None = None) -> None:
    """A safetensors file at `path` holding get(name) for each name of `specs` (name -> (safetensors dtype, shape)),
    written one tensor at a time (save_file would hold them all in memory: a 7B model's 14 GB). The format: an 8-byte
    little-endian header length, the JSON header (dtype, shape and byte range of each tensor), then the bytes."""
    width = {name: torch.empty((), dtype=DTYPES[dtype]).element_size() for name, (dtype, _) in specs.items()}
    order = sorted(specs, key=lambda name: (-width[name], name))   # as safetensors: every tensor stays aligned
    entries, offset = {}, 0
    for name in order:
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * width[name]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in order:
            dtype, shape = specs[name]
            t = get(name)
            if NAMES[t.dtype] != dtype or list(t.shape) != list(shape):
                raise ValueError(f"{path}: {name} is {NAMES[t.dtype]} {list(t.shape)}, its header says {dtype} {shape}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def data_bytes(path: Path) -> int:
    """The bytes of tensor data a safetensors file holds, from its header."""
    with open(path, "rb") as f:
        entries = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in entries.items() if k != "__metadata__")


def keep_source_weights(out: Path, source: Path, source_header: dict[str, tuple[Path, str]]) -> dict:
    """Rewrite the weight files in `out` so that every tensor the run left unchanged is the one in `source`, in the
    checkpoint's dtype (the module's docstring). `source_header`: `header(weight_files(source))`, read when the
    model was loaded: only the tensors whose dtype the run changed are read from `source` again (none in a run in
    the dtype of every checkpoint tensor). Each rewritten file replaces its original atomically; if `source` cannot
    be read now, the output stays as save_pretrained wrote it (a warning says so). Returns {"tensors", "restored",
    "checkpoint_dtypes", "saved_dtypes"}."""
    out, files = Path(out), weight_files(out)
    restored = 0
    for f in files:
        tmp = f.with_name(f.name + ".tmp")
        try:
            with safe_open(f, framework="pt") as h, ExitStack() as stack:
                names, meta = list(h.keys()), h.metadata()
                differ = [k for k in names if k in source_header and source_header[k][1] != h.get_slice(k).get_dtype()]
                opened = {}                 # each checkpoint shard opened once for this file

                def original(k):
                    shard = source_header[k][0]
                    if shard not in opened:
                        opened[shard] = stack.enter_context(safe_open(shard, framework="pt"))
                    return opened[shard].get_tensor(k)
                keep = set()
                for k in differ:
                    was, saved = original(k), h.get_tensor(k)
                    if was.is_floating_point() and saved.is_floating_point() and _same_bits(was.to(saved.dtype), saved):
                        keep.add(k)
                if not keep:
                    continue
                specs = {k: (source_header[k][1] if k in keep else h.get_slice(k).get_dtype(),
                             h.get_slice(k).get_shape()) for k in names}
                write_streaming(tmp, specs, lambda k: original(k) if k in keep else h.get_tensor(k), meta)
            os.replace(tmp, f)
            restored += len(keep)
        except Exception as e:   # the run's work is in `out` already: keep it as save_pretrained wrote it
            tmp.unlink(missing_ok=True)
            log.warning("%s: the weights the run left unchanged stay in the run's dtype, not the checkpoint's (%s: %s)",
                        f.name, source, e)
    saved = header(files)
    if restored and (out / INDEX).is_file():   # total_size counts bytes, which changed with the dtypes
        index = json.loads((out / INDEX).read_text())
        if "total_size" in index.get("metadata", {}):
            index["metadata"]["total_size"] = sum(data_bytes(f) for f in files)
            with open(out / (INDEX + ".tmp"), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(out / (INDEX + ".tmp"), out / INDEX)
    return {"tensors": len(saved), "restored": restored,
            "checkpoint_dtypes": sorted({d for _, d in source_header.values()}),
            "saved_dtypes": sorted({d for _, d in saved.values()})}
