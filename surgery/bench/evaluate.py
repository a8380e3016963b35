"""Evaluation on a benchmark: multiple-choice accuracy (VQA and QA) on forget / retain / real-world, scored two
ways, plus ROUGE-L on free-form generations, each with a per-person bootstrap 95 % interval.

  likelihood (default)  each option's answer (its text and letter, plus EOS) is scored by its summed token
                        log-probability given the multiple-choice prompt; the argmax is the prediction.
  letter                MLLMU-Bench's generation style: greedy decoding, the first standalone letter A-D in the
                        output is the prediction; an output without one counts as wrong.
  rougeL                ROUGE-L F-measure (stemmed) of the greedy generation against the fact sentence, on rows
                        without options.

Views: "test" reads eval_<split>.jsonl (held-out views, for reporting), "dev" reads dev_<split>.jsonl (the views
tuning may look at).

For LLaVA-style models the prompt of a row runs once: its cache serves the greedy decode and the four options
(the options differ only after the prompt). Other families score every option as a full sequence.
"""
import logging
import re
from pathlib import Path

import numpy as np
import torch

from ..data import Row, check_placeholder, load_jsonl
from ..models import Adapter, Batch, Example
from .ablation import ablated

log = logging.getLogger("surgery")
SPLITS = ("forget", "retain", "realworld")
VIEWS = {"test": "eval", "dev": "dev"}   # --views -> file prefix
CHANCE = 25.0  # four options: the built-in benchmark's (a user's: `chance`)
LETTER = re.compile(r"\b([A-D])\b")   # MLLMU-Bench's four options; a row with other option keys: parse_letter
COLUMNS = [("forget", "vqa"), ("forget", "qa"), ("retain", "vqa"), ("retain", "qa"), ("realworld", "vqa"),
           ("realworld", "qa")]


def split_files(bench, views: str = "test") -> dict[str, Path]:
    """The evaluation files present in `bench` for `views`: <prefix>_forget|retain|realworld.jsonl."""
    bench = Path(bench)
    if views not in VIEWS:
        raise ValueError(f"--views {views!r}: choose one of {', '.join(VIEWS)}")
    if not bench.is_dir():
        raise FileNotFoundError(f"--bench {bench}: no such directory")
    prefix = VIEWS[views]
    files = {s: bench / f"{prefix}_{s}.jsonl" for s in SPLITS if (bench / f"{prefix}_{s}.jsonl").is_file()}
    if not files:
        raise FileNotFoundError(f"--bench {bench}: no {prefix}_forget.jsonl / {prefix}_retain.jsonl / "
                                f"{prefix}_realworld.jsonl (create a benchmark with `surgery make-bench`"
                                + (" or `surgery import-mllmu`)" if views == "test" else ")"))
    return files


def _chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ImageCache:
    """Decode each image file once per evaluation. With `prompts=True`, also encode each chunk of rows' prompts once
    (`prompts`), for one adapter: for rows scored again and again as the model changes (the held-back check of
    --stop-forget-accuracy), whose inputs never do. Off by default: it holds every chunk's pixels."""

    def __init__(self, prompts: bool = False):
        self.cache, self.encoded = {}, {} if prompts else None

    def __call__(self, row: Row):
        if row.image is None:
            return None
        if row.image not in self.cache:
            self.cache[row.image] = row.load_image()
        return self.cache[row.image]

    def prompts(self, adapter: Adapter, rows: list[Row]) -> Batch:
        """The prompts of `rows` with their images, as `_prefill` runs them."""
        key = tuple(map(id, rows))
        if self.encoded is not None and key in self.encoded:
            return self.encoded[key][1]
        batch = _prompts(adapter, [Example(r.prompt(), None, self(r)) for r in rows])
        if self.encoded is not None:     # the rows are kept with their batch, so their ids stay theirs
            self.encoded[key] = rows, batch
        return batch


