"""Shared fixtures: tiny saved models and small JSONL data sets generated on the spot (nothing downloaded)."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The command line's portable CPU numerics in this process too (the processes the tests start inherit them), set
# before torch computes anything, as `surgery` sets them.
from surgery.numerics import pin_cpu_numerics  # noqa: E402

pin_cpu_numerics()
# Without a GPU, run the Triton kernels on CPU tensors through the interpreter (must precede their import).
import torch  # noqa: E402
from rowdata import write_split  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def data(tmp_path):
    """(forget.jsonl, retain.jsonl) with every split non-empty."""
    return (write_split(tmp_path / "forget.jsonl", 5, 3, seed=1, prefix="f"),
            write_split(tmp_path / "retain.jsonl", 7, 4, seed=2, prefix="r"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny LLaVA, Qwen2-VL and Qwen2.5-VL saved as local HF directories."""
    from surgery.models import load, save
    dirs = {}
    for name in ("tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"):
        d = tmp_path_factory.mktemp(name)
        save(load(name, seed=3), d)
        dirs[name] = d
    return dirs
