"""`surgery demo`: the whole evaluation loop on the built-in benchmark, from nothing.

make-bench -> finetune (cached by content hash) -> prune-and-mask (β = 0.3 and the β = 0 ablation) -> eval vanilla
vs unlearned -> relearning attack -> table on stderr, report.json and demo.png in OUT. With `reference`, also the
model that never saw the forget people's faces (what unlearning aims at), evaluated and attacked the same way."""
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..config import Config
from ..models import load
from ..pipeline import atomic_dir, environment, prune_and_mask, seed_everything
from ..data import load_jsonl
from ..models import Example
from .evaluate import CHANCE, answer_logprobs, evaluate, option_answer, table
from .finetune import FinetuneConfig, finetune
from .make_bench import make_bench
from .relearn import relearn

log = logging.getLogger("surgery")

# The method's settings for this benchmark's toy model (a 4-layer, 64-wide CLIP: its MLPs hold less of the
# identity than a real CLIP's, so it needs a larger step than the paper's 1e-4). Chosen on seed 0 by trying
# lr 1e-4..1e-2, steps 50..150, α 1.25..20, β 0 / 0.3 / 1; the benchmark itself was not changed.
UNLEARN = dict(lr=3e-3, steps=100, alpha=2.5, beta=0.3)
BENCH = dict(people=40, forget_share=0.1, real_world=10, train_views=4, test_views=2)
QUICK_BENCH = dict(people=8, forget_share=0.25, real_world=3, train_views=2, test_views=1)


@dataclass
class DemoConfig:
    seed: int = 0
    quick: bool = False                # a few-second run of every stage (tests), not a measurement
    ablation: bool = True              # also run β = 0 (does VKD keep retain accuracy?)
    reference: bool = False            # also train the model that never saw the forget faces (cached)
    relearn_share: float = 0.2
    relearn_epochs: int = 5
    unlearn: dict = field(default_factory=lambda: dict(UNLEARN))
    bench: dict = field(default_factory=lambda: dict(BENCH))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def make(cls, seed: int = 0, quick: bool = False, **kw) -> "DemoConfig":
        cfg = cls(seed=seed, quick=quick, **kw)
        cfg.finetune.seed = seed
        if quick:
            cfg.bench = dict(QUICK_BENCH)
            cfg.finetune.epochs, cfg.finetune.name_epochs = 2, 1
            cfg.unlearn["steps"], cfg.relearn_epochs = 4, 1
        return cfg


def cache_root() -> Path:
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgery"


def bench_digest(bench: Path, h=None) -> str:
    """SHA-256 over every benchmark file (names and bytes): equal digests mean the same benchmark."""
    h = h or hashlib.sha256()
    for path in sorted(p for p in bench.rglob("*") if p.is_file()):
        h.update(path.relative_to(bench).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def content_hash(bench: Path, cfg: FinetuneConfig) -> str:
    """What the vanilla model depends on: every benchmark file, the fine-tuning config, the library versions."""
    import transformers
    from .. import __version__
    return bench_digest(bench, hashlib.sha256(json.dumps([asdict(cfg), __version__, torch.__version__,
                                                          transformers.__version__]).encode()))


def vanilla_model(bench: Path, cfg: FinetuneConfig, cache: Path, name: str = "vanilla") -> tuple[Path, bool]:
    """The fine-tuned model for this benchmark: from the cache, else trained into it. Returns (path, was cached)."""
    path = cache / f"{name}-{content_hash(bench, cfg)}"
    if (path / "finetune.json").is_file():
        log.info("%s model from cache: %s", name, path)
        return path, True
    finetune(bench, path, cfg, overwrite=True)
    return path, False


def targets(results: dict, attack: dict, qa_shift: dict, quick: bool) -> dict:
    """The issue's efficacy targets, checked against the measured numbers (likelihood accuracy, percent)."""
    van, unl = results["vanilla"], results["unlearned"]
    checks = {
        "forget_vqa <= chance + 15": unl["forget"]["vqa"] <= CHANCE + 15,
        "retain_vqa within 5 of vanilla": abs(unl["retain"]["vqa"] - van["retain"]["vqa"]) <= 5,
        "realworld_vqa within 5 of vanilla": abs(unl["realworld"]["vqa"] - van["realworld"]["vqa"]) <= 5,
        "forget_qa and retain_qa unchanged (every QA option log-likelihood identical)":
            all(unl[s]["qa"] == van[s]["qa"] for s in ("forget", "retain")) and qa_shift["unlearned"] == 0.0,
        "relearn AG <= 10": attack["AG"] <= 10,
    }
    if "unlearned (beta=0)" in results:
        checks["beta 0.3 keeps more retain_vqa than beta 0"] = \
            unl["retain"]["vqa"] > results["unlearned (beta=0)"]["retain"]["vqa"]
    return {"quick run: not a measurement": True} if quick else checks


def figure(results: dict, attack: dict, attack_ref: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [(s, k) for s in ("forget", "retain", "realworld") for k in ("vqa", "qa")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(results)
    for i, (method, res) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(cols))], [res[s][k] or 0 for s, k in cols], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [f"{s}\n{k.upper()}" for s, k in cols])
    ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
    ax.set_ylabel("accuracy (%)"), ax.set_ylim(0, 122), ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, loc="upper center", ncol=len(results) + 1), ax.set_title("vanilla vs unlearned")
    ax2.plot(range(len(attack["forget_vqa"])), attack["forget_vqa"], marker="o", label="unlearned")
    if attack_ref:
        ax2.plot(range(len(attack_ref["forget_vqa"])), attack_ref["forget_vqa"], marker="s", label="reference")
    ax2.axhline(results["vanilla"]["forget"]["vqa"], color="C0", ls="--", lw=1, label="vanilla")
    ax2.set_xlabel("relearning epoch"), ax2.set_ylabel("forget-VQA accuracy (%)"), ax2.set_ylim(0, 105)
    ax2.set_title(f"relearning attack ({attack['share']:.0%} of forget-VQA)"), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_demo_output(path: Path) -> bool:
    """A directory a previous `surgery demo` wrote (the demo replaces its own output without --overwrite)."""
    try:
        return "relearn" in json.loads((path / "report.json").read_text()) and (path / "bench").is_dir()
    except (OSError, ValueError):
        return False


