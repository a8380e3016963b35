"""Recompute a `surgery demo` report's multiple-choice accuracies from its saved models with plain transformers.

An independent check of what `report.json` says: this script imports nothing from surgery. For every seed and model
in the report (vanilla, reference, unlearned, unlearned with β = 0), it loads the checkpoint with
`AutoModelForImageTextToText` and `AutoProcessor`, builds each prompt with the processor's chat template (the
question, then its options "A. ..." one per line; the photo first for a VQA row), scores every option's answer
"<option> (<letter>)" plus EOS by its summed token log-probability, and takes the best. The accuracy of each split
(forget, retain, real-world) and kind (VQA: rows with a photo; QA: without) is compared with the report's.
`--letter` also recomputes MLLMU-Bench's generation-style score (greedy answer, its first standalone letter A-D).

    python benchmarks/rescore.py out/demo/report.json                 # every seed and model in the report
    python benchmarks/rescore.py out/demo/report.json --seeds 0 --models vanilla,unlearned --letter

Exit status 1 when an accuracy differs from the report's by more than --tolerance points (default 0.5: a near-tie
between two options may fall the other way under other float rounding). One torch thread by default, as the demo.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

SPLITS = ("forget", "retain", "realworld")
LETTER = re.compile(r"\b([A-D])\b")


def model_dirs(report: dict, out: Path, seed: str) -> dict[str, Path]:
    """The saved models the report scored for `seed`: the cached vanilla and reference models, and the unlearned
    ones the demo wrote beside report.json."""
    per_seed = report["per_seed"][seed]
    dirs = {"vanilla": per_seed["vanilla_model"], "reference": per_seed.get("reference_model"),
            "unlearned": out / f"seed-{seed}" / "unlearned",
            "unlearned (beta=0)": out / f"seed-{seed}" / "unlearned-beta0"}
    return {name: Path(d) for name, d in dirs.items() if d is not None and name in per_seed["results"]}


def rows(bench: Path, split: str, views: str) -> list[dict]:
    """The multiple-choice rows of a split's evaluation file (test: eval_*.jsonl, dev: dev_*.jsonl)."""
    path = bench / f"{'eval' if views == 'test' else 'dev'}_{split}.jsonl"
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if row.get("options"):
                if row.get("correct") not in row["options"]:
                    sys.exit(f"{path}:{n}: 'correct' is not one of the options")
                out.append(row)
    return out


class Scorer:
    def __init__(self, path: Path):
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = self.processor.tokenizer

    def encode_prompt(self, row: dict, bench: Path) -> dict:
        prompt = row["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in sorted(row["options"].items()))
        content = ([{"type": "image"}] if row.get("image") else []) + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        if not row.get("image"):
            return dict(self.processor(text=text, return_tensors="pt"))
        with Image.open(bench / row["image"]) as im:
            return dict(self.processor(text=text, images=im.convert("RGB"), return_tensors="pt"))

    @torch.no_grad()
    def choose(self, row: dict, bench: Path) -> str:
        """The option whose answer "<option> (<letter>)" + EOS has the highest summed log-probability."""
        enc = self.encode_prompt(row, bench)
        prompt = enc.pop("input_ids")[0]
        enc.pop("attention_mask", None)
        letters = sorted(row["options"])
        answers = [self.tok(f" {row['options'][k]} ({k})", add_special_tokens=False)["input_ids"]
                   + [self.tok.eos_token_id] for k in letters]
        batched = all(v.shape[0] == 1 for v in enc.values() if isinstance(v, torch.Tensor))
        groups = [list(range(len(answers)))] if batched else [[i] for i in range(len(answers))]
        scores = [0.0] * len(answers)
        for group in groups:
            width = len(prompt) + max(len(answers[i]) for i in group)
            ids = torch.full((len(group), width), self.tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(group):   # right padding: the prompt and answer keep their positions
                n = len(prompt) + len(answers[i])
                ids[b, :n] = torch.cat([prompt, torch.tensor(answers[i])])
                mask[b, :n] = 1
            extra = {k: v.expand(len(group), *v.shape[1:]) if isinstance(v, torch.Tensor) else v
                     for k, v in enc.items()}
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask, **extra).logits.double(), -1)
            for b, i in enumerate(group):
                positions = range(len(prompt), len(prompt) + len(answers[i]))
                scores[i] = sum(logp[b, t - 1, ids[b, t]].item() for t in positions)
        return letters[max(range(len(scores)), key=scores.__getitem__)]

    @torch.no_grad()
    def letter(self, row: dict, bench: Path, new_tokens: int = 12) -> str | None:
        """MLLMU-Bench's generation style: the first standalone letter A-D of the greedy answer (at most
        `new_tokens` tokens, up to EOS; a plain greedy loop over the KV cache, as `generate` without sampling)."""
        out = self.model(**self.encode_prompt(row, bench), use_cache=True)
        tokens = []
        for _ in range(new_tokens):
            token = out.logits[0, -1].argmax()
            if token.item() == self.tok.eos_token_id:
                break
            tokens.append(token.item())
            out = self.model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        match = LETTER.search(self.tok.decode(tokens, skip_special_tokens=True))
        return match.group(1) if match else None

