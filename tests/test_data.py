import json
import zlib

import pytest
from PIL import Image

from surgery.data import DataError, load_jsonl, load_splits


def write(path, lines):
    path.write_bytes(b"".join(l if isinstance(l, bytes) else (l if isinstance(l, str) else json.dumps(l) + "\n")
                              .encode() for l in lines))
    return path


def test_rows_and_splits(data):
    splits = load_splits(*data)
    assert splits.counts() == {"fvqa": 5, "fqa": 3, "rvqa": 7, "rqa": 4}
    row = splits.fqa[0]
    assert row.prompt().endswith("A. Oslo\nB. Lima\nC. Kyiv\nD. Rome") and row.where.endswith("forget.jsonl:6")
    assert splits.fvqa[0].load_image().mode == "RGB"


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"\n', "malformed JSON"),
    ('[1, 2]\n', "expected a JSON object"),
    ({"question": "q"}, "missing field 'answer'"),
    ({"question": "q", "answer": 3}, "field 'answer' must be str"),
    ({"question": " ", "answer": "a"}, "field 'question' is empty"),
    ({"question": "q", "answer": "a", "options": {"A": "x"}, "correct": "B"}, "'correct' is 'B'"),
    ({"question": "q", "answer": "a", "image": "nope.png"}, "'image' file not found: nope.png"),
    ({"question": "q", "answer": " "}, "field 'answer' is empty"),
    ({"question": "q", "answer": "a", "image": ""}, "field 'image' is empty"),
    ({"question": "q", "answer": "a", "options": {"A": "x", "B": "y"}}, "'options' without 'correct'"),
    ({"question": "q", "answer": "a", "correct": "A"}, "'correct' without 'options'"),
    ({"question": "q", "answer": "a", "options": {}, "correct": "A"}, "'options' must map letters"),
    ({"question": "q", "answer": "a", "options": {"A": 1}, "correct": "A"}, "'options' must map letters"),
    ('{"question": "caf\xe9", "answer": "a"}\n'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at column 18)"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "f.jsonl", [{"question": "ok", "answer": "fine"}, line])
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    assert f"{path}:2: " in str(e.value) and message in str(e.value)


def test_undecodable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write(tmp_path / "f.jsonl", [{"question": "q", "answer": "a", "image": "bad.png"}])
    with pytest.raises(DataError, match="f.jsonl:1: 'image' cannot be decoded: bad.png"):
        load_jsonl(path)
    # chunks whose CRCs check out around a stream that does not inflate: verify() passed it, load() does not
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    at = good.index(b"IDAT")
    size = int.from_bytes(good[at - 4:at], "big")
    garbage = bytes(range(7, 7 + size))
    idat = b"IDAT" + garbage
    (tmp_path / "stream.png").write_bytes(good[:at] + idat + zlib.crc32(idat).to_bytes(4, "big") + good[at + 8 + size:])
    path = write(tmp_path / "g.jsonl", [{"question": "q", "answer": "a", "image": "stream.png"}])
    with pytest.raises(DataError, match="g.jsonl:1: 'image' cannot be decoded: stream.png"):
        load_jsonl(path)


def test_empty_and_missing_files(tmp_path, data):
    with pytest.raises(DataError, match="no rows"):
        load_jsonl(write(tmp_path / "e.jsonl", ["\n", "  \n"]))
    with pytest.raises(DataError, match="file not found"):
        load_jsonl(tmp_path / "absent.jsonl")
    text_only = write(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="forget-VQA split \\(fvqa\\) is empty"):
        load_splits(text_only, data[1])
    with pytest.raises(DataError, match="retain-VQA split \\(rvqa\\) is empty"):
        load_splits(data[0], text_only)


def test_duplicate_ids_name_both_rows(tmp_path, data):
    path = write(tmp_path / "f.jsonl", [{"question": "q", "answer": "a", "id": 7}, {"question": "r", "answer": "b"},
                                        {"question": "s", "answer": "c", "id": "7"}])
    with pytest.raises(DataError, match=f"f.jsonl:3: id '7' is already the id of {path}:1"):
        load_jsonl(path)
    assert len(load_jsonl(write(tmp_path / "g.jsonl", [{"question": "q", "answer": "a", "id": 7},
                                                       {"question": "r", "answer": "b", "id": 8}]))) == 2
    forget, retain = data                       # their rows carry ids: fv0..., rv0...
    rows = [json.loads(line) for line in retain.read_text().splitlines()]
    rows[2]["id"] = "fq1"
    clash = write(retain, rows)
    with pytest.raises(DataError, match=f"{clash}:3: id 'fq1' is already the id of {forget}:7"):
        load_splits(forget, clash)


def test_fields_surgery_does_not_read_are_named_once_per_file(tmp_path, caplog):
    """A misspelt "image" used to turn a photo question into a text one without a word."""
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    rows = [{"question": "Who?", "answer": "Ada", "Image": "a.png", "task": "gen"},
            {"question": "Who?", "answer": "Bo", "Image": "a.png", "notes": "x"},
            {"question": "Job?", "answer": "chef", "image": "a.png", "attribute": "job", "face": 1}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_jsonl(path)
    assert [r.is_vqa for r in loaded] == [False, False, True]
    assert f"{path}:1: field 'Image' is not one surgery reads" in caplog.text and "did you mean 'image'?" in caplog.text
    assert f"{path}:2: field 'notes' is not one surgery reads" in caplog.text
    assert caplog.text.count("'Image'") == 1 and "'task'" not in caplog.text and "'face'" not in caplog.text
