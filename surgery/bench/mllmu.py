"""MLLMU-Bench parquet -> our JSONL + PNG files, so users with the real benchmark can run every command on it.

Schema read (per row, as the official MLLMU-Bench code reads it): `ID`; `image` {"bytes": PNG/JPEG bytes}, or on
the test set `images`, a list of them (held-out views: the image questions are asked once per view); evaluation rows
carry `Classification_Task` {"Image_Textual_Questions": [...], "Pure_Text_Questions": [...]} of {"Question",
"Options": {"A".."D"}, "Correct_Answer": a letter}, `Generation_Task` and `Mask_Task` (fill in the blank "__"), both
[{"Question", "Ground_Truth", "Type": "Image_Textual" | "Pure_Text"}]; training rows (ft_Data) carry `metadata`, a
JSON string of [{"Question", "Answer"}] pairs asked with the image (VQA rows; pairs with an empty side are skipped,
as the official preprocessing does). Nested fields may also arrive as JSON strings; both are accepted. A directory
stands for every parquet file in it (the test set ships as shards). Multiple-choice answers are written as
"<option text> (<letter>)", the form `surgery eval` scores; generation and fill-in-the-blank rows have no options
(ROUGE-L in `surgery eval`)."""
import io
import json
import math
import logging
import re
from pathlib import Path

from PIL import Image

from ..data import DataError

log = logging.getLogger("surgery")
ID_COLUMNS = ("ID", "id", "Name", "name")
LETTER = re.compile(r"^\(?([A-Za-z])[).:]?$")


def _field(value, where: str, name: str):
    """A nested field that may be stored as a struct or as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {name} is not valid JSON ({e.msg})") from None
    return value


def _mc(q: dict, where: str, nulls: list) -> dict:
    """A multiple-choice question; a question with null options appends (where, their letters) to `nulls`."""
    try:
        options = {k: str(_number_text(v)) for k, v in q["Options"].items() if v is not None}
        correct = q["Correct_Answer"]
        question = q["Question"]
        null = sorted(k for k, v in q["Options"].items() if v is None)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: a classification question lacks {e}") from None
    if not options:
        raise DataError(f"{where}: a classification question whose options are all null")
    if null:   # a struct column gives every row the union of the option keys, with nulls where a row has fewer
        nulls.append((where, null))
    letter = LETTER.match(str(correct).strip())
    by_text = [k for k, v in options.items() if v.strip() == str(correct).strip()]
    named = letter.group(1).upper() if letter else None
    correct = named if named in options else (by_text[0] if len(by_text) == 1 else None)
    if correct is None and named is not None:
        raise DataError(f"{where}: Correct_Answer {q['Correct_Answer']!r} names no option: the question's options are "
                        f"{', '.join(sorted(options))}")
    if correct not in options:
        raise DataError(f"{where}: Correct_Answer {q['Correct_Answer']!r} is neither a letter nor the text of one of "
                        f"the options {sorted(options)}")
    return {"question": question, "options": options, "correct": correct,
            "answer": f"{options[correct]} ({correct})", "task": "mc"}


def _images(row: dict, where: str, image_dir: Path, stem: str, i: int) -> list[str]:
    """Write the row's image (`image`) or views (`images`, the test set) as PNG; their paths relative to OUT."""
    values = [v for v in (row.get("images") if row.get("images") else [row.get("image")]) if v is not None]
    paths = []
    for k, value in enumerate(values):
        data = value.get("bytes") if isinstance(value, dict) else value
        if not data:
            raise DataError(f"{where}: an image has no bytes")
        try:
            with Image.open(io.BytesIO(data)) as im:
                paths.append(f"images/{stem}_{i:05d}" + (f"_{k}" if len(values) > 1 else "") + ".png")
                im.convert("RGB").save(image_dir / Path(paths[-1]).name, format="PNG")
        except OSError as e:
            raise DataError(f"{where}: image {k} cannot be decoded ({e})") from None
    return paths


