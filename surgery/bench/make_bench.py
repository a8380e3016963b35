"""A synthetic, MLLMU-Bench-shaped benchmark of fictitious people, generated offline and byte-identical for a seed.

Who a person is shows only in their face: face shape, skin, hair colour and style, eye colour, spacing and size,
brows, nose, mouth, facial hair, glasses and skin marks. Every one of these values is shared by many people (a
palette of 8 skin tones, 8 hair colours, ...), and any two people differ in at least `MIN_DIFFERENT` of the
discrete ones, so recognising a person takes a combination of them. Everything else is drawn afresh for every
photo (view): background colour and pattern, shirt colour and style, the colour of the glasses' frame, lighting
(brightness, tint, a gradient), pose (rotation, scale, shift) and pixel noise. No colour outside the face says who
it is. Each person has a textual profile (name, birthplace, occupation, hobby, pet), each value held by equally
many people of a population (so no option is a better guess than another by popularity).

Populations: forget and retain (one population, split by `forget_share`), real-world (a separate population the
vanilla model also learns, to measure collateral damage), and `extra_people` identities that only the vision
tower's pretraining sees (a face without a profile, as most faces in a web crawl are), so that the tower learns
faces in general, not just the benchmark's.

Files written into `out`:
  train.jsonl            every population's training rows (what the text and alignment stages learn)
  forget.jsonl           the forget people's training rows   (prune-and-mask --forget: fvqa + fqa)
  retain.jsonl           the retain people's training rows   (prune-and-mask --retain: rvqa + rqa)
  dev_forget|retain|realworld.jsonl    rows on the DEV views: the only views any tuning may look at
  eval_forget|retain|realworld.jsonl   rows on the held-out TEST views: for reporting only
  pretrain.jsonl         {"image", "entity", "face"} per photo the tower's pretraining may use: the tower views of
                         every benchmark person and of every extra identity (never a training, dev or test view)
  people.json            profiles and the split of every person; bench.json: the generation parameters
  images/*.png           RGB portraits: <person>_<tower|train|dev|test><k>.png (extras: x<k>_tower<j>.png)

Rows: {"question", "answer", "image"?, "options"?, "correct"?, "entity", "id", "task", "attribute"}.
task "gen": free-form, the answer is the fact sentence (training target; ROUGE-L in evaluation).
task "mc": four options A-D, one correct, distractors from other people; the answer is "<value> (<letter>)".
A row with an image asks about "the person in the image" (VQA); one without names the person (QA).
"""
import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = 2
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
PALETTE = {  # shared by many people: a colour alone never identifies anyone
    "skin": [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (94, 58, 28),
             (255, 205, 148), (172, 112, 70)],
    "hair": [(20, 20, 20), (90, 56, 37), (165, 107, 70), (230, 200, 120), (180, 50, 30), (200, 200, 200),
             (60, 60, 140), (40, 120, 60)],
    "eyes": [(40, 80, 160), (60, 120, 60), (90, 60, 30), (30, 30, 30), (130, 130, 130), (150, 50, 120)],
}
# The discrete facial attributes and how many values each takes. The BOLD ones are large enough to see at any pose
# and light; two people differ in at least MIN_DIFFERENT of them. The others vary between people too, but freely.
BOLD = {"skin": len(PALETTE["skin"]), "hair": len(PALETTE["hair"]), "hair_style": 6, "face_shape": 3,
        "eyes": len(PALETTE["eyes"]), "glasses": 3, "facial_hair": 4}
DETAIL = {"brows": 3, "nose": 3, "mouth": 3, "mark": 3}
FACE = {**BOLD, **DETAIL}
MIN_DIFFERENT = 3
# Per-photo lighting: brightness factor 1 +- `brightness`, a colour tint of +- `tint` per channel, a left-right
# gradient of +- `gradient`, pixel noise of std `noise`.
LIGHTING = {"brightness": 0.15, "tint": 10.0, "gradient": 0.08, "noise": 3.0}
SCALE = 4  # portraits are drawn at SCALE x the image size, then reduced (antialiasing)


