"""MLLMU-Bench parquet -> our JSONL + PNG files, so users with the real benchmark can run every command on it.

Schema read (per row): `image` {"bytes": PNG/JPEG bytes}; evaluation rows carry `Classification_Task`
{"Image_Textual_Questions": [...], "Pure_Text_Questions": [...]} of {"Question", "Options": {"A".."D"},
"Correct_Answer"} and `Generation_Task` [{"Question", "Ground_Truth", "Type"}] (Type naming "Image" means the
question is asked with the image); training rows carry `metadata`, a JSON string of [{"Question", "Answer"}]
pairs, asked with the image (VQA rows). Nested fields may also arrive as JSON strings; both are accepted.
Multiple-choice answers are written as "<option text> (<letter>)", the form `surgery eval` scores."""
import io
import json
from pathlib import Path

from PIL import Image

from ..data import DataError

ID_COLUMNS = ("ID", "id", "Name", "name")


def _field(value, where: str, name: str):
    """A nested field that may be stored as a struct or as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {name} is not valid JSON ({e.msg})") from None
    return value


def _mc(q: dict, where: str) -> dict:
    try:
        options, correct = {k: str(v) for k, v in q["Options"].items() if v is not None}, q["Correct_Answer"]
        question = q["Question"]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: a classification question lacks {e}") from None
    correct = str(correct).strip().rstrip(".").upper()[:1]
    if correct not in options:
        raise DataError(f"{where}: Correct_Answer {q['Correct_Answer']!r} is not one of the options {sorted(options)}")
    return {"question": question, "options": options, "correct": correct,
            "answer": f"{options[correct]} ({correct})", "task": "mc"}


def convert_rows(table_rows: list[dict], source: str, image_dir: Path, stem: str) -> list[dict]:
    """Our rows for one parquet table (a list of row dicts); images are written into image_dir."""
    out = []
    for i, row in enumerate(table_rows):
        where = f"{source}:row {i}"
        entity = next((str(row[c]) for c in ID_COLUMNS if row.get(c) is not None), None)
        image = None
        if row.get("image") is not None:
            data = row["image"].get("bytes") if isinstance(row["image"], dict) else row["image"]
            if not data:
                raise DataError(f"{where}: column 'image' has no bytes")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    image = f"images/{stem}_{i:05d}.png"
                    im.convert("RGB").save(image_dir / Path(image).name, format="PNG")
            except OSError as e:
                raise DataError(f"{where}: the image cannot be decoded ({e})") from None

        def add(rec: dict, with_image: bool, kind: str):
            if with_image and image is None:
                raise DataError(f"{where}: an image question but the row has no image")
            rec = {**rec, "image": image if with_image else None, "entity": entity, "id": f"{stem}-{i}-{len(out)}",
                   "attribute": kind}
            out.append({k: v for k, v in rec.items() if v is not None})

        cls = _field(row.get("Classification_Task"), where, "Classification_Task")
        if cls:
            for key, with_image in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False)):
                for q in _field(cls.get(key), where, key) or []:
                    add(_mc(q, where), with_image, key)
        for q in _field(row.get("Generation_Task"), where, "Generation_Task") or []:
            try:
                rec = {"question": q["Question"], "answer": q["Ground_Truth"], "task": "gen"}
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: a generation question lacks {e}") from None
            add(rec, "image" in str(q.get("Type", "")).lower(), str(q.get("Type", "gen")))
        meta = _field(row.get("metadata"), where, "metadata")
        for qa in meta or []:
            try:
                rec = {"question": qa["Question"], "answer": qa["Answer"], "task": "gen"}
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: a metadata pair lacks {e}") from None
            add(rec, True, "train")
    return out


def import_mllmu(sources: list[str], out, overwrite: bool = False) -> dict:
    """Convert each `PARQUET` or `PARQUET=NAME` into OUT/NAME.jsonl (NAME defaults to the file's stem) with its
    images in OUT/images/. Written atomically. Returns {NAME: row count}."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("import-mllmu needs pyarrow: pip install 'mllm-surgery[mllmu]'") from None
    from ..pipeline import atomic_dir
    if not sources:
        raise ValueError("import-mllmu: give at least one parquet file")
    jobs = []
    for s in sources:
        path, _, name = s.partition("=")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        jobs.append((path, name or path.stem))
    names = [n for _, n in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"import-mllmu: two inputs map to the same output name ({names}); use PARQUET=NAME")
    counts = {}
    with atomic_dir(Path(out), overwrite) as tmp:
        (tmp / "images").mkdir()
        for path, name in jobs:
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            converted = convert_rows(rows, str(path), tmp / "images", name)
            if not converted:
                raise DataError(f"{path}: no Classification_Task, Generation_Task or metadata questions found")
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in converted),
                                               encoding="utf-8")
            counts[name] = len(converted)
    return counts
