"""The relearning attack: fine-tune an unlearned model on a share of the forget-VQA training rows and watch
forget-VQA accuracy (held-out views, option likelihood) come back. AG = accuracy after the last epoch − before.

Two protocols (`hold_out`). "rows" (the paper's): the attacker's rows are drawn from every forget person and the
accuracy is measured on all of them, so a few labelled photos of a person teach a model to recognise that person
whether or not it ever knew them: the reference model, which never saw a forget face, gains too. "people" (the
held-out-people relearning test of Deeb & Roger, "Do unlearning methods remove information from language model
weights?", 2024): the forget people are split in two seeded halves; one attack trains on rows of the first half and
is measured on the second, another (from the same model) the other way round, and the curve is the accuracy over
all measured rows, so every forget person is measured once. Rows of one person cannot teach another's face, so what
comes back was still in the weights: the reference model's gain there is the protocol's floor."""
import logging
import random
import time
from pathlib import Path

from ..data import check_placeholder, load_jsonl
from ..models import load
from .evaluate import score_likelihood, ImageCache, percent, split_files
from .finetune import to_examples, train_epochs

log = logging.getLogger("surgery")


# The attack's learning rate per protocol. "rows": the attack's since it was written (every forget person is trained
# on, so damage to other knowledge does not hide what comes back). "people": chosen on the vanilla models alone (dev
# views of seeds 0-2), before any unlearned model was attacked with both folds: the largest of 1e-3, 3e-4 and 1e-4 at
# which the attack moves the vanilla models' held-out people by at most 5 points on the mean (-38.0, -6.7, -0.3). At
# 1e-3, training on five people's photos wrecks the vision pathway for the other five, and a gain would be hidden by
# the loss.
LR = {"rows": 1e-3, "people": 1e-4}
HOLD_OUTS = tuple(LR)


def attack_rows(bench, share: float, seed: int, hold_out: str = "rows", fold: int = 0) -> tuple[list, set | None]:
    """(rows, measured people). rows: a seeded `share` of the forget file's VQA rows (at least one), what the
    attacker trains on. With hold_out="people" the forget people are split in two seeded halves: the rows are drawn
    from one half only (the first for fold 0, the second for fold 1; as many as `share` of all rows, at most all of
    theirs) and the accuracy is measured on the other half, returned as the set of their names (None: every forget
    person)."""
    path = Path(bench) / "forget.jsonl"
    return _split([r for r in load_jsonl(path) if r.is_vqa], path, share, seed, hold_out, fold)


