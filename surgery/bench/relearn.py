"""The relearning attack: fine-tune an unlearned model on a share of the forget-VQA training rows and watch
forget-VQA accuracy (held-out views, option likelihood) come back. AG = accuracy after the last epoch − before.

Two protocols (`hold_out`). "rows" (the paper's): the attacker's rows are drawn from every forget person and the
accuracy is measured on all of them, so a few labelled photos of a person teach a model to recognise that person
whether or not it ever knew them: the reference model, which never saw a forget face, gains too. "people" (the
held-out-people relearning test of Deeb & Roger, "Do unlearning methods remove information from language model
weights?", 2024): the attacker trains on rows of half the forget people and the accuracy is measured on the other
half only. Rows of one person cannot teach another's face, so what comes back was still in the weights: the
reference model's gain there is the protocol's floor."""
import logging
import random
import time
from pathlib import Path

from ..data import load_jsonl
from ..models import load
from .evaluate import score_likelihood, ImageCache, percent, split_files
from .finetune import to_examples, train_epochs

log = logging.getLogger("surgery")


# The attack's learning rate per protocol. "rows": the attack's since it was written (every forget person is trained
# on, so damage to other knowledge does not hide what comes back). "people": 3e-4, chosen on the vanilla models alone
# (dev views of seeds 0-2) before any unlearned model was attacked this way: the largest of 1e-3, 3e-4 and 1e-4 at
# which the attack moves the vanilla model's held-out people by at most 5 points (mean change -37.3, -4.0, +2.0). At
# 1e-3 training on five people's photos wrecks the vision pathway for the other five, and a gain would be hidden by the loss.
LR = {"rows": 1e-3, "people": 3e-4}
HOLD_OUTS = tuple(LR)


def attack_rows(bench, share: float, seed: int, hold_out: str = "rows") -> tuple[list, set | None]:
    """(rows, measured people). rows: a seeded `share` of the forget file's VQA rows (at least one), what the
    attacker trains on. With hold_out="people" the forget people are split in two seeded halves: the rows are drawn
    from the first half's only (as many as `share` of all rows, at most all of theirs) and the accuracy is measured
    on the second half, returned as the set of their names (None: every forget person)."""
    if not 0 < share <= 1:
        raise ValueError(f"relearn share must be in (0, 1], got {share}")
    if hold_out not in HOLD_OUTS:
        raise ValueError(f"relearn hold_out {hold_out!r}: choose one of {', '.join(HOLD_OUTS)}")
    path = Path(bench) / "forget.jsonl"
    rows = [r for r in load_jsonl(path) if r.is_vqa]
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
    attackers = set(rng.sample(people, len(people) // 2))
    theirs = [r for r in rows if r.entity in attackers]
    return rng.sample(theirs, min(k, len(theirs))), set(people) - attackers


def relearn(model, bench, share: float = 0.2, epochs: int = 5, lr: float | None = None, batch_size: int = 8,
            scope: str = "vision", seed: int = 0, device: str = "cpu", views: str = "test",
            hold_out: str = "rows") -> dict:
    """Attack `model` (a directory) with `share` of the forget-VQA rows for `epochs` epochs, training `scope`
    ('mlp': the live vision MLPs; 'vision': encoder + projector; 'full': every weight). Forget-VQA accuracy on the
    held-out evaluation rows (of the held-out people with hold_out="people") is measured before and after every
    epoch (`views`: "dev" while tuning); `lr` None: the protocol's (LR). The model on disk is not modified."""
    if epochs < 1:
        raise ValueError(f"relearn epochs must be >= 1, got {epochs}")
    files = split_files(bench, views)
    if "forget" not in files:
        raise FileNotFoundError(f"--bench {bench}: no forget file for the {views} views")
    train, measured = attack_rows(bench, share, seed, hold_out)
    lr = LR[hold_out] if lr is None else lr
    eval_rows = [r for r in load_jsonl(files["forget"]) if r.is_vqa and r.options
                 and (measured is None or r.entity in measured)]
    if not eval_rows:
        raise ValueError(f"{files['forget']}: no multiple-choice VQA rows to measure forgetting on"
                         + (" for the held-out people" if measured else ""))
    t0 = time.perf_counter()
    adapter = load(str(model), device=device, seed=seed)
    images = ImageCache()

    def accuracy() -> float:
        return percent(score_likelihood(adapter, eval_rows, images))

    curve = [accuracy()]
    params = adapter.scope_params(scope)
    adapter.train_only(params)
    train_epochs(adapter, to_examples(train), list(params.values()), epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, desc=f"relearn {share:.0%}", on_epoch=lambda epoch: curve.append(accuracy()))
    adapter.train_only({})
    result = {"share": share, "epochs": epochs, "rows": len(train), "lr": lr, "scope": scope, "hold_out": hold_out,
              "attack_people": sorted({r.entity for r in train if r.entity}), "measured_rows": len(eval_rows),
              "forget_vqa": curve, "before": curve[0], "after": curve[-1], "AG": curve[-1] - curve[0],
              "seconds": time.perf_counter() - t0}
    log.info("relearn %.0f%% x %d epochs (held out: %s): forget-VQA %.1f -> %.1f (AG %+.1f)", 100 * share, epochs,
             hold_out, curve[0], curve[-1], result["AG"])
    return result
