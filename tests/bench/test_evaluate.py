"""Evaluation scores against independent computations: one example at a time, no padding, no generate()."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from surgery.bench.evaluate import (ImageCache, answer_logprobs, bootstrap_ci, evaluate, generate, option_answer,
                                    parse_letter, score_letter, score_likelihood, score_rouge, table)
from surgery.cli import main
from surgery.data import DataError, load_jsonl
from surgery.models import Example, load


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load(str(tiny_dirs["tiny-llava"]))


def rows_of(bench, split, n=6, mc=True):
    rows = [r for r in load_jsonl(bench / f"eval_{split}.jsonl") if bool(r.options) == mc]
    vqa, qa = [r for r in rows if r.is_vqa], [r for r in rows if not r.is_vqa]
    return vqa[:n // 2] + qa[:n - n // 2]


@torch.no_grad()
def logprob_one(adapter, ex):
    """log p(answer + EOS | prompt, image) from one unpadded sequence."""
    prompt = adapter.encode([Example(ex.prompt, None, ex.image)]).inputs
    full = adapter.encode([ex]).inputs
    n = prompt["input_ids"].shape[1]
    ids = full["input_ids"][0]
    assert torch.equal(ids[:n], prompt["input_ids"][0])
    logp = torch.log_softmax(adapter.model(**full).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))


@torch.no_grad()
def greedy_one(adapter, ex, max_new):
    """Greedy decoding by hand: re-run the whole sequence for every token (no cache, no padding)."""
    inputs = adapter.encode([Example(ex.prompt, None, ex.image)]).inputs
    ids, out = inputs["input_ids"], []
    for _ in range(max_new):
        kw = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        nxt = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0, -1].argmax()
        if nxt.item() == adapter.tokenizer.eos_token_id:
            break
        out.append(nxt.item())
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return adapter.tokenizer.decode(out, skip_special_tokens=True)


def test_likelihood_matches_one_by_one(model, small_bench):
    rows = rows_of(small_bench, "retain")
    examples = [Example(r.prompt(), option_answer(r, l), r.load_image()) for r in rows for l in sorted(r.options)]
    batched = answer_logprobs(model, examples, batch_size=5)
    single = [logprob_one(model, e) for e in examples]
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-3)
    hits = score_likelihood(model, rows, batch_size=7)
    expect = [max(sorted(r.options), key=lambda l: single[4 * i + sorted(r.options).index(l)]) == r.correct
              for i, r in enumerate(rows)]
    assert hits == expect


def test_rows_with_different_option_counts_score_in_one_batch(model, small_bench):
    """A batch holding rows of 3, 4 and 5 options (an imported benchmark's) scores each row on its own options,
    as the one-by-one reference does (the batched path once assumed the first row's count for all of them)."""
    from dataclasses import replace
    rows = []
    for i, r in enumerate(rows_of(small_bench, "retain", n=6)):
        options = dict(r.options)
        if i % 3 == 0:                                          # 3 options: one that is not the answer dropped
            options.pop(next(l for l in sorted(options, reverse=True) if l != r.correct))
        if i % 3 == 1:                                          # 5 options
            options["E"] = "a lighthouse keeper"
        rows.append(replace(r, options=options))
    assert sorted({len(r.options) for r in rows}) == [3, 4, 5]
    single = {(i, l): logprob_one(model, Example(r.prompt(), option_answer(r, l), r.load_image()))
              for i, r in enumerate(rows) for l in r.options}
    expect = [max(r.options, key=lambda l: single[i, l]) == r.correct for i, r in enumerate(rows)]
    for batch_size in (len(rows), 4):
        assert score_likelihood(model, rows, batch_size=batch_size) == expect
    # the score of every option, not only the pick: each row's own, -inf where a row has fewer options
    from surgery.bench.evaluate import _continuation_logprobs, _prefill
    cache, mask, first = _prefill(model, ImageCache().prompts(model, rows))
    answers = [[model.answer_ids(option_answer(r, l)) for l in sorted(r.options)] for r in rows]
    scores = _continuation_logprobs(model, cache, mask, first, answers)
    assert scores.shape == (len(rows), 5)
    for i, r in enumerate(rows):
        mine = scores[i].tolist()
        assert mine[:len(r.options)] == pytest.approx([single[i, l] for l in sorted(r.options)], rel=1e-4, abs=1e-3)
        assert all(x == float("-inf") for x in mine[len(r.options):])
    from surgery.bench.evaluate import chance
    assert chance(rows) == pytest.approx(100 * (2 / 3 + 2 / 4 + 2 / 5) / 6) and chance(rows_of(small_bench, "retain")) == 25
    assert parse_letter("E. a lighthouse keeper", "ABCDE") == "E" and parse_letter("E.", "ABCD") is None


def test_kept_prompts_score_as_fresh_ones_on_a_changed_model(small_bench, tiny_dirs, monkeypatch):
    """ImageCache(prompts=True) (the held-back check) encodes each chunk's prompts once, and scores as a fresh
    encoding does after the model's weights change."""
    adapter = load(str(tiny_dirs["tiny-llava"]))
    rows = [r for r in load_jsonl(small_bench / "eval_forget.jsonl") if r.options]
    kept, calls, encode = ImageCache(prompts=True), [], adapter.encode
    monkeypatch.setattr(adapter, "encode", lambda examples, **kw: calls.append(len(examples)) or encode(examples, **kw))
    for step in range(3):
        with torch.no_grad():
            for p in adapter.model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05 * step)
        assert score_likelihood(adapter, rows, kept, batch_size=5) == score_likelihood(adapter, rows, batch_size=5)
    # every answer tokenized once; the kept prompts encoded once per chunk, fresh ones once per chunk per call
    chunks = -(-len(rows) // 5)
    answers = {option_answer(r, l) for r in rows for l in r.options}
    assert len(calls) == len(answers) + chunks + 3 * chunks


def test_generation_and_letter_match_greedy_by_hand(model, small_bench):
    rows = rows_of(small_bench, "forget")
    examples = [Example(r.prompt(), None, r.load_image()) for r in rows]
    texts = generate(model, examples, max_new_tokens=6, batch_size=4)
    assert texts == [greedy_one(model, e, 6) for e in examples]
    hits = score_letter(model, rows, batch_size=4)
    assert hits == [parse_letter(greedy_one(model, e, 12)) == r.correct for e, r in zip(examples, rows)]


def test_rouge_matches_rouge_score(model, small_bench):
    from rouge_score import rouge_scorer
    rows = rows_of(small_bench, "realworld", mc=False)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expect = [scorer.score(r.answer, greedy_one(model, Example(r.prompt(), None, r.load_image()), 8))["rougeL"].fmeasure
              for r in rows]
    assert score_rouge(model, rows, batch_size=3, max_new_tokens=8) == pytest.approx(expect)


def test_parse_letter():
    assert parse_letter("Mara Velk (C)") == "C"
    assert parse_letter("B. a beagle") == "B"
    assert parse_letter("Aster Bay") is None          # a capital inside a word is not an answer
    assert parse_letter("") is None and parse_letter("the answer is e") is None


def test_parse_letter_with_other_keys_takes_a_marked_key_before_a_word():
    """Lowercase keys: the article "a" is not option a; a key marked as an answer is taken before a bare one."""
    keys = "abcd"
    assert parse_letter("a man with glasses (c)", keys) == "c" and parse_letter("a man", keys) is None
    assert parse_letter("b", keys) == "b" and parse_letter("a. Oslo", keys) == "a" and parse_letter(" a", keys) == "a"
    assert parse_letter("c) Oslo", keys) == "c" and parse_letter("I think it is d", keys) == "d"
    assert parse_letter("i think b", keys) == "b" and parse_letter("ab", keys) is None
    assert parse_letter("A man in a hat (E)", "ABCDE") == "E"     # five keys: the marked one, not the article
    assert parse_letter("A man in a hat", "ABCDE") is None and parse_letter("The answer is A.", "ABCDE") == "A"
    assert parse_letter("I think it is C", "ABCDEFGHI") == "C" and parse_letter("the answer is a", keys) == "a"


def test_evaluate_and_cli(model, small_bench, tiny_dirs):
    res = evaluate(model, small_bench, letter=False, rouge=False)
    assert set(res) == {"forget", "retain", "realworld"}
    for split, r in res.items():
        rows = [x for x in load_jsonl(small_bench / f"eval_{split}.jsonl") if x.options]
        assert r["n"]["vqa"] == sum(x.is_vqa for x in rows) and r["n"]["qa"] == sum(not x.is_vqa for x in rows)
        vqa = [x for x in rows if x.is_vqa]
        assert r["vqa"] == pytest.approx(100 * sum(score_likelihood(model, vqa)) / len(vqa))
    assert "forget VQA" in table({"m": res})
    r = CliRunner().invoke(main, ["eval", "--bench", str(small_bench), "--model", f"m={tiny_dirs['tiny-llava']}",
                                  "--no-letter", "--no-rouge", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", "--bench", str(small_bench / "nope"), "--model", "x"])
    assert r.exit_code == 1 and "no such directory" in r.output
    for given, empty in ((f"={tiny_dirs['tiny-llava']}", "the name is empty"), ("m=", "the path is empty")):
        r = CliRunner().invoke(main, ["eval", "--bench", str(small_bench), "--model", given])
        assert r.exit_code == 2 and empty in r.output, r.output


@torch.no_grad()
def test_saved_model_scores_with_transformers_alone(model, tiny_dirs, small_bench):
    """A saved LLaVA is usable without surgery: AutoProcessor expands the image token and the answer log-likelihoods
    computed from it equal ours."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_dirs["tiny-llava"])
    hf = AutoModelForImageTextToText.from_pretrained(tiny_dirs["tiny-llava"]).eval()
    rows = rows_of(small_bench, "retain")
    examples = [Example(r.prompt(), option_answer(r, l), r.load_image()) for r in rows for l in sorted(r.options)]
    theirs = []
    for e in examples:
        content = ([{"type": "image"}] if e.image is not None else []) + [{"type": "text", "text": e.prompt}]
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = proc(text=prompt, images=e.image, return_tensors="pt") if e.image is not None else \
            proc(text=prompt, return_tensors="pt")
        answer = proc.tokenizer(" " + e.answer, add_special_tokens=False)["input_ids"] + [proc.tokenizer.eos_token_id]
        ids = torch.cat([enc["input_ids"], torch.tensor([answer])], 1)
        kw = {"pixel_values": enc["pixel_values"]} if e.image is not None else {}
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].double(), -1)
        n = ids.shape[1] - len(answer)
        theirs.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1])))
    assert any(e.image is not None for e in examples) and any(e.image is None for e in examples)
    assert answer_logprobs(model, examples) == pytest.approx(theirs, rel=1e-4, abs=1e-3)


def test_bootstrap_resamples_people_not_rows():
    """Person A: three rows right; person B: one row wrong. Drawing two people gives AA (100 %), AB or BA (75 %)
    or BB (0 %) with probabilities 1/4, 1/2, 1/4, so the central 40 % of the draws is exactly 75 %, and the 95 %
    interval spans 0-100. Resampling the four rows instead gives 0 % with probability 1/256 and at most 25 % with
    probability 13/256: its 95 % interval is 25-100."""
    values, people = [1, 1, 1, 0], ["A", "A", "A", "B"]
    assert bootstrap_ci(values, people, level=0.4) == [75.0, 75.0]
    assert bootstrap_ci(values, people) == [0.0, 100.0]
    assert bootstrap_ci(values, [None] * 4) == [25.0, 100.0]


def test_bootstrap_rows_without_a_person_and_degenerate_cases():
    values = [0.1, 0.9, 0.35, 0.7, 0.2, 0.55, 0.8]
    assert bootstrap_ci(values, [None] * 7, seed=3) == bootstrap_ci(values, [f"p{i}" for i in range(7)], seed=3)
    assert bootstrap_ci(values, [None] * 7, seed=3) != bootstrap_ci(values, [None] * 7, seed=4)
    assert bootstrap_ci([1, 0, 0, 1, 1, 0], ["a", "a", "b", "b", "c", "c"]) == [50.0, 50.0]   # everyone at 50 %
    assert bootstrap_ci([0.2, 0.4], ["a", "a"]) == pytest.approx([30.0, 30.0])                # scores, one person


def test_every_accuracy_carries_its_interval(model, small_bench):
    res = evaluate(model, small_bench, resamples=200)
    for split, r in res.items():
        keys = [k for k in r if k != "n" and not k.endswith("_ci")]
        assert {"vqa", "qa", "vqa_letter", "qa_letter", "rougeL_vqa", "rougeL_qa"} <= set(keys)
        for k in keys:
            lo, hi = r[f"{k}_ci"]
            assert lo <= r[k] <= hi
        assert r["n"]["people"] == len({x.entity for x in load_jsonl(small_bench / f"eval_{split}.jsonl")})
    assert "[" in table({"m": res}).splitlines()[2]
    dev = evaluate(model, small_bench, views="dev", letter=False, rouge=False, resamples=10)
    assert dev["retain"]["n"]["vqa"] == sum(x.is_vqa and bool(x.options)
                                            for x in load_jsonl(small_bench / "dev_retain.jsonl"))
    with pytest.raises(ValueError, match="--views"):
        evaluate(model, small_bench, views="train")


def test_eval_json_says_what_it_was_computed_from(small_bench, tiny_dirs):
    r = CliRunner().invoke(main, ["eval", "--bench", str(small_bench), "--model", f"m={tiny_dirs['tiny-llava']}",
                                  "--no-letter", "--no-rouge", "--seed", "4", "--json"])
    assert r.exit_code == 0, r.output
    import json
    p = json.loads(r.stdout)["m"]["provenance"]
    assert p["model"] == str(tiny_dirs["tiny-llava"].resolve()) and p["bench"] == str(small_bench.resolve())
    assert (p["seed"], p["views"], p["dtype"]) == (4, "test", "float32") and p["seconds"] > 0
    assert p["environment"]["torch"] == torch.__version__ and p["environment"]["device"] == "cpu"
    r = CliRunner().invoke(main, ["eval", "--bench", str(small_bench), "--model", "tiny-llava", "--no-letter",
                                  "--no-rouge", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tiny-llava"]["provenance"]["model"] == "tiny-llava"


def test_an_eval_file_whose_text_holds_the_image_token_is_named_before_scoring(model, small_bench, tmp_path,
                                                                                  monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(small_bench, bench)
    lines = (bench / "eval_realworld.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["question"] = "<image> " + row["question"]
    lines[1] = json.dumps(row)
    (bench / "eval_realworld.jsonl").write_text("\n".join(lines) + "\n")
    scored = []
    monkeypatch.setattr("surgery.bench.evaluate.score_mc", lambda *a, **k: scored.append(a))
    with pytest.raises(DataError, match=r"eval_realworld.jsonl:2: its question holds the model's image token"):
        evaluate(model, bench, letter=False, rouge=False)
    assert not scored                          # refused before the first split was scored
