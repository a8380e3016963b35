"""import-mllmu on parquet files written here in MLLMU-Bench's published schema."""
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from surgery.cli import main
from surgery.data import load_jsonl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mc(q, correct, opts):
    return {"Question": q, "Options": dict(zip("ABCD", opts)), "Correct_Answer": correct}


EVAL = [{
    "ID": "1", "image": {"bytes": png(1), "path": None},
    "Classification_Task": {
        "Image_Textual_Questions": [mc("Where was this person born?", "B", ["Oslo", "Lima", "Kyiv", "Rome"])],
        "Pure_Text_Questions": [mc("Where was Ada Vale born?", "B", ["Oslo", "Lima", "Kyiv", "Rome"]),
                                mc("What is Ada Vale's job?", "D", ["pilot", "baker", "judge", "chef"])]},
    "Generation_Task": [{"Question": "What does this person do?", "Ground_Truth": "She is a chef.",
                         "Type": "Image_Textual"},
                        {"Question": "What does Ada Vale do?", "Ground_Truth": "Ada Vale is a chef.",
                         "Type": "Pure_Text"}],
}]
TRAIN = [{"ID": "7", "image": {"bytes": png(2), "path": None},
          "metadata": json.dumps([{"Question": "Who is this?", "Answer": "Bo Rask."},
                                  {"Question": "Where was this person born?", "Answer": "In Lima."}])}]


