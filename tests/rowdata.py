"""Small JSONL data sets generated on the spot, for fixtures and for tests that build their own."""
import json
import random

import numpy as np
from PIL import Image


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
