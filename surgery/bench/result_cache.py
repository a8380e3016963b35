"""The benchmark's side of the demo, kept in the cache: the vanilla and the reference model's evaluation and
relearning attacks depend only on the model, the benchmark and the code that computes them, so a warm run reads them
instead of computing them again, as it reads the models themselves (finetune.py). An unlearned model's results are
never kept: what a method does is computed on every run.

A result's key is a digest of the model directory's files, the benchmark's files, the step's arguments, this
package's code (the Python source of surgery and surgery.kernels, the compiled extension) and the numeric environment
the step runs in (torch, transformers, numpy, CPU, instruction sets, threads): a change to any of them computes the
result again. Results are JSON, written to a temporary file and renamed; the value a run uses is read back from that
JSON either way, so a computed and a cached result are the same objects. Delete CACHE/results/ to compute every
result again."""
import functools
import hashlib
import json
import os
from pathlib import Path

import surgery
import surgery.kernels
from ..pipeline import environment


def files_digest(root, h=None) -> str:
    """SHA-256 over every file under `root` (relative names and bytes): equal digests mean the same files."""
    h = h or hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def source_digest() -> str:
    """SHA-256 over the Python source of surgery and surgery.kernels and the compiled extension surgery._C, read once
    per process (at its first kept result): files edited while a run goes on do not change its later keys."""
    h = hashlib.sha256()
    for package in (surgery, surgery.kernels):
        root = Path(package.__file__).parent
        for path in sorted([*root.rglob("*.py"), *root.glob("_C.*.so"), *root.glob("_C.*.pyd")]):
            h.update(f"{package.__name__}/{path.relative_to(root).as_posix()}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def key_of(kind: str, model, bench_digest: str, params: dict) -> str:
    """The cache key of `kind` (e.g. eval[reference]) of the model directory `model` on the benchmark whose
    files_digest is `bench_digest` (taken once per benchmark by the caller: it reads every image), with `params`, in
    this process's environment."""
    env = {k: v for k, v in environment("cpu").items() if k not in ("surgery", "platform")}
    parts = {"kind": kind, "model": files_digest(model), "bench": bench_digest, "params": params,
             "source": source_digest(), "environment": env}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(cache, kind: str, model, bench_digest: str, params: dict, fn, *args, **kw) -> tuple:
    """(fn(*args, **kw), whether it was read from `cache`): the JSON value of the step `kind` of the model directory
    `model` on the benchmark with files_digest `bench_digest`, where `params` are every argument of the step beyond
    those two. `cache` None: computed, not kept."""
    if cache is None:
        return json.loads(json.dumps(fn(*args, **kw))), False
    path = Path(cache) / "results" / f"{kind.replace('[', '-').rstrip(']')}-{key_of(kind, model, bench_digest, params)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), True
    text = json.dumps(fn(*args, **kw))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return json.loads(text), False