def demo(out, cfg: DemoConfig | None = None, cache: Path | None = None, overwrite: bool = False) -> dict:
    """Run the demo into `out` (atomically). Returns the report (also written to OUT/report.json)."""
    cfg = cfg or DemoConfig.make()
    out, cache = Path(out), Path(cache or cache_root())
    if out.exists() and not overwrite:
        if not is_demo_output(out):
            raise FileExistsError(f"--out {out} already exists and is not a demo output (pass --overwrite to replace it)")
        log.info("replacing the previous demo output in %s", out)
        overwrite = True
    seed_everything(cfg.seed)
    t0, timings = time.perf_counter(), {}
    with atomic_dir(out, overwrite) as tmp:
        t = time.perf_counter()
        bench = tmp / "bench"
        make_bench(bench, seed=cfg.seed, **cfg.bench)
        timings["make_bench_s"] = time.perf_counter() - t

        t = time.perf_counter()
        vanilla, cached = vanilla_model(bench, cfg.finetune, cache)
        timings["finetune_s" + ("_cached" if cached else "")] = time.perf_counter() - t

        if cfg.reference:
            t = time.perf_counter()
            reference, _ = vanilla_model(bench, replace(cfg.finetune, without_forget_images=True), cache, "reference")
            timings["finetune_reference_s"] = time.perf_counter() - t

        runs = {"unlearned": cfg.unlearn}
        if cfg.ablation:
            runs["unlearned (beta=0)"] = {**cfg.unlearn, "beta": 0.0}
        models, saliency = {"vanilla": vanilla}, None
        for name, kw in runs.items():
            t = time.perf_counter()
            dest = tmp / ("unlearned" if kw["beta"] == cfg.unlearn["beta"] else "unlearned-beta0")
            prune_and_mask(Config(model=str(vanilla), forget=str(bench / "forget.jsonl"), saliency=saliency,
                                  retain=str(bench / "retain.jsonl"), out=str(dest), seed=cfg.seed, **kw))
            saliency = str(dest / "saliency.safetensors")  # β changes nothing before unlearning: collect once
            models[name] = dest
            timings[f"prune_and_mask_s[{name}]"] = time.perf_counter() - t
        if cfg.reference:
            models["reference"] = reference

        results = {}
        qa_examples = [Example(r.prompt(), option_answer(r, letter), None)
                       for split in ("forget", "retain", "realworld")
                       for r in load_jsonl(bench / f"eval_{split}.jsonl") if r.options and not r.is_vqa
                       for letter in sorted(r.options)]
        qa_logprobs = {}
        for name, path in models.items():
            t = time.perf_counter()
            adapter = load(str(path), seed=cfg.seed)
            results[name] = evaluate(adapter, bench)
            qa_logprobs[name] = torch.tensor(answer_logprobs(adapter, qa_examples), dtype=torch.float64)
            timings[f"eval_s[{name}]"] = time.perf_counter() - t

        t = time.perf_counter()
        attack = relearn(models["unlearned"], bench, share=cfg.relearn_share, epochs=cfg.relearn_epochs,
                         seed=cfg.seed)
        timings["relearn_s"] = time.perf_counter() - t
        attack_ref = relearn(reference, bench, share=cfg.relearn_share, epochs=cfg.relearn_epochs,
                             seed=cfg.seed) if cfg.reference else None
        # text-only rows never reach the vision weights: every QA option's log-likelihood must be bit-identical
        qa_shift = {name: float((qa_logprobs[name] - qa_logprobs["vanilla"]).abs().max()) for name in runs}
        timings["total_s"] = time.perf_counter() - t0

        figure(results, attack, attack_ref, tmp / "demo.png")
        report = {"config": {**asdict(cfg), "out": str(out), "cache": str(cache)}, "seed": cfg.seed,
                  "dtype": "float32", "environment": environment("cpu"), "bench_digest": bench_digest(bench),
                  "vanilla_model": str(vanilla),
                  "vanilla_cached": cached, "results": results, "relearn": attack, "qa_logprob_max_abs_change": qa_shift,
                  **({"relearn_reference": attack_ref} if attack_ref else {}),
                  "targets": targets(results, attack, qa_shift, cfg.quick), "timings": timings, "table": table(results)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    log.info("demo written to %s in %.0fs", out, timings["total_s"])
    return report
