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
    cities = {"A": "Oslo", "B": "Lima", "C": "Kyiv", "D": "Rome"}
    for i in range(n_qa):
        answer = rng.choice(["Oslo", "Lima", "Kyiv"])
        rows.append({"question": f"Where does {prefix}{i} live?", "answer": answer, "options": cities,
                     "correct": next(k for k, v in cities.items() if v == answer), "id": f"{prefix}q{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_photo_split(path, people: int = 3, photos: int = 3):
    """A forget file of `people` people with `photos` photos each and two multiple-choice rows per photo (who, and
    where born), the shape --stop-forget-accuracy holds photos back from."""
    img_dir = path.parent / f"{path.stem}_img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    who = {"A": "Ada", "B": "Bo", "C": "Cy", "D": "Di"}
    born = {"A": "Oslo", "B": "Lima", "C": "Kyiv", "D": "Rome"}
    rows = []
    for p in range(people):
        for k in range(photos):
            Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(img_dir / f"{p}_{k}.png")
            for q, (question, options, correct) in enumerate((
                    ("Who is the person in the image?", who, "ABCD"[p % 4]),
                    ("Where was the person in the image born?", born, "BCDA"[p % 4]))):
                rows.append({"question": question, "options": options, "correct": correct,
                             "answer": f"{options[correct]} ({correct})", "image": f"{img_dir.name}/{p}_{k}.png",
                             "entity": f"person {p}", "id": f"f{p}-{k}-{q}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