def bootstrap_ci(values, people, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Per-person bootstrap interval of 100 x the mean of `values` (bools or scores in [0, 1]): draw as many people
    as there are, with replacement, pool their rows, take the mean; the interval holds the central `level` of
    `resamples` such means (percentile method). Rows whose person is None are people of their own."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    ids: dict = {}
    cluster = np.array([ids.setdefault(p if p is not None else ("row", i), len(ids)) for i, p in enumerate(people)])
    sums = np.bincount(cluster, weights=values)
    counts = np.bincount(cluster).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    means = 100.0 * sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


@torch.no_grad()
def answer_logprobs(adapter: Adapter, examples: list[Example], batch_size: int = 32) -> list[float]:
    """Summed log-probability of each example's answer tokens (as `Adapter.encode` labels them: answer + EOS)
    given its prompt and image, each example a full sequence of its own."""
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
    if adapter.family.style == "llava":
        return [text for chunk in _chunks(examples, batch_size)
                for text in _greedy(adapter, *_prefill(adapter, _prompts(adapter, chunk)), max_new_tokens)]
    texts = []
    tok = adapter.tokenizer
    for chunk in _chunks([Example(e.prompt, None, e.image) for e in examples], batch_size):
        batch = adapter.encode(chunk, padding_side="left").to(adapter.device)
        ids = adapter.model.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts += tok.batch_decode(ids[:, batch.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def _prompts(adapter: Adapter, examples: list[Example]) -> Batch:
    """The examples' prompts and images (answers dropped), left-padded so that every prompt ends at the last
    position, on the model's device."""
    return adapter.encode([Example(e.prompt, None, e.image) for e in examples], padding_side="left").to(adapter.device)


def _prefill(adapter: Adapter, batch: Batch):
    """Run the prompts (`_prompts`) once. Returns the cache, the attention mask and the log-probabilities of the first
    answer token [B, V]."""
    out = adapter.model(**batch.inputs, use_cache=True, logits_to_keep=1)
    return out.past_key_values, batch.inputs["attention_mask"], torch.log_softmax(out.logits[:, -1].float(), -1)


def _greedy(adapter: Adapter, cache, mask, first: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Greedy decoding from a prefilled cache (as `generate` with do_sample=False: rows stop at EOS). The cache
    is cropped back to the prompt afterwards."""
    tok, prompt_len = adapter.tokenizer, mask.shape[1]
    token = first.argmax(-1)
    done = token == tok.eos_token_id
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = adapter.model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache,
                               use_cache=True).logits[:, -1]
        token = torch.where(done, tok.pad_token_id, logits.argmax(-1))
        done |= token == tok.eos_token_id
        tokens.append(token)
    cache.crop(prompt_len - cache.get_seq_length())
    ids = torch.stack(tokens, 1).tolist()
    return tok.batch_decode([row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in ids],
                            skip_special_tokens=True)


def _continuation_logprobs(adapter: Adapter, cache, mask, first: torch.Tensor, answers: list[list[list[int]]]):
    """Summed log-probability of every answer (token ids, EOS included) after its prompt: `answers[i]` are the
    answers of prompt i, k at most. Returns [B, k], -inf where prompt i has fewer than k answers (a row with fewer
    options: its places are filled with a copy of its first answer, scored and then masked). The cache is expanded
    to B*k rows."""
    k = max(map(len, answers))
    flat = [a for per_prompt in answers for a in per_prompt + [per_prompt[0]] * (k - len(per_prompt))]
    width = max(map(len, flat))
    ids = torch.full((len(flat), width), adapter.tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(flat), width), dtype=torch.bool)
    for i, a in enumerate(flat):
        ids[i, :len(a)], valid[i, :len(a)] = torch.tensor(a), True
    ids, valid = ids.to(first.device), valid.to(first.device)
    cache.batch_repeat_interleave(k)
    mask = torch.cat([mask.repeat_interleave(k, 0), valid.long()], 1)
    logits = adapter.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    logp = torch.cat([first.repeat_interleave(k, 0)[:, None], torch.log_softmax(logits[:, :-1].float(), -1)], 1)
    token_logp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * valid
    scores = token_logp.sum(1).view(-1, k)
    absent = torch.tensor([[j >= len(a) for j in range(k)] for a in answers], device=scores.device)
    return scores.masked_fill(absent, float("-inf"))


def chance(rows: list[Row]) -> float:
    """The accuracy in % of picking an option at random, over multiple-choice `rows` (25 for four options each)."""
    rows = [r for r in rows if r.options]
    return 100.0 * sum(1 / len(r.options) for r in rows) / len(rows) if rows else CHANCE


def parse_letter(text: str, letters=None) -> str | None:
    """The first standalone option letter in `text`: A-D, or one of `letters` (a row's option keys) when given. With
    other keys, a key marked as an answer ("(b)", "b)", "b." or "b" alone at the start, "b" at the end) is taken
    first, and the one-letter words a and i (either case) only so: "A man with glasses" names no option."""
    if letters is None or set(letters) <= set("ABCD"):
        m = LETTER.search(text)
        return m.group(1) if m else None
    keys = "|".join(map(re.escape, sorted(letters, key=len, reverse=True)))
    marked = re.search(r"(?<![\w(])\(?(" + keys + r")\)|^\s*(" + keys + r")(?:[.:]|\s*$)|(?<!\w)(" + keys
                       + r")[.!]?\s*$", text)
    if marked:
        return next(g for g in marked.groups() if g)
    words = [k for k in letters if k.lower() not in ("a", "i")]
    m = re.search(r"\b(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")\b", text) \
        if words else None
    return m.group(1) if m else None


def option_answer(row: Row, letter: str) -> str:
    """The answer string that stands for choosing `letter`: "<option text> (<letter>)", the form the
    benchmark's multiple-choice rows are trained on."""
    return f"{row.options[letter]} ({letter})"


@torch.no_grad()
def score_mc(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 64,
             letter: bool = True) -> tuple[list[bool], list[bool] | None]:
    """Per multiple-choice row: is the option with the highest answer log-likelihood the correct one, and (with
    `letter`) does the greedy answer's first letter A-D name it?"""
    images = images or ImageCache()
    if adapter.family.style != "llava":
        examples = [Example(r.prompt(), option_answer(r, l), images(r)) for r in rows for l in sorted(r.options)]
        scores = iter(answer_logprobs(adapter, examples, batch_size))
        hits = []
        for r in rows:
            per_option = {l: next(scores) for l in sorted(r.options)}
            hits.append(max(per_option, key=per_option.get) == r.correct)
        if not letter:
            return hits, None
        texts = generate(adapter, [Example(r.prompt(), None, images(r)) for r in rows], 12, batch_size)
        return hits, [parse_letter(t, r.options) == r.correct for t, r in zip(texts, rows)]
    hits, letter_hits = [], []
    for chunk in _chunks(rows, batch_size):
        cache, mask, first = _prefill(adapter, images.prompts(adapter, chunk))
        if letter:
            letter_hits += [parse_letter(t, r.options) == r.correct
                            for t, r in zip(_greedy(adapter, cache, mask, first, 12), chunk)]
        letters = [sorted(r.options) for r in chunk]
        answers = [[adapter.answer_ids(option_answer(r, l)) for l in ls] for r, ls in zip(chunk, letters)]
        best = _continuation_logprobs(adapter, cache, mask, first, answers).argmax(1).tolist()
        hits += [ls[b] == r.correct for r, ls, b in zip(chunk, letters, best)]
    return hits, letter_hits if letter else None


def score_likelihood(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 64) -> list[bool]:
    """Per multiple-choice row: is the option with the highest answer log-likelihood the correct one?"""
    return score_mc(adapter, rows, images, batch_size, letter=False)[0]


def score_letter(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 64) -> list[bool]:
    """Per multiple-choice row: does the greedy answer's first option letter (A-D, or the row's own keys: parse_letter)
    name the correct option?"""
    images = images or ImageCache()
    texts = generate(adapter, [Example(r.prompt(), None, images(r)) for r in rows], 12, batch_size)
    return [parse_letter(t, r.options) == r.correct for t, r in zip(texts, rows)]


def score_rouge(adapter: Adapter, rows: list[Row], images=None, batch_size: int = 64,
                max_new_tokens: int = 24) -> list[float]:
    from rouge_score import rouge_scorer
    images = images or ImageCache()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    outputs = generate(adapter, [Example(r.prompt(), None, images(r)) for r in rows], max_new_tokens, batch_size)
    return [scorer.score(r.answer, o)["rougeL"].fmeasure for o, r in zip(outputs, rows)]


def percent(xs) -> float | None:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else None


def evaluate(adapter: Adapter, bench_dir, batch_size: int = 64, splits=SPLITS, letter: bool = True,
             rouge: bool = True, kinds=("vqa", "qa"), views: str = "test", resamples: int = 1000,
             seed: int = 0, ablate: str | None = None) -> dict:
    """{split: {"vqa", "qa": likelihood accuracy %, "vqa_letter", "qa_letter": generation-style accuracy %,
    "rougeL_vqa", "rougeL_qa": ROUGE-L F x100, each also as "<key>_ci": [lo, hi], the per-person bootstrap 95 %
    interval (`resamples` draws, seeded), "n": row and people counts}} for each evaluation file of `views`; with
    `ablate` ("mlp", "embeddings"), of the model with its vision encoder ablated so (ablation.py)."""
    with ablated(adapter, ablate):
        files = split_files(bench_dir, views)
        adapter.model.eval()
        results = {}
        read = {split: load_jsonl(files[split]) for split in splits if split in files}   # every file checked first
        for rows in read.values():
            check_placeholder(rows, adapter.image_placeholder)
        for split, rows in read.items():
            images = ImageCache()
            res, counts = {}, {"people": len({r.entity for r in rows})}

            def put(key, values, scored_rows):
                res[key] = percent(values) if scored_rows else None
                res[f"{key}_ci"] = bootstrap_ci(values, [r.entity for r in scored_rows], resamples, seed) \
                    if scored_rows else None

            for kind in kinds:
                group = [r for r in rows if r.is_vqa == (kind == "vqa")]
                mc, gen = [r for r in group if r.options], [r for r in group if not r.options]
                counts[kind], counts[f"{kind}_gen"] = len(mc), len(gen)
                hits, letter_hits = score_mc(adapter, mc, images, batch_size, letter) if mc else ([], [])
                put(kind, hits, mc)
                if letter:
                    put(f"{kind}_letter", letter_hits, mc)
                if rouge:
                    put(f"rougeL_{kind}", score_rouge(adapter, gen, images, batch_size) if gen else [], gen)
            res["n"] = counts
            results[split] = res
            log.info("eval %s (%s views): %s", split, views,
                     {k: round(v, 1) for k, v in res.items() if isinstance(v, float)})
        return results


def _cell(res: dict, key: str) -> str:
    value, ci = res.get(key), res.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" [{ci[0]:.0f}-{ci[1]:.0f}]" if ci else "")


def table(results: dict[str, dict]) -> str:
    """Paper Table 1 layout: one line per method; forget / retain / real-world VQA and QA accuracy (likelihood),
    ROUGE-L on forget- and retain-VQA generations; then the same accuracies scored by letter generation. Each cell:
    the value and its per-person bootstrap 95 % interval."""
    head = ("method", *(f"{s[:6]} {k.upper()}" for s, k in COLUMNS), "F-ROUGE", "R-ROUGE")
    width = max(12, *(len(m) for m in results))
    lines = [f"{head[0]:<{width}} " + " ".join(f"{h:>16}" for h in head[1:])]
    for scoring, suffix in (("likelihood", ""), ("letter", "_letter")):
        lines.append(f"-- accuracy (%) by {scoring} [95 % interval, people resampled]"
                     + ("; ROUGE-L x100 on VQA generations" if not suffix else ""))
        for method, res in results.items():
            cells = [_cell(res.get(s, {}), k + suffix) for s, k in COLUMNS]
            if not suffix:
                cells += [_cell(res.get("forget", {}), "rougeL_vqa"), _cell(res.get("retain", {}), "rougeL_vqa")]
            lines.append(f"{method:<{width}} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
