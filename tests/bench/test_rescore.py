"""benchmarks/rescore.py recomputes a demo report's accuracies with plain transformers: it agrees with a real
(quick) demo's report, and it catches a report whose number was changed."""
import ast
import json

import pytest
from click.testing import CliRunner

from surgery.cli import main

from bench_scripts import SCRIPTS, benchmark_script

SCRIPT = SCRIPTS / "rescore.py"


@pytest.fixture(scope="module")
def rescore():
    return benchmark_script("rescore")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cache = out.parent / "cache"
    r = CliRunner().invoke(main, ["demo", "--quick", "--processes", "1", "--out", str(out), "--cache", str(cache)])
    assert r.exit_code == 0, r.output
    return out / "report.json"


def test_rescore_agrees_with_the_demo_report(rescore, demo, tmp_path):
    tree = ast.parse(SCRIPT.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.split(".")[0] == "surgery" for m in imported), imported   # an independent check
    lines_json = tmp_path / "lines.json"
    assert rescore.main([str(demo), "--letter", "--json", str(lines_json)]) == 0
    lines = json.loads(lines_json.read_text())
    report = json.loads(demo.read_text())["per_seed"]["0"]["results"]
    assert {(x["model"], x["split"], x["score"]) for x in lines} == {
        (m, s, k) for m in report for s in ("forget", "retain", "realworld") for k in ("vqa", "qa", "vqa_letter",
                                                                                        "qa_letter")}
    assert all(x["ok"] and x["rows"] > 0 for x in lines)


def test_rescore_catches_a_changed_number(rescore, demo, tmp_path, capsys):
    report = json.loads(demo.read_text())
    report["per_seed"]["0"]["results"]["unlearned"]["retain"]["vqa"] += 10.0
    changed = demo.parent / "report-changed.json"   # beside the original: the unlearned models are found there
    changed.write_text(json.dumps(report))
    assert rescore.main([str(changed), "--models", "unlearned"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "DIFFERS" in line] == [
        line for line in out.splitlines() if "unlearned" in line and "retain" in line and " vqa " in line]
    with pytest.raises(SystemExit, match="seed 7 is not in"):
        rescore.main([str(changed), "--seeds", "7"])


def test_rescore_refuses_bad_input_before_any_work(rescore, demo, tmp_path, capsys):
    """A truncated or foreign report, an unknown model, nonsense numbers and a --json path that cannot be written
    used to be tracebacks (the last after the whole rescoring)."""
    (tmp_path / "cut.json").write_text(demo.read_text()[:100])
    (tmp_path / "empty.json").write_text("{}")
    for args, message in (([str(tmp_path / "cut.json")], "not a JSON file"),
                          ([str(tmp_path / "empty.json")], "not a `surgery demo` report.json"),
                          ([str(demo), "--models", "bogus"], "--models: unknown bogus"),
                          ([str(demo), "--threads", "0"], "--threads must be >= 1"),
                          ([str(demo), "--tolerance", "-1"], "--tolerance >= 0"),
                          ([str(demo), "--json", str(tmp_path / "nodir" / "x.json")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            rescore.main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err, args
