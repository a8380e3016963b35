"""Through which half of the model does the relearning attack bring the forget faces back? Swap the halves.

VKD edits the vision tower's MLPs with the language model frozen, as the paper prescribes, and the vanilla model's
language model learned the VQA rows, forget faces included, in the alignment's second step. For every pair (eyes,
brain) of the models given, a hybrid takes the vision tower and the projector ("eyes") of one and every other weight
("brain": the language model, its embeddings and head) of the other; the model itself where the two are one. Each
is scored on forget / retain / real-world VQA (option likelihood) and attacked as the demo attacks it (`surgery
relearn`: 20 % of the forget-VQA rows x 5 epochs, encoder + projector, each protocol's learning rate). The
reference model's eyes on the vanilla model's brain is the best that an edit confined to the vision side can reach:
a vision pathway that never saw a forget face, on the language model the method keeps.

    python benchmarks/llm_swap.py --bench B --model vanilla=V --model reference=R --model unlearned=U \\
        --brains vanilla,reference --out DIR --json swap.json

The hybrids are written to DIR (normal checkpoints, each through a temporary directory). A table of forget VQA
before -> after the attack (AG) per eyes x brain, and each cell's retain and real-world VQA, goes to stderr. The
models must share an architecture and image preprocessing. One torch thread by default, as the demo.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from surgery.numerics import pin_cpu_numerics

pin_cpu_numerics()   # as `surgery`'s command line: before torch picks its kernels
import torch  # noqa: E402

from surgery.bench.evaluate import evaluate  # noqa: E402
from surgery.bench.relearn import HOLD_OUTS, relearn  # noqa: E402
from surgery.models import load, save  # noqa: E402
from surgery.models.checkpoint import DTYPES, header, weight_files  # noqa: E402
from surgery.pipeline import atomic_dir  # noqa: E402
from script_args import named_models  # noqa: E402

SPLITS = ("forget", "retain", "realworld")
NOT_VISION = ("text_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype")   # config keys the
                                                                                                # eyes may differ in


def hybrid(eyes_dir: str, brain_dir: str, out: Path) -> dict:
    """Write the brain's checkpoint with the eyes' vision tower and projector to `out` (through a temporary
    directory), in the brain checkpoint's dtype. Returns {"eyes": tensors taken from the eyes, "brain": tensors
    kept}. The two must agree on everything that shapes what the eyes see and pass on: architecture, configuration
    outside the language model, image preprocessing."""
    floats = {d for _, d in header(weight_files(Path(brain_dir))).values() if d in ("F32", "BF16", "F16")}
    dtype = DTYPES[floats.pop()] if len(floats) == 1 else torch.float32
    eyes, brain = load(eyes_dir, dtype=dtype), load(brain_dir, dtype=dtype)
    theirs, mine = eyes.model.state_dict(), brain.model.state_dict()
    if eyes.model_type != brain.model_type or {k: v.shape for k, v in theirs.items()} != \
            {k: v.shape for k, v in mine.items()}:
        raise ValueError(f"{eyes_dir} and {brain_dir} are not one architecture: their weights differ in names or shapes")
    configs = [{k: v for k, v in a.model.config.to_dict().items() if k not in NOT_VISION} for a in (eyes, brain)]
    differ = sorted(k for k in configs[0].keys() | configs[1].keys() if configs[0].get(k) != configs[1].get(k))
    if differ:
        raise ValueError(f"{eyes_dir} and {brain_dir} differ in config.json outside the language model "
                         f"({', '.join(differ)}): the hybrid would run the eyes under the brain's settings")
    if eyes.image_processor.to_dict() != brain.image_processor.to_dict():
        raise ValueError(f"{eyes_dir} and {brain_dir} preprocess images differently: the eyes would see other pixels")
    taken = [k for k in mine if brain.is_vision(k)]
    with torch.no_grad():
        for k in taken:
            mine[k].copy_(theirs[k])
    with atomic_dir(out, overwrite=False) as tmp:
        save(brain, tmp)
    return {"eyes": len(taken), "brain": len(mine) - len(taken)}


def score(path: str, bench: Path, views: str, hold_outs: list[str], share: float, epochs: int, seed: int) -> dict:
    """VQA accuracy of each split (option likelihood) and the attack's curve per protocol."""
    res = evaluate(load(path), bench, letter=False, rouge=False, kinds=("vqa",), views=views, seed=seed)
    out = {split: res[split]["vqa"] for split in SPLITS if split in res}
    for hold_out in hold_outs:
        attack = relearn(path, bench, share=share, epochs=epochs, seed=seed, views=views, hold_out=hold_out)
        out[f"attack_{hold_out}"] = {k: attack[k] for k in ("before", "after", "AG", "forget_vqa", "lr", "rows")}
    return out