def _number_text(value):
    """A whole number (a year, a count; a float column's 1987.0 too) as its text, as option values are read; any
    other value as it is (a NaN or a fraction is refused by `_check_texts`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if math.isfinite(value) and value == int(value) else value


def _free_form(q, where: str, task: str, answer_key: str) -> dict:
    try:
        return {"question": q["Question"], "task": task, "answer": _number_text(q[answer_key])}
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: a {task} question lacks {e}") from None


def convert_rows(table_rows: list[dict], source: str, image_dir: Path, stem: str) -> list[dict]:
    """Our rows for one parquet table (a list of row dicts); images are written into image_dir."""
    out, skipped, nulls = [], 0, []
    for i, row in enumerate(table_rows):
        where = f"{source}:row {i}"
        entity = next((str(row[c]) for c in ID_COLUMNS if row.get(c) is not None), None)
        images = _images(row, where, image_dir, stem, i)

        def add(rec: dict, with_image: bool, kind: str):
            if with_image and not images:
                raise DataError(f"{where}: an image question but the row has no image")
            _check_texts(rec, where, kind)
            for image in images if with_image else [None]:
                rec = {**rec, "image": image, "entity": entity, "id": f"{stem}-{i}-{len(out)}", "attribute": kind}
                out.append({k: v for k, v in rec.items() if v is not None})

        cls = _field(row.get("Classification_Task"), where, "Classification_Task")
        if cls:
            for key, with_image in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False)):
                for q in _field(cls.get(key), where, key) or []:
                    add(_mc(q, where, nulls), with_image, key)
        for column, task in (("Generation_Task", "gen"), ("Mask_Task", "mask")):
            for q in _field(row.get(column), where, column) or []:
                kind = str(q.get("Type", task)) if isinstance(q, dict) else task
                add(_free_form(q, where, task, "Ground_Truth"), "image" in kind.lower(), kind)
        for qa in _field(row.get("metadata"), where, "metadata") or []:
            rec = _free_form(qa, where, "gen", "Answer")
            if not (str(rec["question"]).strip() and str(rec["answer"]).strip()):
                skipped += 1
                continue
            add(rec, True, "train")
    if skipped:
        log.warning("%s: skipped %d metadata pairs with an empty question or answer", source, skipped)
    if nulls:
        log.warning("%s: %d multiple-choice questions have null options, imported without them (the first: %s, "
                    "option%s %s)", source, len(nulls), nulls[0][0], "s" if len(nulls[0][1]) > 1 else "",
                    ", ".join(nulls[0][1]))
    nameless = sum(1 for r in out if "entity" not in r)
    if nameless:
        log.warning("%s: %d rows have no %s column value: they count as one person in the per-person intervals",
                    source, nameless, "/".join(ID_COLUMNS))
    return out


def _check_texts(rec: dict, where: str, kind: str) -> None:
    """A question, an answer and option texts that are non-empty strings, as `surgery.data` reads them back: an
    evaluation question is refused here, naming the parquet row, not when a later command reads the JSONL."""
    for key in ("question", "answer"):
        value = rec.get(key)
        if not isinstance(value, str) or not value.strip():
            what = "Question" if key == "question" else "answer (Ground_Truth / Answer / the option)"
            raise DataError(f"{where}: a {kind} question has " + (f"no {what}" if value is None else
                            f"an empty {what}" if isinstance(value, str) else
                            f"a {type(value).__name__} as its {what}, not text"))
    empty = sorted(k for k, v in (rec.get("options") or {}).items() if not v.strip())
    if empty:
        raise DataError(f"{where}: a {kind} question has an empty option {empty[0]}")


def import_mllmu(sources: list[str], out, overwrite: bool = False) -> dict:
    """Convert each `PARQUET` or `PARQUET=NAME` (a file, or a directory of shards read in name order) into
    OUT/NAME.jsonl (NAME defaults to the file's stem or the directory's name) with its images in OUT/images/.
    Written atomically. Returns {NAME: row count}."""
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
        if Path(s).exists():            # a file whose name holds "=" is a file, not PARQUET=NAME
            path, name = s, ""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path}: a directory without .parquet files")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"{path}: file not found")
        jobs.append((files, name or path.stem))
    names = [n for _, n in jobs]
    bad = next((n for n in names if n in ("", ".", "..") or "/" in n or "\\" in n), None)
    if bad is not None:
        raise ValueError(f"import-mllmu: output name {bad!r}: NAME must be a plain file name (it becomes "
                         f"OUT/NAME.jsonl)")
    if len(set(names)) != len(names):
        raise ValueError(f"import-mllmu: two inputs map to the same output name ({names}); use PARQUET=NAME")
    stems = [stem for files, name in jobs for stem in ([name] if len(files) == 1 else
                                                       [f"{name}.shard{k}" for k in range(len(files))])]
    clash = next((x for x in stems if stems.count(x) > 1), None)
    if clash is not None:  # the images of two inputs would be written under one name
        raise ValueError(f"import-mllmu: two inputs would name their images {clash}_*.png (a directory's shards are "
                         f"NAME.shard0, NAME.shard1, ...); use another PARQUET=NAME")
    counts = {}
    with atomic_dir(Path(out), overwrite, [("PARQUET", f) for fs, _ in jobs for f in fs]) as tmp:
        (tmp / "images").mkdir()
        for files, name in jobs:
            converted = []
            for k, path in enumerate(files):
                try:
                    rows = pq.read_table(path).to_pylist()
                except Exception as e:
                    raise DataError(f"{path}: not a readable parquet file ({e})") from None
                stem = name if len(files) == 1 else f"{name}.shard{k}"
                converted += convert_rows(rows, str(path), tmp / "images", stem)
            if not converted:
                raise DataError(f"{', '.join(map(str, files))}: no Classification_Task, Generation_Task, Mask_Task "
                                "or metadata questions found")
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in converted),
                                               encoding="utf-8")
            counts[name] = len(converted)
    return counts
