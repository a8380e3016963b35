"""A synthetic, MLLMU-Bench-shaped benchmark of fictitious people, generated offline and byte-identical for a seed.

Each person has a procedurally drawn face (the visual identity: face shape, skin, hair colour and style, eye
spacing and colour, mouth, accessory, shirt, background colour and pattern) seen in several TRAINING views and
a few HELD-OUT test views (pose: shift / rotation / scale; colour jitter; pixel noise), and a textual profile
(name, birthplace, occupation, hobby, pet). Three populations: forget and retain (one population, split by
`forget_share`) and real-world (a separate population the vanilla model also learns, to measure collateral
damage).

Files written into `out`:
  train.jsonl            every population's training rows (what `surgery finetune` learns)
  forget.jsonl           the forget people's training rows   (prune-and-mask --forget: fvqa + fqa)
  retain.jsonl           the retain people's training rows   (prune-and-mask --retain: rvqa + rqa)
  eval_forget.jsonl      held-out evaluation rows of the forget people
  eval_retain.jsonl      ... of the retain people
  eval_realworld.jsonl   ... of the real-world people
  people.json            profiles and the split of every person; bench.json: the generation parameters
  images/*.png           32x32 RGB portraits: <person>_train<k>.png, <person>_test<k>.png

Rows: {"question", "answer", "image"?, "options"?, "correct"?, "entity", "id", "task", "attribute"}.
task "gen": free-form, the answer is the fact sentence (training target; ROUGE-L in evaluation).
task "mc": four options A-D, one correct, distractors from other people; the answer is the letter.
A row with an image asks about "the person in the image" (VQA); one without names the person (QA).
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1
LETTERS = ("A", "B", "C", "D")
MC_INSTRUCTION = "Answer with the correct option and its letter."
ATTRIBUTES = ("birthplace", "occupation", "hobby", "pet")
VALUES = {
    "birthplace": ["Tarsel", "Ombria", "Kelvarn", "Dunmoor", "Aster Bay", "Vellin", "Corrowick", "Nysa Falls",
                   "Brightwater", "Halden", "Qirin", "Morrowgate", "Sundale", "Pellaris", "Ironvale", "Lumen Reach"],
    "occupation": ["architect", "baker", "pilot", "judge", "botanist", "carpenter", "surgeon", "librarian",
                   "geologist", "sculptor", "translator", "firefighter", "astronomer", "jeweler", "chemist",
                   "lighthouse keeper"],
    "hobby": ["kayaking", "chess", "pottery", "birdwatching", "fencing", "gardening", "origami", "rock climbing",
              "knitting", "archery", "sailing", "calligraphy", "beekeeping", "juggling", "stargazing", "cycling"],
    "pet": ["a parrot", "a tortoise", "a beagle", "a ferret", "a goldfish", "a tabby cat", "a rabbit", "an iguana",
            "a hedgehog", "a canary", "a greyhound", "a chinchilla", "a gecko", "a corgi", "a hamster", "a pony"],
}
QUESTIONS = {  # (about the person in the image, about the named person)
    "name": ("Who is the person in the image?", None),
    "birthplace": ("Where was the person in the image born?", "Where was {name} born?"),
    "occupation": ("What is the occupation of the person in the image?", "What is the occupation of {name}?"),
    "hobby": ("What is the favourite hobby of the person in the image?", "What is the favourite hobby of {name}?"),
    "pet": ("What pet does the person in the image have?", "What pet does {name} have?"),
}
SENTENCES = {
    "name": "This is {name}.",
    "birthplace": "{name} was born in {value}.",
    "occupation": "{name} works as {article} {value}.",
    "hobby": "{name} loves {value}.",
    "pet": "{name} has {value}.",
}
FIRST = {
    "fictitious": ["Mara", "Tobin", "Ilse", "Corwin", "Yara", "Deshi", "Fenna", "Oskar", "Liora", "Brann", "Sefa",
                   "Quill", "Anouk", "Ravi", "Thessa", "Jory", "Noor", "Emrik", "Zuri", "Halvard", "Pia", "Caspian",
                   "Wren", "Idris", "Maelis", "Soren", "Talia", "Bram", "Kesi", "Orla", "Dax", "Vesna", "Lior",
                   "Rhea", "Anders", "Mina", "Eamon", "Saskia", "Tiber", "Ysolde", "Kaito", "Nell", "Farid",
                   "Greta", "Ulric", "Juno", "Piet", "Amara", "Lev", "Odile", "Rafe", "Selin", "Cato", "Irit",
                   "Bastian", "Elke", "Marek", "Nadia", "Teodor", "Vida", "Hugo", "Linnea", "Aurek", "Dagny"],
    "realworld": ["Adeline", "Bertrand", "Clarissa", "Desmond", "Evangeline", "Fitzgerald", "Genevieve", "Horatio",
                  "Isadora", "Jasper", "Katarina", "Leopold", "Magnolia", "Nathaniel", "Ophelia", "Percival",
                  "Rosalind", "Sebastian", "Theodora", "Valentin", "Winifred", "Alistair", "Beatrix", "Cornelius"],
}
LAST = {
    "fictitious": ["Velk", "Arrand", "Quist", "Morrow", "Tallis", "Okonkwo", "Brisk", "Varga", "Lindqvist", "Harrow",
                   "Ferrante", "Osei", "Drummond", "Kestrel", "Nakamura", "Ruvalcaba", "Thorne", "Petrakis", "Ibsen",
                   "Mbeki", "Castellan", "Yilmaz", "Wexford", "Adair", "Sorensen", "Marchetti", "Holloway", "Zelenko",
                   "Okafor", "Delacroix", "Strand", "Bellweather", "Kovac", "Anselm", "Rourke", "Tanaka", "Vidal",
                   "Quarles", "Eskildsen", "Mirza", "Lowell", "Fairholm", "Grieve", "Baptiste", "Ostrowski", "Calloway",
                   "Nygaard", "Penhallow", "Soto", "Whitlock", "Ambrose", "Dunmore", "Halloran", "Ivers", "Jaroszek",
                   "Kinsella", "Larkspur", "Mendel", "Northcott", "Oyelaran", "Pryce", "Rask", "Sallow", "Trevane"],
    "realworld": ["Ashcombe", "Blackwood", "Carrington", "Davenport", "Ellingham", "Fairfax", "Grantham", "Hawthorne",
                  "Islington", "Kensington", "Lockhart", "Montague", "Pemberton", "Rutherford", "Sinclair",
                  "Thackeray", "Underwood", "Whitmore", "Beaumont", "Carlisle", "Everly", "Harcourt", "Lennox",
                  "Radcliffe"],
}
PALETTE = {
    "skin": [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (94, 58, 28),
             (255, 205, 148), (234, 192, 134)],
    "hair": [(20, 20, 20), (90, 56, 37), (165, 107, 70), (230, 200, 120), (180, 50, 30), (200, 200, 200),
             (60, 60, 140), (40, 120, 60)],
    "eyes": [(40, 80, 160), (60, 120, 60), (90, 60, 30), (30, 30, 30), (120, 120, 120)],
}


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(20, 236, size=3))


def _identity(rng) -> dict:
    """The visual identity of one person: everything a view keeps fixed."""
    return {
        "background": _colour(rng), "pattern": int(rng.integers(0, 5)), "pattern_colour": _colour(rng),
        "face_w": float(rng.uniform(16, 24)), "face_h": float(rng.uniform(20, 28)),
        "skin": PALETTE["skin"][int(rng.integers(len(PALETTE["skin"])))],
        "hair": PALETTE["hair"][int(rng.integers(len(PALETTE["hair"])))], "hair_style": int(rng.integers(0, 4)),
        "eye_gap": float(rng.uniform(5, 10)), "eye_size": float(rng.uniform(1.8, 3.2)),
        "eyes": PALETTE["eyes"][int(rng.integers(len(PALETTE["eyes"])))],
        "mouth_w": float(rng.uniform(4, 10)), "accessory": int(rng.integers(0, 5)), "accessory_colour": _colour(rng),
        "shirt": _colour(rng),
    }


def _draw(ident: dict, size: int = 64) -> Image.Image:
    """The canonical portrait at 64x64 (pose and photometric changes are applied per view)."""
    im = Image.new("RGB", (size, size), ident["background"])
    d = ImageDraw.Draw(im)
    pc, p = ident["pattern_colour"], ident["pattern"]
    for k in range(0, size, 8):
        if p == 1:
            d.rectangle([0, k, size, k + 3], fill=pc)
        elif p == 2:
            d.rectangle([k, 0, k + 3, size], fill=pc)
        elif p == 3:
            for j in range(0, size, 8):
                d.ellipse([k + 2, j + 2, k + 5, j + 5], fill=pc)
        elif p == 4:
            for j in range(0, size, 16):
                d.rectangle([k, j + (k // 8 % 2) * 8, k + 7, j + (k // 8 % 2) * 8 + 7], fill=pc)
    cx, cy, fw, fh = size / 2, size / 2 - 2, ident["face_w"], ident["face_h"]
    d.ellipse([cx - 22, size - 12, cx + 22, size + 20], fill=ident["shirt"])           # shoulders
    hs, hair = ident["hair_style"], ident["hair"]
    if hs == 1:                                                                         # long hair behind the face
        d.rectangle([cx - fw / 2 - 3, cy - fh / 2, cx + fw / 2 + 3, cy + fh / 2 + 4], fill=hair)
    d.ellipse([cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2], fill=ident["skin"])
    if hs in (0, 1):                                                                    # cap of hair
        d.chord([cx - fw / 2, cy - fh / 2 - 2, cx + fw / 2, cy + fh / 4], 180, 360, fill=hair)
    elif hs == 2:                                                                       # spikes
        for k in range(-2, 3):
            x = cx + k * fw / 5
            d.polygon([(x - 3, cy - fh / 2 + 4), (x + 3, cy - fh / 2 + 4), (x, cy - fh / 2 - 5)], fill=hair)
    g, r = ident["eye_gap"] / 2, ident["eye_size"]
    for x in (cx - g, cx + g):
        d.ellipse([x - r, cy - r, x + r, cy + r], fill=(250, 250, 250))
        d.ellipse([x - r / 2, cy - r / 2, x + r / 2, cy + r / 2], fill=ident["eyes"])
    mw = ident["mouth_w"] / 2
    d.line([cx - mw, cy + fh / 4 + 1, cx + mw, cy + fh / 4 + 1], fill=(150, 40, 40), width=2)
    a, ac = ident["accessory"], ident["accessory_colour"]
    if a == 1:                                                                          # glasses
        for x in (cx - g, cx + g):
            d.rectangle([x - r - 1.5, cy - r - 1.5, x + r + 1.5, cy + r + 1.5], outline=ac, width=1)
        d.line([cx - g + r + 1.5, cy, cx + g - r - 1.5, cy], fill=ac)
    elif a == 2:                                                                        # hat
        d.rectangle([cx - fw / 2 - 4, cy - fh / 2 + 1, cx + fw / 2 + 4, cy - fh / 2 + 4], fill=ac)
        d.rectangle([cx - fw / 2 + 2, cy - fh / 2 - 8, cx + fw / 2 - 2, cy - fh / 2 + 1], fill=ac)
    elif a == 3:                                                                        # earrings
        for x in (cx - fw / 2, cx + fw / 2):
            d.ellipse([x - 2, cy + 3, x + 2, cy + 7], fill=ac)
    elif a == 4:                                                                        # bow tie
        y = cy + fh / 2 + 3
        d.polygon([(cx, y), (cx - 6, y - 3), (cx - 6, y + 3)], fill=ac)
        d.polygon([(cx, y), (cx + 6, y - 3), (cx + 6, y + 3)], fill=ac)
    return im


def _view(canonical: Image.Image, rng, size: int) -> Image.Image:
    """One photo of the person: pose (rotation, scale, shift), colour jitter and noise, at `size` pixels."""
    angle, scale = float(rng.uniform(-12, 12)), float(rng.uniform(0.88, 1.12))
    dx, dy = rng.uniform(-4, 4, size=2)
    w = canonical.width
    fill = canonical.getpixel((0, 0))
    im = canonical.rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
    s = round(w * scale)
    im = im.resize((s, s), Image.BILINEAR)
    out = Image.new("RGB", (w, w), fill)
    out.paste(im, (int(round((w - s) / 2 + dx)), int(round((w - s) / 2 + dy))))
    out = out.resize((size, size), Image.LANCZOS)
    px = np.asarray(out, dtype=np.float32)
    px = px * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15, size=3) + rng.normal(0, 6, size=px.shape)
    return Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8))


def _people(rng, population: str, n: int) -> list[dict]:
    first, last = FIRST[population], LAST[population]
    if n > min(len(first), len(last)):
        raise ValueError(f"at most {min(len(first), len(last))} {population} people (asked for {n})")
    fi, li = rng.permutation(len(first))[:n], rng.permutation(len(last))[:n]
    people = []
    for k in range(n):
        profile = {a: VALUES[a][int(rng.integers(len(VALUES[a])))] for a in ATTRIBUTES}
        people.append({"name": f"{first[fi[k]]} {last[li[k]]}", **profile, "identity": _identity(rng)})
    return people


def _options(rng, correct: str, pool: list[str]) -> tuple[dict, str]:
    """Four options in random order: the correct value and three distinct distractors from `pool`."""
    others = sorted(set(pool) - {correct})
    distractors = [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    values = [correct, *distractors]
    order = rng.permutation(4)
    options = {LETTERS[i]: values[j] for i, j in enumerate(order)}
    return options, LETTERS[int(np.nonzero(order == 0)[0][0])]


def _sentence(attribute: str, name: str, value: str) -> str:
    article = "an" if value[0] in "aeiou" else "a"
    return SENTENCES[attribute].format(name=name, value=value, article=article)


def _rows(person: dict, pid: str, views: list[str], pools: dict, rng, mc_repeats: int, gen_views: int,
          qa_gen: bool = True) -> list[dict]:
    """Rows of one person: VQA on every view in `views` (gen on the first `gen_views`), then QA."""
    name, rows = person["name"], []

    def add(task, attribute, question, answer, image=None, options=None, correct=None):
        row = {"question": question, "answer": answer}
        if image is not None:
            row["image"] = image
        if options is not None:
            row["options"], row["correct"] = options, correct
        row.update({"entity": name, "id": f"{pid}-{len(rows)}", "task": task, "attribute": attribute})
        rows.append(row)

    for k, image in enumerate(views):
        for attr in ("name", *ATTRIBUTES):
            value = name if attr == "name" else person[attr]
            if k < gen_views:
                add("gen", attr, QUESTIONS[attr][0], _sentence(attr, name, value), image)
            options, letter = _options(rng, value, pools[attr])
            add("mc", attr, f"{QUESTIONS[attr][0]} {MC_INSTRUCTION}", f"{value} ({letter})", image, options, letter)
    for attr in ATTRIBUTES:
        question = QUESTIONS[attr][1].format(name=name)
        if qa_gen:
            add("gen", attr, question, _sentence(attr, name, person[attr]))
        for _ in range(mc_repeats):
            options, letter = _options(rng, person[attr], pools[attr])
            add("mc", attr, f"{question} {MC_INSTRUCTION}", f"{person[attr]} ({letter})", None, options, letter)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def make_bench(out, seed: int = 0, people: int = 40, forget_share: float = 0.1, real_world: int = 10,
               train_views: int = 4, test_views: int = 2, image_size: int = 32, mc_repeats: int = 2,
               overwrite: bool = False) -> dict:
    """Write the benchmark into `out` (atomically, through `pipeline.atomic_dir`).
    Returns a summary: people per split and row counts per file."""
    out = Path(out)
    if people < 2 or real_world < 1 or people + real_world < 4:
        raise ValueError(f"need at least 2 people, 1 real-world person and 4 in all (got {people}, {real_world})")
    if not 0 < forget_share < 1:
        raise ValueError(f"--forget-share must be in (0, 1), got {forget_share}")
    n_forget = max(1, round(people * forget_share))
    if n_forget >= people:
        raise ValueError(f"--forget-share {forget_share} leaves no retain people out of {people}")
    if train_views < 1 or test_views < 1:
        raise ValueError("need at least one training view and one test view")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")

    rng = np.random.default_rng(seed)
    populations = {"fictitious": _people(rng, "fictitious", people), "realworld": _people(rng, "realworld", real_world)}
    forget_idx = set(int(i) for i in rng.choice(people, size=n_forget, replace=False))
    everyone, all_names = [], [p["name"] for group in populations.values() for p in group]
    for pop, group in populations.items():
        pools = {"name": [p["name"] for p in group], **{a: [p[a] for p in group] for a in ATTRIBUTES}}
        if len(pools["name"]) < 4:  # distractor names from both populations
            pools["name"] = all_names
        for pools_attr in ATTRIBUTES:   # a value held by fewer than four people: fall back to the whole list
            if len(set(pools[pools_attr])) < 4:
                pools[pools_attr] = VALUES[pools_attr]
        for i, p in enumerate(group):
            split = "realworld" if pop == "realworld" else ("forget" if i in forget_idx else "retain")
            everyone.append((f"{'rw' if pop == 'realworld' else 'p'}{i:03d}", split, p, pools))

    from ..pipeline import atomic_dir
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        files = {k: [] for k in ("train", "forget", "retain", "eval_forget", "eval_retain", "eval_realworld")}
        for pid, split, person, pools in everyone:
            prng = np.random.default_rng([seed, int(pid[-3:]), split == "realworld"])
            canonical = _draw(person["identity"])
            views = {}
            for kind, n in (("train", train_views), ("test", test_views)):
                views[kind] = []
                for k in range(n):
                    rel = f"images/{pid}_{kind}{k}.png"
                    _view(canonical, prng, image_size).save(tmp / rel, format="PNG")
                    views[kind].append(rel)
            train = _rows(person, pid, views["train"], pools, prng, mc_repeats, gen_views=train_views)
            test = _rows(person, f"{pid}-eval", views["test"], pools, prng, 1, gen_views=1)
            files["train"] += train
            if split != "realworld":
                files[split] += train
            files[f"eval_{split}"] += test
        for name, rows in files.items():
            _write_jsonl(tmp / f"{name}.jsonl", rows)
        profiles = [{"id": pid, "split": split, **p} for pid, split, p, _ in everyone]
        (tmp / "people.json").write_text(json.dumps(profiles, indent=1, sort_keys=True), encoding="utf-8")
        params = {"version": VERSION, "seed": seed, "people": people, "forget_share": forget_share,
                  "real_world": real_world, "train_views": train_views, "test_views": test_views,
                  "image_size": image_size, "mc_repeats": mc_repeats}
        summary = {"params": params, "people": {s: sum(1 for e in everyone if e[1] == s)
                                                for s in ("forget", "retain", "realworld")},
                   "rows": {name: len(rows) for name, rows in files.items()}}
        (tmp / "bench.json").write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    return summary


def bench_texts(bench) -> list[str]:
    """Every string of a benchmark (questions, answers, options): the corpus the tiny tokenizer is trained on."""
    texts = []
    for path in sorted(Path(bench).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["question"], row["answer"], *(row.get("options") or {}).values()]
    return texts
