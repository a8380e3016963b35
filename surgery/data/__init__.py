"""JSONL rows -> the four splits fvqa / fqa / rvqa / rqa, validated before any model work starts."""
import difflib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

SPLITS = ("fvqa", "fqa", "rvqa", "rqa")
FIELDS = {"question": str, "answer": str, "image": str, "options": dict, "correct": str, "entity": str, "id": (str, int)}
NOTES = ("task", "attribute", "face")   # fields the benchmark's own files carry for people, not for surgery
log = logging.getLogger("surgery")
_unread_said: set = set()               # (file, field) pairs already warned about in this process


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Row:
    question: str
    answer: str
    image: Path | None = None          # resolved against the JSONL file's folder
    options: dict[str, str] | None = None
    correct: str | None = None
    entity: str | None = None
    id: str | None = None
    where: str = ""                    # "file.jsonl:17", for messages

    @property
    def is_vqa(self) -> bool:
        return self.image is not None

    def prompt(self) -> str:
        """The question, with its options listed when it is multiple choice."""
        if not self.options:
            return self.question
        return self.question + "\n" + "\n".join(f"{k}. {v}" for k, v in sorted(self.options.items()))

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        with Image.open(self.image) as im:
            return im.convert("RGB")


def _image(value: str, where: str, base: Path, check: bool, decoded: set) -> Path:
    """The image path `value` resolved against `base`; with `check`, it must exist and decode, once: `decoded` holds
    the paths already decoded (a photo that many rows share), and this one is added."""
    image = (base / value).resolve()
    if check and image not in decoded:
        if not image.is_file():
            raise DataError(f"{where}: 'image' file not found: {value}")
        try:
            with Image.open(image) as im:
                im.load()  # decodes every pixel: verify() passes a PNG whose chunks check out but whose stream is bad
        except Exception as e:
            raise DataError(f"{where}: 'image' cannot be decoded: {value} ({e})") from None
        decoded.add(image)
    return image


def _row(obj, where: str, base: Path, check_images: bool, decoded: set) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
    for key, value in obj.items():
        if key in FIELDS and value is not None and not isinstance(value, FIELDS[key]):
            raise DataError(f"{where}: field {key!r} must be {getattr(FIELDS[key], '__name__', 'str or int')}, "
                            f"got {type(value).__name__}")
    for key in ("question", "answer"):
        if not obj[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
    if obj.get("image") == "":
        raise DataError(f"{where}: field 'image' is empty (leave it out, or null, for a question without a photo)")
    options, correct = obj.get("options"), obj.get("correct")
    if (options is None) != (correct is None):
        raise DataError(f"{where}: {'options' if correct is None else 'correct'!r} without "
                        f"{'correct' if correct is None else 'options'!r}: a multiple-choice row needs both")
    if options is not None:
        if not options or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items()):
            raise DataError(f"{where}: 'options' must map letters to answer texts, e.g. {{\"A\": \"pilot\"}}")
        if correct not in options:
            raise DataError(f"{where}: 'correct' is {correct!r}, not one of the options {sorted(options)}")
    image = _image(obj["image"], where, base, check_images, decoded) if obj.get("image") else None
    return Row(obj["question"], obj["answer"], image, options, correct, obj.get("entity"),
               None if obj.get("id") is None else str(obj["id"]), where)