def _faces(rng, n: int) -> list[dict]:
    """`n` facial identities, any two differing in at least MIN_DIFFERENT bold attributes."""
    codes = np.zeros((0, len(BOLD)), dtype=np.int64)
    faces = []
    while len(faces) < n:
        face = {k: int(rng.integers(v)) for k, v in FACE.items()}
        code = np.array([face[k] for k in BOLD])
        if len(codes) and (codes != code).sum(1).min() < MIN_DIFFERENT:
            continue
        codes = np.vstack([codes, code])
        width, height = ((0.50, 0.56), (0.40, 0.64), (0.54, 0.54))[face["face_shape"]]
        face.update(face_w=width + float(rng.uniform(-0.02, 0.02)), face_h=height + float(rng.uniform(-0.02, 0.02)),
                    eye_gap=float(rng.uniform(0.17, 0.23)), eye_size=float(rng.uniform(0.05, 0.062)),
                    eye_y=float(rng.uniform(-0.05, 0.01)), mouth_w=float(rng.uniform(0.08, 0.16)))
        faces.append(face)
    return faces


def _discrete(face: dict) -> dict:
    return {k: face[k] for k in FACE}


def _face_layer(face: dict, s: int) -> tuple[Image.Image, Image.Image]:
    """The person's head on a transparent canvas of side `s`, and the mask of their glasses (coloured per view)."""
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    glasses = Image.new("L", (s, s), 0)
    d, g = ImageDraw.Draw(im), ImageDraw.Draw(glasses)
    skin, hair = PALETTE["skin"][face["skin"]], PALETTE["hair"][face["hair"]]
    cx, cy = s / 2, s * 0.46
    fw, fh = face["face_w"] * s, face["face_h"] * s
    top, bottom, left, right = cy - fh / 2, cy + fh / 2, cx - fw / 2, cx + fw / 2
    style = face["hair_style"]
    if style == 2:                                                                   # long hair down to the shoulders
        d.rounded_rectangle([left - 0.07 * s, top - 0.03 * s, right + 0.07 * s, bottom + 0.14 * s], radius=0.1 * s,
                            fill=hair)
    elif style == 4:                                                                 # a big round volume of hair
        d.ellipse([left - 0.12 * s, top - 0.14 * s, right + 0.12 * s, cy + 0.1 * s], fill=hair)
    d.rectangle([cx - fw * 0.2, bottom - 0.05 * s, cx + fw * 0.2, s], fill=skin)           # neck
    if face["face_shape"] == 2:                                                      # square jaw
        d.rounded_rectangle([left, top, right, bottom], radius=0.12 * s, fill=skin)
    else:
        d.ellipse([left, top, right, bottom], fill=skin)
    if style in (1, 2, 4):                                                           # a cap of hair
        d.chord([left - 0.01 * s, top - 0.03 * s, right + 0.01 * s, cy + fh * 0.05], 180, 360, fill=hair)
    elif style == 3:                                                                 # tall spikes
        for k in range(-2, 3):
            x = cx + k * fw / 5
            d.polygon([(x - 0.06 * s, top + 0.08 * s), (x + 0.06 * s, top + 0.08 * s), (x, top - 0.14 * s)], fill=hair)
    elif style == 5:                                                                 # a fringe swept over one side
        d.chord([left - 0.01 * s, top - 0.03 * s, right + 0.01 * s, cy + fh * 0.05], 180, 360, fill=hair)
        d.polygon([(left - 0.01 * s, cy - 0.02 * s), (cx + fw * 0.25, top + 0.02 * s), (right, top + 0.1 * s),
                   (cx, cy - 0.06 * s)], fill=hair)
    ey, gap, r = cy + face["eye_y"] * s, face["eye_gap"] * s / 2, face["eye_size"] * s
    width = max(2, s // 28)
    for x in (cx - gap, cx + gap):
        d.ellipse([x - r * 1.3, ey - r, x + r * 1.3, ey + r], fill=(250, 250, 250))
        d.ellipse([x - r * 0.8, ey - r * 0.8, x + r * 0.8, ey + r * 0.8], fill=PALETTE["eyes"][face["eyes"]])
        by = ey - r - 0.035 * s
        if face["brows"] == 0:                                                       # thin
            d.line([x - r * 1.3, by, x + r * 1.3, by], fill=hair, width=max(1, s // 80))
        elif face["brows"] == 1:                                                     # thick
            d.rectangle([x - r * 1.5, by - 0.02 * s, x + r * 1.5, by + 0.01 * s], fill=hair)
        else:                                                                        # arched
            d.arc([x - r * 1.5, by - 0.02 * s, x + r * 1.5, by + 0.05 * s], 200, 340, fill=hair, width=max(2, s // 50))
        if face["glasses"] == 1:                                                     # round frames
            g.ellipse([x - r * 1.9, ey - r * 1.9, x + r * 1.9, ey + r * 1.9], outline=255, width=width)
        elif face["glasses"] == 2:                                                   # square frames
            g.rectangle([x - r * 1.9, ey - r * 1.6, x + r * 1.9, ey + r * 1.6], outline=255, width=width)
    if face["glasses"]:
        g.line([cx - gap + r * 1.9, ey, cx + gap - r * 1.9, ey], fill=255, width=width)
    ny, shade = cy + 0.08 * s, tuple(int(c * 0.7) for c in skin)
    if face["nose"] == 0:                                                            # button
        d.ellipse([cx - 0.022 * s, ny - 0.015 * s, cx + 0.022 * s, ny + 0.015 * s], fill=shade)
    elif face["nose"] == 1:                                                          # long
        d.line([cx, ey + r, cx, ny + 0.02 * s], fill=shade, width=max(2, s // 60))
    else:                                                                            # wide
        d.polygon([(cx, ey + r), (cx - 0.04 * s, ny + 0.02 * s), (cx + 0.04 * s, ny + 0.02 * s)], fill=shade)
    my, mw, lips = cy + fh * 0.28, face["mouth_w"] * s / 2, (150, 40, 40)
    if face["facial_hair"] == 2:                                                     # a full beard
        d.chord([left - 0.01 * s, cy - 0.02 * s, right + 0.01 * s, bottom + 0.05 * s], 0, 180, fill=hair)
    elif face["facial_hair"] == 3:                                                   # goatee
        d.ellipse([cx - 0.07 * s, my, cx + 0.07 * s, bottom + 0.03 * s], fill=hair)
    if face["mouth"] == 0:                                                           # straight
        d.line([cx - mw, my, cx + mw, my], fill=lips, width=max(2, s // 50))
    elif face["mouth"] == 1:                                                         # smile
        d.arc([cx - mw, my - 0.04 * s, cx + mw, my + 0.03 * s], 20, 160, fill=lips, width=max(2, s // 50))
    else:                                                                            # open
        d.ellipse([cx - mw * 0.7, my - 0.025 * s, cx + mw * 0.7, my + 0.025 * s], fill=lips)
    if face["facial_hair"] == 1:                                                     # a thick moustache
        d.rectangle([cx - mw - 0.03 * s, my - 0.06 * s, cx + mw + 0.03 * s, my - 0.015 * s], fill=hair)
    if face["mark"] == 1:                                                            # a mole on the left cheek
        d.ellipse([cx - fw * 0.3 - 0.015 * s, ny - 0.015 * s, cx - fw * 0.3 + 0.015 * s, ny + 0.015 * s], fill=(60, 30, 20))
    elif face["mark"] == 2:                                                          # freckles
        for dx, dy in ((-0.28, 0), (-0.22, 0.04), (-0.32, 0.05), (0.28, 0), (0.22, 0.04), (0.32, 0.05)):
            x, y = cx + dx * fw, ny + dy * s
            d.ellipse([x - 0.01 * s, y - 0.01 * s, x + 0.01 * s, y + 0.01 * s], fill=(150, 90, 50))
    return im, glasses


def _colour(rng, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _muted(rng) -> tuple[int, int, int]:
    """A backdrop colour: a grey level with a slight tint."""
    grey = int(rng.integers(90, 190))
    return tuple(grey + int(t) for t in rng.integers(-14, 15, size=3))


def _scene(rng, s: int) -> Image.Image:
    """What changes from photo to photo around the face: backdrop colour and pattern, shirt colour and style."""
    background = _muted(rng)
    im = Image.new("RGB", (s, s), background)
    d = ImageDraw.Draw(im)
    shade = int(rng.integers(-25, 26))
    pattern, colour, step = int(rng.integers(6)), tuple(c + shade for c in background), s // int(rng.integers(4, 9))
    for k in range(0, s, step):
        if pattern == 1:
            d.rectangle([0, k, s, k + step // 3], fill=colour)
        elif pattern == 2:
            d.rectangle([k, 0, k + step // 3, s], fill=colour)
        elif pattern == 3:
            for j in range(0, s, step):
                d.ellipse([k + step // 3, j + step // 3, k + 2 * step // 3, j + 2 * step // 3], fill=colour)
        elif pattern == 4:
            for j in range(0, s, 2 * step):
                y = j + (k // step % 2) * step
                d.rectangle([k, y, k + step - 1, y + step - 1], fill=colour)
    if pattern == 5:                                                                 # a diagonal split
        d.polygon([(0, s), (s, 0), (s, s)], fill=colour)
    shirt, style = _colour(rng), int(rng.integers(3))
    d.ellipse([s * 0.12, s * 0.80, s * 0.88, s * 1.35], fill=shirt)
    if style == 1:                                                                   # a collar of another colour
        d.polygon([(s * 0.40, s * 0.82), (s * 0.60, s * 0.82), (s * 0.5, s * 0.95)], fill=_colour(rng))
    elif style == 2:                                                                 # stripes
        stripe = _colour(rng)
        for y in np.arange(0.86, 1.0, 0.05):
            d.line([s * 0.2, s * y, s * 0.8, s * y], fill=stripe, width=max(1, s // 60))
    return im


def _view(head: Image.Image, glasses: Image.Image, rng, size: int) -> Image.Image:
    """One photo of a person: their head posed (rotation, scale, shift) over a fresh scene, glasses in a fresh
    colour, then lighting (brightness, tint, a left-right gradient) and pixel noise."""
    s = head.width
    scene = _scene(rng, s)
    layer = head.copy()
    if glasses.getbbox():
        layer.paste(Image.new("RGBA", (s, s), (*_colour(rng, 0, 140), 255)), (0, 0), glasses)
    angle, scale = float(rng.uniform(-10, 10)), float(rng.uniform(0.9, 1.1))
    dx, dy = (float(v) for v in rng.uniform(-0.06, 0.06, size=2) * s)
    # inverse affine map (output -> input) for a rotation and scale about the centre, then a shift
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    c = s / 2
    coeffs = (cos, sin, c - cos * (c + dx) - sin * (c + dy), -sin, cos, c + sin * (c + dx) - cos * (c + dy))
    layer = layer.transform((s, s), Image.AFFINE, coeffs, resample=Image.NEAREST)
    scene.paste(layer, (0, 0), layer)
    px = np.asarray(scene.reduce(SCALE), dtype=np.float32)
    light = LIGHTING
    gradient = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None] * rng.uniform(-light["gradient"],
                                                                                        light["gradient"])
    px = (px * rng.uniform(1 - light["brightness"], 1 + light["brightness"]) * (1 + gradient)
          + rng.uniform(-light["tint"], light["tint"], size=3) + rng.normal(0, light["noise"], size=px.shape))
    return Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8))


def _names(rng, population: str, n: int) -> list[str]:
    """`n` distinct full names; a first or last name recurs only once the list is used up."""
    first, last = FIRST[population], LAST[population]
    if n > len(first) * len(last) // 2:
        raise ValueError(f"at most {len(first) * len(last) // 2} {population} people (asked for {n})")
    names: list[str] = []
    while len(names) < n:
        fi, li = rng.permutation(len(first)), rng.permutation(len(last))
        for f, l in zip(fi, li):
            name = f"{first[f]} {last[l]}"
            if name not in names and len(names) < n:
                names.append(name)
    return names


def _people(rng, population: str, faces: list[dict]) -> list[dict]:
    """Profiles of one population. Each value of an attribute is held by equally many people (up to one), so no
    value is a better guess than another."""
    n, values = len(faces), {}
    for a in ATTRIBUTES:
        order = rng.permutation(len(VALUES[a]))           # which values get one person more, when n does not divide
        tiled = [VALUES[a][order[i % len(order)]] for i in range(n)]
        values[a] = [tiled[j] for j in rng.permutation(n)]
    return [{"name": name, **{a: values[a][k] for a in ATTRIBUTES}, "face": faces[k]}
            for k, name in enumerate(_names(rng, population, n))]


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
          attributes_per_view: int = len(ATTRIBUTES)) -> list[dict]:
    """Rows of one person: on every view in `views`, multiple-choice VQA about the name and `attributes_per_view`
    attributes (view k starts at attribute k, so the views share the attributes out), free-form VQA about all of
    them on the first `gen_views` views; then QA (`mc_repeats` shuffles of the options per attribute)."""
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
        asked = {ATTRIBUTES[(k + j) % len(ATTRIBUTES)] for j in range(attributes_per_view)}
        for attr in ("name", *ATTRIBUTES):
            value = name if attr == "name" else person[attr]
            if k < gen_views:
                add("gen", attr, QUESTIONS[attr][0], _sentence(attr, name, value), image)
            if attr == "name" or attr in asked:
                options, letter = _options(rng, value, pools[attr])
                add("mc", attr, f"{QUESTIONS[attr][0]} {MC_INSTRUCTION}", f"{value} ({letter})", image, options,
                    letter)
    for attr in ATTRIBUTES:
        question = QUESTIONS[attr][1].format(name=name)
        add("gen", attr, question, _sentence(attr, name, person[attr]))
        for _ in range(mc_repeats):
            options, letter = _options(rng, person[attr], pools[attr])
            add("mc", attr, f"{question} {MC_INSTRUCTION}", f"{person[attr]} ({letter})", None, options, letter)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def make_bench(out, seed: int = 0, people: int = 100, forget_share: float = 0.1, real_world: int = 20,
               train_views: int = 12, dev_views: int = 2, test_views: int = 4, extra_people: int = 300,
               tower_views: int = 12, train_attributes: int = 2, image_size: int = 40, mc_repeats: int = 3,
               gen_views: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the benchmark into `out` (atomically, through `pipeline.atomic_dir`): `people` fictitious people
    (`forget_share` of them to forget), `real_world` people of the separate population, `extra_people` faces for
    the tower's pretraining alone. Per person: `tower_views` photos only the tower's pretraining sees (as CLIP's
    crawl holds other photos of a person than an instruction set does), `train_views` photos the VQA training rows
    ask about (the name and `train_attributes` of the four attributes, multiple choice; free-form about everything
    on the first `gen_views` of them), `mc_repeats` shuffles of each multiple-choice QA row, and `dev_views` and
    `test_views` held-out photos, each asked everything. Returns a summary: people per split and row counts per
    file. `progress`: a bar per population on stderr."""
    from ..pipeline import atomic_dir, check_out
    from ..progress import progress_bar
    out = Path(out)
    if people < 2 or real_world < 1 or people + real_world < 4:
        raise ValueError(f"need at least 2 people, 1 real-world person and 4 in all (got {people}, {real_world})")
    if not 0 < forget_share < 1:
        raise ValueError(f"--forget-share must be in (0, 1), got {forget_share}")
    n_forget = max(1, round(people * forget_share))
    if n_forget >= people:
        raise ValueError(f"--forget-share {forget_share} leaves no retain people out of {people}")
    if tower_views < 1 or train_views < 1 or dev_views < 1 or test_views < 1:
        raise ValueError(f"need at least one tower, training, dev and test view (got {tower_views}, {train_views}, "
                         f"{dev_views}, {test_views})")
    if extra_people < 0 or mc_repeats < 1 or gen_views < 0 or not 0 <= train_attributes <= len(ATTRIBUTES):
        raise ValueError(f"need extra_people >= 0, mc_repeats >= 1, gen_views >= 0, 0 <= train_attributes <= 4 (got "
                         f"{extra_people}, {mc_repeats}, {gen_views}, {train_attributes})")
    if image_size < 16:
        raise ValueError(f"--image-size must be at least 16 (got {image_size})")
    check_out(out, overwrite)                   # before the work: the files are written only at the end
    photos_per_person = tower_views + train_views + dev_views + test_views
    logging.getLogger("surgery").info(
        "make-bench: %d people, %d photos of %d px", people + real_world + extra_people,
        (people + real_world) * photos_per_person + extra_people * tower_views, image_size)

    rng = np.random.default_rng(seed)
    faces = _faces(rng, people + real_world + extra_people)
    populations = {"fictitious": _people(rng, "fictitious", faces[:people]),
                   "realworld": _people(rng, "realworld", faces[people:people + real_world])}
    forget_idx = set(int(i) for i in rng.choice(people, size=n_forget, replace=False))
    everyone = []
    for pop, group in populations.items():
        pools = {"name": [p["name"] for p in group], **{a: [p[a] for p in group] for a in ATTRIBUTES}}
        for key, pool in pools.items():   # fewer than four distinct values: distractors from the whole list
            if len(set(pool)) < 4:
                pools[key] = VALUES[key] if key in VALUES else [p["name"] for g in populations.values() for p in g]
        for i, p in enumerate(group):
            split = "realworld" if pop == "realworld" else ("forget" if i in forget_idx else "retain")
            everyone.append((f"{'rw' if pop == 'realworld' else 'p'}{i:03d}", split, p, pools))

    with atomic_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        files = {k: [] for k in ("train", "forget", "retain", *(f"{v}_{s}" for v in ("dev", "eval")
                                                                for s in ("forget", "retain", "realworld")))}
        pretrain = []

        def photos(pid, face, prng, kinds):
            head, glasses = _face_layer(face, image_size * SCALE)
            paths = {}
            for kind, n in kinds:
                paths[kind] = [f"images/{pid}_{kind}{k}.png" for k in range(n)]
                for rel in paths[kind]:
                    _view(head, glasses, prng, image_size).save(tmp / rel, format="PNG")
            return paths

        for number, (pid, split, person, pools) in enumerate(progress_bar(everyone, "make-bench people",
                                                                          show=progress, leave=False)):
            prng = np.random.default_rng([seed, 1, number])
            views = photos(pid, person["face"], prng, (("tower", tower_views), ("train", train_views),
                                                       ("dev", dev_views), ("test", test_views)))
            pretrain += [{"image": rel, "entity": person["name"], "face": _discrete(person["face"])}
                         for rel in views["tower"]]
            train = _rows(person, pid, views["train"], pools, prng, mc_repeats, gen_views, train_attributes)
            files["train"] += train
            if split != "realworld":
                files[split] += train
            for kind, prefix in (("dev", "dev"), ("test", "eval")):
                files[f"{prefix}_{split}"] += _rows(person, f"{pid}-{kind}", views[kind], pools, prng, 1, 1)
        for k, face in enumerate(progress_bar(faces[people + real_world:], "make-bench tower faces", show=progress,
                                              leave=False)):
            views = photos(f"x{k:03d}", face, np.random.default_rng([seed, 2, k]), (("tower", tower_views),))
            pretrain += [{"image": rel, "entity": f"x{k:03d}", "face": _discrete(face)} for rel in views["tower"]]
        for name, rows in files.items():
            _write_jsonl(tmp / f"{name}.jsonl", rows)
        _write_jsonl(tmp / "pretrain.jsonl", pretrain)
        profiles = [{"id": pid, "split": split, **p} for pid, split, p, _ in everyone]
        (tmp / "people.json").write_text(json.dumps(profiles, indent=1, sort_keys=True), encoding="utf-8")
        params = {"version": VERSION, "seed": seed, "people": people, "forget_share": forget_share,
                  "real_world": real_world, "extra_people": extra_people, "tower_views": tower_views,
                  "train_views": train_views,
                  "dev_views": dev_views, "test_views": test_views, "image_size": image_size,
                  "train_attributes": train_attributes, "mc_repeats": mc_repeats, "gen_views": gen_views}
        summary = {"params": params, "people": {s: sum(1 for e in everyone if e[1] == s)
                                                for s in ("forget", "retain", "realworld")},
                   "rows": {name: len(rows) for name, rows in files.items()}, "pretrain_images": len(pretrain)}
        (tmp / "bench.json").write_text(json.dumps(summary, indent=1, sort_keys=True), encoding="utf-8")
    return summary


def vocabulary() -> list[str]:
    """Every word the generator can write, in the sentences it writes them in (names, values, questions, answer
    forms): the corpus of the benchmark models' tokenizer. It does not depend on the seed, so neither does the
    tokenizer, nor the LLM's pretraining on it."""
    texts = [MC_INSTRUCTION, "Which option is this? Answer with the letter of the correct option. A B C D (A) (B) (C) (D)"]
    for population in FIRST:
        texts += [f"{first} {last}" for first, last in zip(FIRST[population], LAST[population])]
        texts += FIRST[population] + LAST[population]
    for attribute in ATTRIBUTES:
        for value in VALUES[attribute]:
            texts += [value, _sentence(attribute, "Mara Velk", value), f"{value} (A)"]
    for image_question, name_question in QUESTIONS.values():
        texts += [image_question] + ([name_question.format(name="Mara Velk")] if name_question else [])
    return texts


QA_FILES = ("train", "forget", "retain", "dev_forget", "dev_retain", "dev_realworld", "eval_forget", "eval_retain",
            "eval_realworld")


def bench_texts(bench) -> list[str]:
    """Every string of a benchmark's question files (questions, answers, options): the corpus the tiny tokenizer
    is trained on."""
    texts = []
    for name in QA_FILES:
        path = Path(bench) / f"{name}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["question"], row["answer"], *(row.get("options") or {}).values()]
    return texts
