import json

import torch
from safetensors.torch import load_file, save_file

from surgery.bench import result_cache
from surgery.bench.result_cache import cached, files_digest, key_of


def test_cached_reads_what_it_computed_and_recomputes_on_any_change(tmp_path, small_bench, monkeypatch):
    model, cache = tmp_path / "model", tmp_path / "cache"
    model.mkdir()
    save_file({"w": torch.randn(3, 4)}, str(model / "model.safetensors"))
    calls = []
    bench_digest = files_digest(small_bench)

    def step(x, scale=1.0):
        calls.append(x)
        return {"value": x * scale, "pair": (0.1 + 0.2, 1 / 3)}      # a tuple comes back as a list, either way

    first = cached(cache, "eval[reference]", model, bench_digest, {"scale": 2.0}, step, 1.5, scale=2.0)
    again = cached(cache, "eval[reference]", model, bench_digest, {"scale": 2.0}, step, 1.5, scale=2.0)
    assert first == ({"value": 3.0, "pair": [0.1 + 0.2, 1 / 3]}, False) and calls == [1.5]
    assert again == (first[0], True) and calls == [1.5]                 # read back, bit for bit
    [kept] = (cache / "results").iterdir()
    assert kept.name.startswith("eval-reference-") and json.loads(kept.read_text()) == first[0]
    assert not list((cache / "results").glob(".*"))                     # no temporary file left
    # another kind, other parameters, other weights, another benchmark file, other code: computed again
    cached(cache, "relearn_reference", model, bench_digest, {"scale": 2.0}, step, 1.5, scale=2.0)
    cached(cache, "eval[reference]", model, bench_digest, {"scale": 3.0}, step, 1.5, scale=3.0)
    w = load_file(str(model / "model.safetensors"))
    w["w"][0, 0] += 1
    save_file(w, str(model / "model.safetensors"))
    cached(cache, "eval[reference]", model, bench_digest, {"scale": 2.0}, step, 1.5, scale=2.0)
    assert len(calls) == 4
    bench = tmp_path / "bench"
    bench.mkdir()
    for p in small_bench.iterdir():
        if p.is_file():
            (bench / p.name).write_bytes(p.read_bytes())
    key = key_of("eval[reference]", model, files_digest(bench), {"scale": 2.0})
    with (bench / "forget.jsonl").open("a") as f:
        f.write("\n")
    assert key_of("eval[reference]", model, files_digest(bench), {"scale": 2.0}) != key
    key = key_of("eval[reference]", model, files_digest(bench), {"scale": 2.0})
    monkeypatch.setattr(result_cache, "source_digest", lambda: "other code")
    assert key_of("eval[reference]", model, files_digest(bench), {"scale": 2.0}) != key
    # cache None: computed every time, the same JSON value
    assert cached(None, "eval[unlearned]", model, bench_digest, {}, step, 1.5) == (first[0] | {"value": 1.5}, False)
    assert len(calls) == 5


def test_files_digest_names_and_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.txt").write_text("1")
    assert files_digest(a) == files_digest(b)
    (b / "sub" / "x.txt").rename(b / "sub" / "y.txt")
    assert files_digest(a) != files_digest(b)
    (b / "sub" / "y.txt").rename(b / "sub" / "x.txt")
    (b / "sub" / "x.txt").write_text("2")
    assert files_digest(a) != files_digest(b)