def _split(rows: list, path: Path, share: float, seed: int, hold_out: str, fold: int) -> tuple[list, set | None]:
    """attack_rows on the forget-VQA `rows` already read from `path`."""
    if not 0 < share <= 1:
        raise ValueError(f"relearn share must be in (0, 1], got {share}")
    if hold_out not in HOLD_OUTS:
        raise ValueError(f"relearn hold_out {hold_out!r}: choose one of {', '.join(HOLD_OUTS)}")
    if fold not in (0, 1):
        raise ValueError(f"relearn fold must be 0 or 1, got {fold}")
    k = max(1, round(share * len(rows)))
    if hold_out == "rows":
        return random.Random(seed).sample(rows, k), None
    missing = next((r for r in rows if not r.entity), None)
    if missing is not None:
        raise ValueError(f"{missing.where}: no 'entity'; holding out people needs every forget-VQA row's person")
    people = sorted({r.entity for r in rows})
    if len(people) < 2:
        raise ValueError(f"{path}: {len(people)} forget person; holding out people needs at least two")
    rng = random.Random(seed)
    first = set(rng.sample(people, len(people) // 2))
    attackers = first if fold == 0 else set(people) - first
    theirs = [r for r in rows if r.entity in attackers]
    return rng.sample(theirs, min(k, len(theirs))), set(people) - attackers


def relearn(model, bench, share: float = 0.2, epochs: int = 5, lr: float | None = None, batch_size: int = 8,
            scope: str = "vision", seed: int = 0, device: str = "cpu", views: str = "test",
            hold_out: str = "rows") -> dict:
    """Attack `model` (a directory) with `share` of the forget-VQA rows for `epochs` epochs, training `scope`
    ('mlp': the live vision MLPs; 'vision': encoder + projector; 'full': every weight). Forget-VQA accuracy on the
    held-out evaluation rows is measured before and after every epoch (`views`: "dev" while tuning); with
    hold_out="people", two attacks, each measured on the half it did not train on (`folds`). `lr` None: the
    protocol's (LR). The model on disk is not modified."""
    if epochs < 1:
        raise ValueError(f"relearn epochs must be >= 1, got {epochs}")
    files = split_files(bench, views)
    if "forget" not in files:
        raise FileNotFoundError(f"--bench {bench}: no forget file for the {views} views")
    lr = LR[hold_out] if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"relearn --lr {lr!r}: expected a number > 0")
    path = Path(bench) / "forget.jsonl"
    forget_vqa = [r for r in load_jsonl(path) if r.is_vqa]                   # each file read (and checked) once
    measurable = [r for r in load_jsonl(files["forget"]) if r.is_vqa and r.options]
    t0, folds = time.perf_counter(), []
    for fold in ((0,) if hold_out == "rows" else (0, 1)):
        train, measured = _split(forget_vqa, path, share, seed, hold_out, fold)
        eval_rows = [r for r in measurable if measured is None or r.entity in measured]
        if not eval_rows:
            raise ValueError(f"{files['forget']}: no multiple-choice VQA rows to measure forgetting on"
                             + (" for the held-out people" if measured else ""))
        curve = _attack(model, train, eval_rows, epochs=epochs, lr=lr, batch_size=batch_size, scope=scope,
                        seed=seed, device=device, desc=f"relearn {share:.0%}" + (f" fold {fold}" if measured else ""))
        folds.append({"rows": len(train), "attack_people": sorted({r.entity for r in train if r.entity}),
                      "measured_rows": len(eval_rows), "forget_vqa": curve})
    n = sum(f["measured_rows"] for f in folds)      # the accuracy over every measured row, whichever fold measured it
    curve = folds[0]["forget_vqa"] if len(folds) == 1 else \
        [sum(f["forget_vqa"][e] * f["measured_rows"] for f in folds) / n for e in range(epochs + 1)]
    result = {"share": share, "epochs": epochs, "rows": sum(f["rows"] for f in folds), "lr": lr, "scope": scope,
              "hold_out": hold_out, "measured_rows": n, "forget_vqa": curve, "before": curve[0], "after": curve[-1],
              "AG": curve[-1] - curve[0], "seconds": time.perf_counter() - t0,
              **({"folds": folds} if hold_out == "people" else {})}
    log.info("relearn %.0f%% x %d epochs (held out: %s): forget-VQA %.1f -> %.1f (AG %+.1f)", 100 * share, epochs,
             hold_out, curve[0], curve[-1], result["AG"])
    return result


def _attack(model, train: list, eval_rows: list, *, epochs: int, lr: float, batch_size: int, scope: str, seed: int,
            device: str, desc: str) -> list[float]:
    """One attack from the model on disk: forget-VQA accuracy on `eval_rows` before and after every epoch."""
    adapter = load(str(model), device=device, seed=seed)
    check_placeholder(train + eval_rows, adapter.image_placeholder)
    images = ImageCache(prompts=True)       # the measured rows' prompts, encoded once for every epoch's measurement

    def accuracy() -> float:
        return percent(score_likelihood(adapter, eval_rows, images))

    curve = [accuracy()]
    params = adapter.scope_params(scope)
    adapter.train_only(params)
    train_epochs(adapter, to_examples(train), list(params.values()), epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, desc=desc, on_epoch=lambda epoch: curve.append(accuracy()))
    adapter.train_only({})
    return curve