def rescore(report_path: Path, seeds=None, models=None, letter: bool = False, tolerance: float = 0.5) -> list[dict]:
    report = json.loads(report_path.read_text())
    views = report.get("views", "test")
    lines = []
    for seed in seeds or sorted(report["per_seed"], key=int):
        if seed not in report["per_seed"]:
            sys.exit(f"--seeds: seed {seed} is not in {report_path} (it has {', '.join(report['per_seed'])})")
        bench = Path(report["per_seed"][seed]["bench"])
        for name, path in model_dirs(report, report_path.parent, seed).items():
            if models and name not in models:
                continue
            if not path.is_dir():
                sys.exit(f"{report_path}: seed {seed}'s {name} model is not at {path}")
            t0, scorer = time.perf_counter(), Scorer(path)
            for split in SPLITS:
                theirs = report["per_seed"][seed]["results"][name].get(split)
                if theirs is None:
                    continue
                split_rows = rows(bench, split, views)
                for kind in ("vqa", "qa"):
                    group = [r for r in split_rows if bool(r.get("image")) == (kind == "vqa")]
                    if not group:
                        continue
                    scored = [(kind, [scorer.choose(r, bench) == r["correct"] for r in group])]
                    if letter:
                        scored.append((f"{kind}_letter", [scorer.letter(r, bench) == r["correct"] for r in group]))
                    for key, hits in scored:
                        ours = 100.0 * sum(hits) / len(hits)
                        lines.append({"seed": seed, "model": name, "split": split, "score": key, "rows": len(hits),
                                      "rescored": ours, "report": theirs.get(key),
                                      "ok": theirs.get(key) is not None and abs(ours - theirs[key]) <= tolerance})
                        print(f"seed {seed}  {name:<20} {split:<10} {key:<11} {ours:6.1f}  report "
                              f"{theirs.get(key) if theirs.get(key) is None else round(theirs[key], 1)!s:>6}  "
                              f"{'ok' if lines[-1]['ok'] else 'DIFFERS'}", flush=True)
            print(f"seed {seed}  {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="a `surgery demo` report.json (its models are read where it says)")
    ap.add_argument("--seeds", help="comma-separated benchmark seeds (default: every seed in the report)")
    ap.add_argument("--models", help="comma-separated: vanilla, reference, unlearned, 'unlearned (beta=0)'")
    ap.add_argument("--letter", action="store_true", help="also the greedy-letter accuracy (slower)")
    ap.add_argument("--tolerance", type=float, default=0.5, help="points an accuracy may differ by (default 0.5)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo)")
    ap.add_argument("--json", type=Path, help="also write every line as JSON here")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        ap.error(f"{args.report}: no such file")
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        ap.error(f"{args.report}: not a JSON file ({e})")
    if not isinstance(report, dict) or not isinstance(report.get("per_seed"), dict):
        ap.error(f"{args.report}: not a `surgery demo` report.json (no per_seed results)")
    if args.threads < 1 or not args.tolerance >= 0:
        ap.error(f"--threads must be >= 1 and --tolerance >= 0 (got {args.threads}, {args.tolerance})")
    known = {"vanilla", "reference", "unlearned", "unlearned (beta=0)"}
    models = set(args.models.split(",")) if args.models else None
    if models and models - known:
        ap.error(f"--models: unknown {', '.join(sorted(models - known))} (choose from {', '.join(sorted(known))})")
    if args.json and not args.json.parent.is_dir():   # found now, not after the rescoring
        ap.error(f"--json {args.json}: the directory {args.json.parent} does not exist")
    torch.set_num_threads(args.threads)
    lines = rescore(args.report, args.seeds.split(",") if args.seeds else None, models, args.letter, args.tolerance)
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(lines, indent=1))
        tmp.replace(args.json)
    bad = [x for x in lines if not x["ok"]]
    print(f"{len(lines) - len(bad)} of {len(lines)} accuracies agree with the report within {args.tolerance} points",
          file=sys.stderr)
    return 1 if bad or not lines else 0


if __name__ == "__main__":
    sys.exit(main())
