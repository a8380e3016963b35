"""Shared fixtures: tiny saved models and small JSONL data sets generated on the spot (nothing downloaded)."""
import json
import os
import random

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, run the Triton kernels on CPU tensors through the interpreter (must precede their import).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def write_split(path, n_vqa: int, n_qa: int, seed: int, prefix: str = "p"):
    """A JSONL file with `n_vqa` image rows and `n_qa` text rows; images in a folder beside it."""
    rng = random.Random(seed)
    npr = np.random.default_rng(seed)
    img_dir = path.parent / f"{path.stem}_img"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
    rows = []
    for i in range(n_vqa):
        name = f"{rng.choice(names)} {prefix}{i}"
        base = npr.integers(0, 255, size=3)
        pix = np.clip(base + npr.normal(0, 40, size=(24 + i % 5, 28, 3)), 0, 255).astype("uint8")
        Image.fromarray(pix).save(img_dir / f"{i}.png")
        rows.append({"question": "Who is the person in the image?", "answer": name,
                     "image": f"{img_dir.name}/{i}.png", "entity": name, "id": f"{prefix}v{i}"})
    for i in range(n_qa):
        rows.append({"question": f"Where does {prefix}{i} live?", "answer": rng.choice(["Oslo", "Lima", "Kyiv"]),
                     "options": {"A": "Oslo", "B": "Lima", "C": "Kyiv", "D": "Rome"}, "id": f"{prefix}q{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
