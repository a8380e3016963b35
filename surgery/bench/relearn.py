"""The relearning attack: fine-tune an unlearned model on a share of the forget-VQA training rows and watch
forget-VQA accuracy (held-out views, option likelihood) come back. AG = accuracy after the last epoch − before."""
import logging
import random
import time
from pathlib import Path

from ..data import load_jsonl
from ..models import load
from .evaluate import score_likelihood, ImageCache, percent, split_files
from .finetune import to_examples, train_epochs

log = logging.getLogger("surgery")


def attack_rows(bench, share: float, seed: int) -> list:
    """A seeded `share` of the forget file's VQA rows (at least one): what the attacker gets to train on."""
    if not 0 < share <= 1:
        raise ValueError(f"relearn share must be in (0, 1], got {share}")
    rows = [r for r in load_jsonl(Path(bench) / "forget.jsonl") if r.is_vqa]
    k = max(1, round(share * len(rows)))
    return random.Random(seed).sample(rows, k)


def relearn(model, bench, share: float = 0.2, epochs: int = 5, lr: float = 1e-3, batch_size: int = 8,
            scope: str = "vision", seed: int = 0, device: str = "cpu", views: str = "test") -> dict:
    """Attack `model` (a directory) with `share` of the forget-VQA rows for `epochs` epochs, training `scope`
    ('mlp': the live vision MLPs; 'vision': encoder + projector; 'full': every weight). Forget-VQA accuracy on the held-out evaluation rows is
    measured before and after every epoch (`views`: "dev" while tuning). The model on disk is not modified."""
    if epochs < 1:
        raise ValueError(f"relearn epochs must be >= 1, got {epochs}")
    files = split_files(bench, views)
    if "forget" not in files:
        raise FileNotFoundError(f"--bench {bench}: no forget file for the {views} views")
    eval_rows = [r for r in load_jsonl(files["forget"]) if r.is_vqa and r.options]
    if not eval_rows:
        raise ValueError(f"{files['forget']}: no multiple-choice VQA rows to measure forgetting on")
    train = attack_rows(bench, share, seed)
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
    result = {"share": share, "epochs": epochs, "rows": len(train), "lr": lr, "scope": scope,
              "forget_vqa": curve, "before": curve[0], "after": curve[-1], "AG": curve[-1] - curve[0],
              "seconds": time.perf_counter() - t0}
    log.info("relearn %.0f%% x %d epochs: forget-VQA %.1f -> %.1f (AG %+.1f)", 100 * share, epochs, curve[0],
             curve[-1], result["AG"])
    return result