def table(cells: dict, eyes: list[str], brains: list[str], hold_outs: list[str]) -> str:
    lines = []
    for hold_out in hold_outs:
        lines.append(f"forget VQA before -> after the attack ({hold_out}), AG; eyes (rows) x brain (columns)")
        lines.append(" " * 14 + "".join(f"{b:>28}" for b in brains))
        for e in eyes:
            lines.append(f"{e:<14}" + "".join(
                "{before:11.1f} -> {after:5.1f} ({AG:+6.1f})".format(**cells[e][b][f"attack_{hold_out}"])
                for b in brains))
    lines.append("retain / real-world VQA")

    def acc(cell, split):
        return f"{cell[split]:.1f}" if cell.get(split) is not None else "-"
    for e in eyes:
        lines.append(f"{e:<14}" + "".join(f"{acc(cells[e][b], 'retain'):>20} / {acc(cells[e][b], 'realworld'):>5}"
                                           for b in brains))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="a `surgery make-bench` directory")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                    help="a model, named for the table (repeatable; at least two)")
    ap.add_argument("--eyes", help="the names whose vision side is used (comma-separated; default every model)")
    ap.add_argument("--brains", help="the names whose language model is used (comma-separated; default every model)")
    ap.add_argument("--out", type=Path, required=True, help="where the hybrids are written (created; not overwritten)")
    ap.add_argument("--views", choices=("test", "dev"), default="test",
                    help="scored and attacked on eval_*.jsonl (test, default) or dev_*.jsonl (dev)")
    ap.add_argument("--hold-out", default="rows", help=f"attack protocols, comma-separated ({', '.join(HOLD_OUTS)}; "
                    "default rows: the paper's)")
    ap.add_argument("--share", type=float, default=0.2, help="the attack's share of forget-VQA rows (default 0.2)")
    ap.add_argument("--epochs", type=int, default=5, help="the attack's epochs (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    models = named_models(ap, args.model)
    chosen = {}
    for option in ("eyes", "brains"):
        names = getattr(args, option).split(",") if getattr(args, option) else list(models)
        unknown = [n for n in names if n not in models]
        if unknown:
            ap.error(f"--{option} {','.join(unknown)}: not a --model name ({', '.join(models)})")
        chosen[option] = names
    hold_outs = args.hold_out.split(",")
    if any(h not in HOLD_OUTS for h in hold_outs):
        ap.error(f"--hold-out {args.hold_out}: choose from {', '.join(HOLD_OUTS)}")
    if not args.bench.is_dir():
        ap.error(f"--bench {args.bench}: no such directory")
    if args.out.exists():
        ap.error(f"--out {args.out}: exists; give a new directory")
    if args.json and not args.json.parent.is_dir():
        ap.error(f"--json {args.json}: the directory {args.json.parent} does not exist")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1 (got {args.threads})")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True)
    cells: dict = {}
    for e in chosen["eyes"]:
        for b in chosen["brains"]:
            t0, path, cell = time.perf_counter(), models[e], {}
            try:
                if e != b:
                    path = str(args.out / f"{e}-eyes_{b}-brain")
                    cell["tensors"] = hybrid(models[e], models[b], Path(path))
                cell.update(score(path, args.bench, args.views, hold_outs, args.share, args.epochs, args.seed))
            except (OSError, ValueError) as err:
                sys.exit(f"eyes {e}, brain {b}: {err}")
            cells.setdefault(e, {})[b] = {"model": path, **cell}
            print(f"eyes {e}, brain {b}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps({"bench": str(args.bench), "views": args.views, "seed": args.seed,
                                   "threads": args.threads, "share": args.share, "epochs": args.epochs,
                                   "models": models, "cells": cells}, indent=1))
        tmp.replace(args.json)
    print(table(cells, chosen["eyes"], chosen["brains"], hold_outs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