def _objects(path: Path):
    """(JSON value, "file:line") for every non-empty line of a JSONL file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line.rstrip("\r\n")), where  # a column past the newline would say column 1
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def load_jsonl(path, check_images: bool = True) -> list[Row]:
    """Rows of a JSONL file; every problem raises DataError naming `file:line`."""
    path = Path(path)
    decoded, unknown = set(), {}
    rows = []
    for obj, where in _objects(path):
        rows.append(_row(obj, where, path.parent, check_images, decoded))
        for key in obj:
            if key not in FIELDS and key not in NOTES:
                unknown.setdefault(key, where)
    if not rows:
        raise DataError(f"{path}: no rows")
    _unique_ids(rows)
    for key, where in unknown.items():   # a misspelt "image" would silently make a photo question a text one
        if (path.resolve(), key) in _unread_said:
            continue
        _unread_said.add((path.resolve(), key))
        near = difflib.get_close_matches(key.lower(), FIELDS, n=1, cutoff=0.75)
        log.warning("%s: field %r is not one surgery reads (%s), and is ignored%s", where, key, ", ".join(FIELDS),
                    f": did you mean {near[0]!r}?" if near else "")
    return rows


def _unique_ids(rows: list[Row]) -> None:
    """Refuse an "id" that two rows share (a file merged twice, or a row both to forget and to keep), naming both."""
    first: dict[str, str] = {}
    for r in rows:
        if r.id is not None:
            if r.id in first:
                raise DataError(f"{r.where}: id {r.id!r} is already the id of {first[r.id]}: row ids must be unique")
            first[r.id] = r.where


def load_images(path, exclude: set[Path] = frozenset()) -> list[Row]:
    """Photos without labels: a JSONL file with an "image" path per line (other fields are ignored), as rows with an
    empty question and no answer. A photo in `exclude` (e.g. a forget photo) is refused; so is every problem a row of
    `load_jsonl` would be refused for, naming `file:line`."""
    path = Path(path)
    rows, decoded = [], set()
    for obj, where in _objects(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            raise DataError(f"{where}: expected a JSON object with an 'image' path")
        image = _image(obj["image"], where, path.parent, True, decoded)
        if image in exclude:
            raise DataError(f"{where}: {obj['image']} is a forget photo: distilling it would keep what the run is to "
                            "forget")
        rows.append(Row("", None, image, where=where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


@dataclass
class Splits:
    fvqa: list[Row] = field(default_factory=list)
    fqa: list[Row] = field(default_factory=list)
    rvqa: list[Row] = field(default_factory=list)
    rqa: list[Row] = field(default_factory=list)
    held_back: list[Row] = field(default_factory=list)   # forget-VQA rows kept out of training (`hold_back`)

    def __getitem__(self, name: str) -> list[Row]:
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLITS} | ({"held_back": len(self.held_back)} if self.held_back else {})


def check_placeholder(rows: list[Row], mark: str | None) -> None:
    """No question, answer or option may hold `mark`, the model's image token: the inputs would read it as a slot
    for a photo's features."""
    if not mark:
        return
    for row in rows:
        texts = {"question": row.question, "answer": row.answer,
                 **{f"option {k}": v for k, v in (row.options or {}).items()}}
        hit = next((f for f, t in texts.items() if t and mark in t), None)
        if hit:
            raise DataError(f"{row.where}: its {hit} holds the model's image token {mark!r}, which the inputs would "
                            "read as a slot for a photo's features; remove it (the photo is placed by the row's "
                            "'image')")


def hold_back(splits: Splits, share: float, seed: int) -> Splits:
    """`splits` with a `share` of each forget person's photos (at least one of every person with two or more; none
    of a person with one) kept out: every forget-VQA row about a held-back photo moves from fvqa to held_back.
    Rows without an entity count as one person. A photo several people share (a group photo) is held back only if
    each of them keeps another one. The photos are drawn with `seed`; the same rows give the same split."""
    photos: dict[str | None, set[str]] = {}      # person -> their photos
    owners: dict[str, set] = {}                  # photo -> the people in it
    for r in splits.fvqa:
        photos.setdefault(r.entity, set()).add(str(r.image))
        owners.setdefault(str(r.image), set()).add(r.entity)
    rng = random.Random(seed)
    held = set()
    for entity in sorted(photos, key=str):
        names = sorted(photos[entity])
        if len(names) >= 2:
            for photo in rng.sample(names, min(len(names) - 1, max(1, round(share * len(names))))):
                if photo not in held and all(photos[e] - held - {photo} for e in owners[photo]):
                    held.add(photo)
    out = replace(splits, fvqa=[r for r in splits.fvqa if str(r.image) not in held],
                  held_back=[r for r in splits.fvqa if str(r.image) in held])
    if not any(r.options for r in out.held_back):
        raise DataError("--stop-forget-accuracy: no multiple-choice forget-VQA row to hold back (it needs a forget "
                        "person with two or more photos and rows with options)")
    return out


def load_splits(forget, retain) -> Splits:
    """The four splits from the forget and retain files. The method needs forget-VQA and retain-VQA rows."""
    if Path(forget).resolve() == Path(retain).resolve():
        raise DataError(f"--forget and --retain are the same file ({forget}): the rows to forget and the rows to "
                        "keep must differ")
    f, r = load_jsonl(forget), load_jsonl(retain)
    _unique_ids(f + r)
    splits = Splits([x for x in f if x.is_vqa], [x for x in f if not x.is_vqa],
                    [x for x in r if x.is_vqa], [x for x in r if not x.is_vqa])
    if not splits.fvqa:
        raise DataError(f"{forget}: no rows with an image: the forget-VQA split (fvqa) is empty")
    if not splits.rvqa:
        raise DataError(f"{retain}: no rows with an image: the retain-VQA split (rvqa) is empty")
    return splits
