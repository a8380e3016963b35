"""Evaluation on a benchmark: multiple-choice accuracy (VQA and QA) on forget / retain / real-world, scored two
ways, plus ROUGE-L on free-form generations.

  likelihood (default)  each option's answer (its letter, plus EOS) is scored by its summed token log-probability
                        given the multiple-choice prompt; the argmax is the prediction. No parsing, no refusals.
  letter                MLLMU-Bench's generation style: greedy decoding, the first standalone letter A-D in the
                        output is the prediction; an output without one counts as wrong.
  rougeL                ROUGE-L F-measure (stemmed) of the greedy generation against the fact sentence, on rows
                        without options.
"""
import logging
import re
from pathlib import Path

import torch
from ..data import Row, load_jsonl
from ..models import Adapter, Example

log = logging.getLogger("surgery")
SPLITS = ("forget", "retain", "realworld")
CHANCE = 25.0  # four options
LETTER = re.compile(r"\b([A-D])\b")
COLUMNS = [("forget", "vqa"), ("forget", "qa"), ("retain", "vqa"), ("retain", "qa"), ("realworld", "vqa"),
           ("realworld", "qa")]


def split_files(bench) -> dict[str, Path]:
    """The evaluation files present in `bench`: eval_forget.jsonl, eval_retain.jsonl, eval_realworld.jsonl."""
    bench = Path(bench)
    if not bench.is_dir():
        raise FileNotFoundError(f"--bench {bench}: no such directory")
    files = {s: bench / f"eval_{s}.jsonl" for s in SPLITS if (bench / f"eval_{s}.jsonl").is_file()}
    if not files:
        raise FileNotFoundError(f"--bench {bench}: no eval_forget.jsonl / eval_retain.jsonl / eval_realworld.jsonl "
                                "(create a benchmark with `surgery make-bench` or `surgery import-mllmu`)")
    return files


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ImageCache:
    """Decode each image file once per evaluation."""

    def __init__(self):
        self.cache = {}

    def __call__(self, row: Row):
        if row.image is None:
            return None
        if row.image not in self.cache:
            self.cache[row.image] = row.load_image()
        return self.cache[row.image]


@torch.no_grad()
def answer_logprobs(adapter: Adapter, examples: list[Example], batch_size: int = 32) -> list[float]:
    """Summed log-probability of each example's answer tokens (as `Adapter.encode` labels them: answer + EOS)
    given its prompt and image."""
    out = []
    for chunk in _chunks(examples, batch_size):
        batch = adapter.encode(chunk).to(adapter.device)
        logits = adapter.model(**batch.inputs).logits[:, :-1].float()
        labels = batch.labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (logp * (labels != -100)).sum(1).tolist()
    return out


@torch.no_grad()
def generate(adapter: Adapter, examples: list[Example], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt (answers are ignored), decoded without special tokens."""
    texts = []
    tok = adapter.tokenizer
    for chunk in _chunks([Example(e.prompt, None, e.image) for e in examples], batch_size):
        batch = adapter.encode(chunk, padding_side="left").to(adapter.device)
        ids = adapter.model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts += tok.batch_decode(ids[:, batch.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def parse_letter(text: str) -> str | None:
    m = LETTER.search(text)
    return m.group(1) if m else None


def option_answer(row: Row, letter: str) -> str:
    """The answer string that stands for choosing `letter`: "<option text> (<letter>)", the form the
    benchmark's multiple-choice rows are trained on."""
    return f"{row.options[letter]} ({letter})"


def score_likelihood(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 32) -> list[bool]:
    """Per multiple-choice row: is the option with the highest answer log-likelihood the correct one?"""
    images = images or ImageCache()
    examples = [Example(r.prompt(), option_answer(r, letter), images(r)) for r in rows for letter in sorted(r.options)]
    scores = iter(answer_logprobs(adapter, examples, batch_size))
    hits = []
    for r in rows:
        per_option = {letter: next(scores) for letter in sorted(r.options)}
        hits.append(max(per_option, key=per_option.get) == r.correct)
    return hits


def score_letter(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 32) -> list[bool]:
    """Per multiple-choice row: does the greedy answer's first letter A-D name the correct option?"""
    images = images or ImageCache()
    outputs = generate(adapter, [Example(r.prompt(), None, images(r)) for r in rows], 12, batch_size)
    return [parse_letter(o) == r.correct for o, r in zip(outputs, rows)]


def score_rouge(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 32,
                max_new_tokens: int = 24) -> list[float]:
    from rouge_score import rouge_scorer
    images = images or ImageCache()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    outputs = generate(adapter, [Example(r.prompt(), None, images(r)) for r in rows], max_new_tokens, batch_size)
    return [scorer.score(r.answer, o)["rougeL"].fmeasure for o, r in zip(outputs, rows)]


def percent(xs) -> float | None:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else None


def evaluate(adapter: Adapter, bench_dir, batch_size: int = 32, splits=SPLITS, letter: bool = True,
             rouge: bool = True, kinds=("vqa", "qa")) -> dict:
    """{split: {"vqa", "qa": likelihood accuracy %, "vqa_letter", "qa_letter": generation-style accuracy %,
    "rougeL_vqa", "rougeL_qa": ROUGE-L F x100, "n": row counts}} for each evaluation file in the benchmark."""
    files = split_files(bench_dir)
    adapter.model.eval()
    results = {}
    for split in [s for s in splits if s in files]:
        rows = load_jsonl(files[split])
        images = ImageCache()
        res, counts = {}, {}
        groups = {"vqa": [r for r in rows if r.is_vqa], "qa": [r for r in rows if not r.is_vqa]}
        for kind in kinds:
            mc = [r for r in groups[kind] if r.options]
            gen = [r for r in groups[kind] if not r.options]
            counts[kind], counts[f"{kind}_gen"] = len(mc), len(gen)
            res[kind] = percent(score_likelihood(adapter, mc, images, batch_size)) if mc else None
            if letter:
                res[f"{kind}_letter"] = percent(score_letter(adapter, mc, images, batch_size)) if mc else None
            if rouge:
                res[f"rougeL_{kind}"] = percent(score_rouge(adapter, gen, images, batch_size)) if gen else None
        res["n"] = counts
        results[split] = res
        log.info("eval %s: %s", split, {k: round(v, 1) for k, v in res.items() if isinstance(v, float)})
    return results


def _cell(value) -> str:
    return "   -  " if value is None else f"{value:6.1f}"


def table(results: dict[str, dict]) -> str:
    """Paper Table 1 layout: one line per method; forget / retain / real-world VQA and QA accuracy (likelihood),
    ROUGE-L on forget-VQA generations; then the same accuracies scored by letter generation."""
    head = ("method", *(f"{s[:6]} {k.upper()}" for s, k in COLUMNS), "F-ROUGE", "R-ROUGE")
    width = max(12, *(len(m) for m in results))
    lines = [f"{head[0]:<{width}} " + " ".join(f"{h:>10}" for h in head[1:])]
    for scoring, suffix in (("likelihood", ""), ("letter", "_letter")):
        lines.append(f"-- accuracy (%) by {scoring}" + ("; ROUGE-L x100 on VQA generations" if not suffix else ""))
        for method, res in results.items():
            cells = [_cell(res.get(s, {}).get(k + suffix)) for s, k in COLUMNS]
            if not suffix:
                cells += [_cell(res.get("forget", {}).get("rougeL_vqa")), _cell(res.get("retain", {}).get("rougeL_vqa"))]
            lines.append(f"{method:<{width}} " + " ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)