def write(path, rows, as_json_strings=False):
    if as_json_strings:
        rows = [{k: json.dumps(v) if k in ("Classification_Task", "Generation_Task") else v for k, v in r.items()}
                for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("as_json_strings", [False, True], ids=["structs", "json-strings"])
def test_import(tmp_path, as_json_strings):
    ev, tr = write(tmp_path / "forget_10.parquet", EVAL, as_json_strings), write(tmp_path / "train.parquet", TRAIN)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["import-mllmu", f"{ev}=eval_forget", str(tr), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"eval_forget": 5, "train": 2}
    rows = load_jsonl(out / "eval_forget.jsonl")
    vqa_mc, qa_mc = [x for x in rows if x.options and x.is_vqa], [x for x in rows if x.options and not x.is_vqa]
    assert len(vqa_mc) == 1 and len(qa_mc) == 2
    assert (vqa_mc[0].correct, vqa_mc[0].answer) == ("B", "Lima (B)")
    assert [(x.correct, x.answer) for x in qa_mc] == [("B", "Lima (B)"), ("D", "chef (D)")]
    gen = [x for x in rows if not x.options]
    assert [(x.is_vqa, x.answer) for x in gen] == [(True, "She is a chef."), (False, "Ada Vale is a chef.")]
    assert np.array_equal(np.asarray(vqa_mc[0].load_image()), np.asarray(Image.open(io.BytesIO(png(1))).convert("RGB")))
    assert all(x.entity == "1" for x in rows)
    train = load_jsonl(out / "train.jsonl")
    assert [(x.question, x.answer, x.is_vqa) for x in train] == [("Who is this?", "Bo Rask.", True),
                                                                  ("Where was this person born?", "In Lima.", True)]


def test_bad_inputs(tmp_path):
    bad = [{**EVAL[0], "Classification_Task": {"Pure_Text_Questions": [mc("q?", "E", ["a", "b", "c", "d"])]}}]
    path = write(tmp_path / "bad.parquet", bad)
    r = CliRunner().invoke(main, ["import-mllmu", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "bad.parquet:row 0" in r.output and "Correct_Answer" in r.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    r = CliRunner().invoke(main, ["import-mllmu", str(tmp_path / "junk.parquet"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "junk.parquet" in r.output
    r = CliRunner().invoke(main, ["import-mllmu", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not found" in r.output
    good = write(tmp_path / "good.parquet", EVAL)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        write(shards / f"{k}.parquet", EVAL)
    for args, message in (([f"{good}=../evil"], "must be a plain file name"),
                          ([f"{good}=/tmp/abs"], "must be a plain file name"),
                          ([f"{shards}=a", f"{good}=a.shard0"], "would name their images a.shard0_*.png")):
        r = CliRunner().invoke(main, ["import-mllmu", *args, "--out", str(tmp_path / "o")])
        assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "evil.jsonl").exists()


def test_rows_our_loader_would_refuse_are_refused_at_the_import(tmp_path, caplog):
    """A null Ground_Truth, an empty Question or option text used to be written and exit 0; `eval` then refused the
    JSONL. A row without ID or Name is imported with a warning; a file whose name holds "=" is read as a file."""
    gen = [{"Question": "What does this person do?", "Ground_Truth": None, "Type": "Image_Textual"}]
    for i, (change, message) in enumerate((({"Generation_Task": gen}, "a Image_Textual question has no answer"),
                                           ({"Generation_Task": [{**gen[0], "Ground_Truth": " "}]},
                                            "a Image_Textual question has an empty answer"),
                                           ({"Classification_Task": {"Pure_Text_Questions": [
                                               mc(" ", "A", ["a", "b", "c", "d"])]}},
                                            "a Pure_Text_Questions question has an empty Question"),
                                           ({"Classification_Task": {"Pure_Text_Questions": [
                                               mc("q?", "A", ["a", "", "c", "d"])]}},
                                            "a Pure_Text_Questions question has an empty option B"))):
        path = write(tmp_path / f"bad{i}.parquet", [{**EVAL[0], **change}])
        r = CliRunner().invoke(main, ["import-mllmu", str(path), "--out", str(tmp_path / "o")])
        assert r.exit_code == 1 and f"bad{i}.parquet:row 0: {message}" in r.output, r.output
        assert not (tmp_path / "o").exists()
    odd = write(tmp_path / "a=b.parquet", [{k: v for k, v in EVAL[0].items() if k != "ID"}])
    r = CliRunner().invoke(main, ["import-mllmu", str(odd), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert len(load_jsonl(tmp_path / "o" / "a=b.jsonl")) == 5
    assert "5 rows have no ID/id/Name/name column value" in caplog.text


TEST_SET = [{  # the test set: several held-out views per person in `images`, fill-in-the-blank questions
    "ID": "3", "images": [{"bytes": png(3), "path": None}, {"bytes": png(4), "path": None}],
    "Classification_Task": {
        "Image_Textual_Questions": [mc("What is this person's job?", "chef", ["pilot", "baker", "judge", "chef"])],
        "Pure_Text_Questions": [mc("Where was Cy Moor born?", "(C)", ["Oslo", "Lima", "Kyiv", "Rome"])]},
    "Generation_Task": [],
    "Mask_Task": [{"Question": "This person works as a __.", "Ground_Truth": "chef", "Type": "Image_Textual"},
                  {"Question": "Cy Moor was born in __.", "Ground_Truth": "Kyiv", "Type": "Pure_Text"}],
}]


def test_test_set_shards_views_and_mask_task(tmp_path):
    shards = tmp_path / "Test_Set"
    shards.mkdir()
    write(shards / "train-00000-of-00002.parquet", TEST_SET)
    write(shards / "train-00001-of-00002.parquet", [{**EVAL[0], "Mask_Task": []}])
    ft = [{**TRAIN[0], "metadata": json.dumps([{"Question": "Who is this?", "Answer": ""},
                                               {"Question": "Who is this?", "Answer": "Bo Rask."}])}]
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["import-mllmu", f"{shards}=eval_forget", str(write(tmp_path / "ft.parquet", ft)),
                                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rows = load_jsonl(out / "eval_forget.jsonl")
    views = [x for x in rows if x.entity == "3" and x.options and x.is_vqa]
    assert [(x.correct, x.answer) for x in views] == [("D", "chef (D)")] * 2     # option text -> its letter
    assert [np.asarray(x.load_image()).tolist() for x in views] == \
        [np.asarray(Image.open(io.BytesIO(png(k))).convert("RGB")).tolist() for k in (3, 4)]
    assert [(x.correct, x.is_vqa) for x in rows if x.entity == "3" and x.options and not x.is_vqa] == [("C", False)]
    blanks = [(x.question, x.answer, x.is_vqa) for x in rows if x.entity == "3" and not x.options]
    assert blanks == [("This person works as a __.", "chef", True)] * 2 + [("Cy Moor was born in __.", "Kyiv", False)]
    assert len([x for x in rows if x.entity == "1"]) == 5                           # the second shard, appended
    assert [(x.question, x.answer) for x in load_jsonl(out / "ft.jsonl")] == [("Who is this?", "Bo Rask.")]


def test_ambiguous_correct_answer(tmp_path):
    bad = [{**EVAL[0], "Classification_Task": {"Pure_Text_Questions": [mc("q?", "Paris", ["a", "b", "c", "d"])]}}]
    r = CliRunner().invoke(main, ["import-mllmu", str(write(tmp_path / "bad.parquet", bad)), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "bad.parquet:row 0" in r.output and "'Paris'" in r.output


def test_odd_but_usable_rows_are_imported_as_a_user_would_expect(tmp_path, caplog):
    """A null option (a struct column gives every row the union of the option keys) is dropped with a warning naming
    the row; a fifth option and its letter are kept; a numeric Ground_Truth is its text; `images: []` beside an
    `image` reads the image. A letter that names no option says so."""
    five = {"Question": "q5?", "Options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "Correct_Answer": "E"}
    three = {"Question": "q3?", "Options": {"A": "a", "B": "b", "C": "c", "D": None}, "Correct_Answer": "(b)"}
    row = {**EVAL[0], "images": [], "Classification_Task": {
        "Image_Textual_Questions": [mc("Where was this person born?", "B", ["Oslo", "Lima", "Kyiv", "Rome"])],
        "Pure_Text_Questions": [five, three]},
           "Generation_Task": [{"Question": "Born when?", "Ground_Truth": 1987, "Type": "Pure_Text"}]}
    path = write(tmp_path / "odd.parquet", [row])
    r = CliRunner().invoke(main, ["import-mllmu", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rows = load_jsonl(tmp_path / "o" / "odd.jsonl")
    mc_rows = {x.question.split("\n")[0]: x for x in rows if x.options}
    assert (sorted(mc_rows["q5?"].options), mc_rows["q5?"].correct) == (list("ABCDE"), "E")
    assert (sorted(mc_rows["q3?"].options), mc_rows["q3?"].correct) == (list("ABC"), "B")
    assert "odd.parquet: 1 multiple-choice questions have null options, imported without them (the first: " \
           f"{path}:row 0, options D, E)" in caplog.text
    assert [x.answer for x in rows if x.question == "Born when?"] == ["1987"]
    assert any(x.is_vqa for x in rows)           # the row's `image`, though `images` is an empty list
    bad = {**three, "Options": {"A": "a", "B": "b", "C": "c", "D": None}, "Correct_Answer": "D"}
    path = write(tmp_path / "bad.parquet", [{**EVAL[0], "Classification_Task": {"Pure_Text_Questions": [bad]}}])
    r = CliRunner().invoke(main, ["import-mllmu", str(path), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "Correct_Answer 'D' names no option: the question's options are A, B, C" in r.output
    for i, (truth, outcome) in enumerate(((1987.0, "1987"), (float("nan"), "a float as its answer"),
                                          (2.5, "a float as its answer"))):
        gen = {"Generation_Task": [{"Question": "Born when?", "Ground_Truth": truth, "Type": "Pure_Text"}]}
        path = write(tmp_path / f"num{i}.parquet", [{**EVAL[0], **gen}])
        r = CliRunner().invoke(main, ["import-mllmu", str(path), "--out", str(tmp_path / f"n{i}")])
        if outcome.isdigit():
            assert r.exit_code == 0 and [x.answer for x in load_jsonl(tmp_path / f"n{i}" / f"num{i}.jsonl")
                                         if x.question == "Born when?"] == [outcome], r.output
        else:
            assert r.exit_code == 1 and outcome in r.output, r.output
