"""`surgery demo`: the whole evaluation loop on the built-in benchmark, from nothing, over one or more seeds.

Per benchmark seed: make-bench (cached) -> the vanilla and the reference model (built stage by stage, cached by
content hash: finetune.model_plan) -> VKD prune-and-mask at the settings below (UNLEARN) and the β = 0 ablation ->
evaluation of every model on the held-out views (or the dev views, for tuning) -> the relearning attack on the
unlearned and the reference model, the paper's (rows of every forget person) and on held-out people (relearn.py),
all as one plan of steps over two processes (lanes.py); the vanilla and reference model's evaluation and attacks are
kept in the cache too (result_cache.py), an unlearned model's never. Then the mean and spread over the seeds, the
issue's targets checked on the means, table on stderr, report.json and demo.png in OUT; the unlearned models of every
seed are kept in OUT/seed-<s>/ for re-evaluation.

The reference model never saw a forget person's face: it is what unlearning aims at, and its AG (the forget-VQA
accuracy a relearning attack brings back) is the yardstick for the unlearned model's AG."""
import hashlib
import json
import logging
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from ..config import Config, check_seeds, exclusive
from ..data import load_jsonl
from ..methods.loop import check_run
from ..models import Example, load
from ..pipeline import (atomic_dir, check_device, collect_saliency, environment, prune_and_mask, resolve_dtype,
                        saliency_half, save_saliency, seed_everything, torch_threads)
from .evaluate import CHANCE, COLUMNS, answer_logprobs, evaluate, option_answer, split_files, table
from .finetune import QUICK_BENCH, FinetuneConfig, cache_root, model_plan
from .lanes import From, Step, run_plan, spawned_process
from .make_bench import VERSION, make_bench
from .relearn import relearn
from .result_cache import cached, files_digest

log = logging.getLogger("surgery")

# VKD's settings for this benchmark, chosen on the DEV views (README: "How the demo's settings were chosen" has the
# sweeps and the commands); no test view was looked at. Of the settings that took every tuning seed's dev forget-VQA
# to <= 40 %, those within 2 points of the most retain + real-world VQA kept, and of them the one with the fewest
# optimizer steps (on the mean). The run holds back a fifth of each forget person's photos and stops at the first
# check (every 5 steps, at most 3800) at which their multiple-choice accuracy is <= 35 %: stopping by the training
# rows' forget loss (1.25, chosen on seeds 0-2) left seeds 3-8 at 36-44 % on their dev views (one seed at 47 % on
# its test views), because the loss says how far the trained photos are forgotten, not the others. β is 20 (10 until
# the last lines below, 3 on the earlier build), not the paper's 0.3: our L_VKD is a mean over tokens and channels,
# so its scale differs from the paper's. Schedule: see the last lines. Checking every 5 steps rather than 10 (a
# second sweep of lr, α, d_F and the check interval at this stop) stops a few steps nearer the line, for 3 s more per
# seed.
# On the build with 2048-wide tower MLPs and the projector-only alignment step, lr 5e-4 left seed 1's dev views at 44 %
# after the 600-step cap, and 1e-3 at 43 %; lr 1e-3 with β 10 brought all three of seeds 0-2 to <= 40 % (28 / 36 / 38)
# with the most retain + real-world VQA of the settings that did (README, "How the demo's settings were chosen").
# The cap: on the dev views of seeds 0-2, 4, 6, 7 and 9 these settings (at lr 1e-3) stop after 325 to 2485 steps
# (seed 4, whose held-back photos stayed at 70-88 % for the first 1500); by a rule fixed before that run (a cap some
# dev seed comes within 10 % of is raised to 1.5 times the most steps any needed, rounded up to 100) it is 3800. The
# learning rate is constant and the batches do not depend on the cap, so a run that stops earlier is the same run
# under any cap.
# Distilling the tower's extra faces too (--distill-extras 300) missed its pre-written rule on the dev views of seeds
# 0-2 (forget VQA 42.7 > 40, real-world drop 1.3 points smaller, 3.8 times the steps); 100 of them met it (real-world
# drop 8.0 against 10.0) but lost to the layer range below on the same views: the demo distils retain photos only, as
# the paper does (README, "Distilling faces beyond the retain set").
# Layers: VKD edits the tower's five deepest live layers (2-6 of the 8-layer tower; LLaVA reads layer -2, so 7 is
# dead), the deeper layers the paper emphasises, not every live layer. On the build before the reshuffle a rule written
# before any run with a layer range took 4-6 over every layer and 2-6 (README, "The layers VKD edits"). On the current
# build, with the held-out-people attack missed on the AMD machine's models, a rule written before its runs (README,
# "The layers again, for the held-out-people attack") took 2-6 over 4-6, every live layer and no pruning on the dev
# views of seeds 0-2, 39 and 40: mean forget VQA 33.0 / retain drop 1.7 / real-world drop 2.2 / AG on held-out people
# +9.0 against 4-6's 33.0 / 0.8 / 3.6 / +13.2 (every layer: real-world drop 6.3; no pruning: +13.2).
# At 4-6, lr 2e-3 (retain drop 3.2 points worse) and --distill-extras 100 (mean forget VQA 45.0) missed a further rule.
# So did a smaller cap (1000-3000: only 2500 reaches mean forget VQA 40, keeping 1.5 real-world points, not 2) and
# batch 8 (real-world drop 1.8 points worse). MMUnlearner's alternating schedule (a clipped update on the forget split,
# then one on the retain splits and the distillation) met that rule where the paper's combined step (one update on
# all of them) had been kept on an earlier build: dev mean 35.0 / 90.4 / 88.7 against 36.7 / 91.0 / 87.2, real-world
# drop 1.5 points smaller, retain drop 0.7 worse, in 3175 steps against 6135 (seed 2 now reaches the stop, at 2400).
# β 20, not 10: d_F 0.5 still lost 6.7 real-world points on the dev views. By a rule written before the runs (README,
# "The distillation weight β"), of β 20 and --distill-extras 100, β 20 was the one to meet the demo's forget, retain
# and real-world lines on the dev views: mean 31.7 / 90.2 / 88.3 against β 10's 30.7 / 89.7 / 86.2 (retain drop 1.9
# against 2.4, real-world 4.5 against 6.7) in 790 steps against 1575; extras 100 kept retain better (0.6) but lost
# 5.5 real-world points in 1885 steps. On the build with reshuffled options (finetune.align_reshuffle) β 40 and lr
# 5e-4 were tried on the dev views by the same kind of rule and not taken (README, "The settings on the reshuffled
# build").
# Fisher mask d_F 1.0, MMUnlearner's (prune-and-mask's default). On the build before the reshuffle an Intel machine's
# models did not forget seed 0 at 1.0 (66 % after the 3800-step cap: the distillation step undid the masked forget
# step), and d_F 0.5 was taken by a pre-written rule (README, "The Fisher mask's threshold"). On the reshuffled build
# the stop comes in 75-110 steps, and by the same kind of rule (README, "The mask threshold on the reshuffled build")
# 1.0 was taken back over 0.5 and 0.75: dev mean 30.0 / 91.9 / 86.8 against 0.5's 31.7 / 90.8 / 85.2 (retain drop
# 1.7 against 2.8, real-world 6.2 against 7.8) in 475 steps against 265.
# lr 5e-4 since the sweep on the dev views of nine seeds (0-2, 29-34; README, "The learning rate on nine seeds"): by
# its pre-written rule lr 5e-4 alone qualified, dev mean 31.6 / -0.8 / -3.8 (forget VQA, retain and real-world drop)
# against lr 1e-3's 32.2 / -1.8 / -6.1 and 7e-4's 32.3 / -0.9 / -5.2, in 6075 steps against 2435. Its slowest
# dev seed needs 2565 steps, within the cap's rule (under 90 % of 3800).
UNLEARN = dict(lr=5e-4, steps=3800, stop_forget_accuracy=35.0, stop_holdout=0.2, stop_every=5, alpha=2.5, beta=20.0,
               schedule="alternating", layers=(2, 6), mask_threshold=1.0)
QUICK_LAYERS = (0, 0)      # --quick's 2-layer tower has one live layer
# the two relearning attacks (relearn.HOLD_OUTS) and the suffix of their keys: relearn[_people],
# relearn_reference[_people] per seed, AG[_people] in the means
ATTACKS = {"rows": "", "people": "_people"}
ATTACKED = {"unlearned": "relearn", "reference": "relearn_reference"}     # model -> the key of its attacks' results
TARGET_SLACK = dict(forget_over_chance=15.0, kept_within=5.0, ag_max=10.0, ag_within_reference=5.0)


@dataclass
class DemoConfig:
    seeds: tuple[int, ...] = (0,)
    quick: bool = False                # a few-second run of every stage (tests), not a measurement
    views: str = "test"                # test: held-out views (report); dev: the views tuning may look at
    ablation: bool = True              # also run β = 0 (does the distillation term keep retain accuracy?)
    reference: bool = True             # also build the model that never saw the forget faces (cached)
    relearn_share: float = 0.2
    relearn_epochs: int = 5
    threads: int = 1                   # torch CPU threads for every step: the same numbers on every machine (0: as set)
    processes: int = 2                 # 2: a second process evaluates, attacks and runs β = 0 beside the main one
    distill_extras: int = 0            # VKD also distils one photo each of this many of the tower's extra
                                       # identities (--distill-images; 0: the paper's VKD, retain photos only)
    unlearn: dict = field(default_factory=lambda: dict(UNLEARN))
    bench: dict = field(default_factory=dict)       # make_bench arguments beyond its defaults
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def make(cls, seeds=(0,), quick: bool = False, unlearn: dict | None = None, **kw) -> "DemoConfig":
        cfg = cls(seeds=tuple(seeds), quick=quick, **kw)
        cfg.unlearn.update(exclusive(unlearn or {}))  # the user's length or selection replaces the demo's
        given = set(unlearn or {})
        if quick:
            cfg.bench, cfg.finetune = dict(QUICK_BENCH), FinetuneConfig.quick()
            if not {"steps", "epochs"} & given:     # the user's length stands
                cfg.unlearn.update(steps=4, epochs=None)
            if cfg.unlearn.get("layers") == UNLEARN["layers"]:      # not the user's: the quick tower's deepest
                cfg.unlearn["layers"] = QUICK_LAYERS
            cfg.relearn_epochs = 1
        cfg.check()
        return cfg

    def check(self) -> None:
        check_seeds(self.seeds)
        if self.processes not in (1, 2):
            raise ValueError(f"--processes {self.processes}: choose 1 or 2")
        batch = self.unlearn.get("batch_size", Config.batch_size)
        if self.distill_extras < 0 or 0 < self.distill_extras < batch:
            raise ValueError(f"--distill-extras {self.distill_extras}: expected 0 or at least the batch size {batch} "
                             "(each step distils a batch of their photos)")
        if self.views not in ("test", "dev"):
            raise ValueError(f"--views {self.views!r}: choose test or dev")
        known = set(Config.__dataclass_fields__) - {"model", "forget", "retain", "out", "seed", "method", "saliency"}
        bad = sorted(set(self.unlearn) - known)
        if bad:
            raise ValueError(f"--set {bad[0]}: not a setting of prune-and-mask (one of {', '.join(sorted(known))})")
        check_run(self.unlearn, "--set ")
        check_device(self.unlearn.get("device", "cpu"))
        given = self.unlearn.get("distill_images")
        if given is not None and not Path(given).is_file():
            raise FileNotFoundError(f"--set distill_images={given}: file not found")
        layers = self.unlearn.get("layers")
        live = self.finetune.vision_layers - 2          # LLaVA reads the layer before the last: the last is dead
        if layers is not None and layers[0] > live:      # every layer dead (a range reaching past them is cut)
            raise ValueError(f"--set layers={list(layers)}: the demo's tower has live layers 0-{live} (LLaVA reads "
                             "the layer before the last)")


def relocate(tmp: Path, out: Path) -> None:
    """The reports the runs wrote under the temporary directory `tmp` (their --out, saliency and distill files) name
    the place they will have under `out` once it is renamed there."""
    old, new = json.dumps(str(tmp))[1:-1], json.dumps(str(out))[1:-1]
    for path in tmp.rglob("*.json"):
        text = path.read_text(encoding="utf-8")
        if old in text:
            path.write_text(text.replace(old, new), encoding="utf-8")


def benchmark(seed: int, params: dict, cache: Path) -> tuple[Path, bool]:
    """The benchmark of `seed` (make_bench with `params`), generated once into the cache. Returns (dir, cached)."""
    key = json.dumps({"version": VERSION, "seed": seed, **params}, sort_keys=True)
    path = cache / f"bench-{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "bench.json").is_file():
        return path, True
    make_bench(path, seed=seed, overwrite=True, **params)
    return path, False


def distill_file(bench: Path, extras: int, path: Path) -> Path:
    """A --distill-images file at `path`: the first tower photo of each of the first `extras` extra identities of the
    benchmark (faces only the tower's pretraining saw: no benchmark person, no label)."""
    first = {}
    for row in map(json.loads, (bench / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()):
        if row["entity"].startswith("x") and row["entity"] not in first:
            first[row["entity"]] = row["image"]
    if len(first) < extras:
        raise ValueError(f"--distill-extras {extras}: the benchmark has {len(first)} extra identities")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"image": str((bench / image).resolve())}) + "\n"
                            for image in list(first.values())[:extras]), encoding="utf-8")
    return path


def bench_digest(bench: Path, h=None) -> str:
    """SHA-256 over every benchmark file (names and bytes): equal digests mean the same benchmark."""
    return files_digest(bench, h)


def targets(mean: dict, shifts: list[float], ag: dict, beta: float) -> dict:
    """The issue's targets, checked on the seed means (likelihood accuracy, percent). `ag`: per attack protocol
    (relearn.HOLD_OUTS), the unlearned and the reference model's mean AG (None: not run)."""
    van, unl, s = mean["vanilla"], mean["unlearned"], TARGET_SLACK
    checks = {
        f"forget VQA <= chance + {s['forget_over_chance']:g}": unl["forget_vqa"] <= CHANCE + s["forget_over_chance"],
        f"retain VQA within {s['kept_within']:g} of vanilla": abs(unl["retain_vqa"] - van["retain_vqa"]) <= s["kept_within"],
        f"real-world VQA within {s['kept_within']:g} of vanilla":
            abs(unl["realworld_vqa"] - van["realworld_vqa"]) <= s["kept_within"],
        "every QA option log-likelihood bit-identical to vanilla": all(x == 0.0 for x in shifts),
    }
    if "unlearned (beta=0)" in mean:
        checks[f"beta {beta:g} keeps more retain VQA than beta 0"] = \
            unl["retain_vqa"] > mean["unlearned (beta=0)"]["retain_vqa"]
    for protocol, (a, a_ref) in ag.items():        # the AG is the paper's attack; held-out people beside it
        if a is None:
            continue
        label = "" if protocol == "rows" else " on held-out people"
        checks[f"AG{label} <= {s['ag_max']:g}"] = a <= s["ag_max"]
        if a_ref is not None:
            checks[f"AG{label} within {s['ag_within_reference']:g} of the reference model's"] = \
                abs(a - a_ref) <= s["ag_within_reference"]
    return checks


def summarize(per_seed: dict) -> tuple[dict, dict]:
    """(mean, spread): per model and accuracy column (and AG), the mean over seeds and the sample standard deviation
    (None for one seed)."""
    models = list(next(iter(per_seed.values()))["results"])
    mean, spread = {}, {}
    for name in models:
        values = {f"{s}_{k}{suffix}": [r["results"][name][s].get(f"{k}{suffix}") for r in per_seed.values()]
                  for s, k in COLUMNS for suffix in ("", "_letter")}
        attack = ATTACKED.get(name)
        for suffix in ATTACKS.values():
            if attack and all(attack + suffix in r for r in per_seed.values()):
                values[f"AG{suffix}"] = [r[attack + suffix]["AG"] for r in per_seed.values()]
        mean[name], spread[name] = {}, {}
        for key, xs in values.items():
            xs = [x for x in xs if x is not None]
            mean[name][key] = statistics.fmean(xs) if xs else None
            spread[name][key] = statistics.stdev(xs) if len(xs) > 1 else None
    return mean, spread


def seeds_table(mean: dict, spread: dict, seeds) -> str:
    """Mean ± sample standard deviation over the seeds, per model: accuracy columns and AG."""
    cols = [f"{s}_{k}" for s, k in COLUMNS] + ["forget_vqa_letter", "retain_qa_letter", "AG", "AG_people"]
    width = max(12, *(len(m) for m in mean))
    lines = [f"-- mean ± sd over seeds {', '.join(map(str, seeds))} (accuracy %, likelihood; letter: greedy letter; "
             "AG: forget VQA after relearning − before; AG_people: on the forget people the attack left out)",
             f"{'model':<{width}} " + " ".join(f"{c.replace('realworld', 'realw'):>18}" for c in cols)]
    for name in mean:
        cells = []
        for c in cols:
            m, sd = mean[name].get(c), spread[name].get(c)
            cells.append("-" if m is None else f"{m:.1f}" + (f" ± {sd:.1f}" if sd is not None else ""))
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def figure(mean: dict, attacks: dict, path: Path) -> None:
    """Accuracy per model and column (seed means) beside the relearning curves (one per seed and model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(mean)
    for i, (name, res) in enumerate(mean.items()):
        ax.bar([j + i * width for j in range(len(COLUMNS))], [res[f"{s}_{k}"] or 0 for s, k in COLUMNS], width,
               label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(COLUMNS))], [f"{s}\n{k.upper()}" for s, k in COLUMNS])
    ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
    ax.set_ylabel("accuracy (%)"), ax.set_ylim(0, 122), ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, loc="upper center", ncol=3), ax.set_title("seed means")
    for (name, seed, hold_out), a in attacks.items():
        ax2.plot(range(len(a["forget_vqa"])), a["forget_vqa"], marker="o" if name == "unlearned" else "s",
                 color="C2" if name == "unlearned" else "C1", alpha=0.8, ls="-" if hold_out == "rows" else ":",
                 label=f"{name} (seed {seed})" if hold_out == "rows" else None)      # the bars' colours
    ax2.axhline(mean["vanilla"]["forget_vqa"], color="C0", ls="--", lw=1, label="vanilla (mean)")
    ax2.set_xlabel("relearning epoch"), ax2.set_ylabel("forget-VQA accuracy (%)"), ax2.set_ylim(0, 105)
    ax2.set_title("relearning attacks (dotted: held-out people)", fontsize=9), ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_demo_output(path: Path) -> bool:
    """A directory a previous `surgery demo` wrote (the demo replaces its own output without --overwrite)."""
    try:
        return "per_seed" in json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return False


def qa_examples(bench: Path, views: str) -> list[Example]:
    """Every option of every text-only multiple-choice row: the LLM's answers that unlearning must not move."""
    return [Example(r.prompt(), option_answer(r, letter), None) for path in split_files(bench, views).values()
            for r in load_jsonl(path) if r.options and not r.is_vqa for letter in sorted(r.options)]


def score(path, bench: Path, views: str, seed: int, examples: list[Example]) -> dict:
    """A model's evaluation ("results") and the log-likelihood of every QA option (`examples`, "logprobs")."""
    adapter = load(str(path), seed=seed)
    return {"results": evaluate(adapter, bench, views=views, rouge=False),
            "logprobs": answer_logprobs(adapter, examples)}


def run_seed(seed: int, cfg: DemoConfig, tmp: Path, cache: Path, timings: dict, pool=None) -> dict:
    """One benchmark seed: benchmark, vanilla (+ reference), VKD (+ β = 0), evaluation, attacks, as one plan of steps
    over this process and `pool`'s (lanes.py). The models are built as `finetune.model_plan` lays them out; the
    saliency (half on each lane when the models are cached), the demo's β and its attacks run on the vanilla model's
    lane, β = 0 on the other, and the vanilla and reference model's evaluation and the reference's attack where that
    lane has time. Every step seeds itself: the numbers are those of one process."""
    seed_everything(seed)
    t = time.perf_counter()
    bench, bench_cached = benchmark(seed, cfg.bench, cache)
    timings[f"make_bench_s[{seed}]"] = time.perf_counter() - t
    ft = replace(cfg.finetune, seed=seed, threads=cfg.threads or cfg.finetune.threads)
    steps, models, lane = model_plan(bench, ft, cache, reference=cfg.reference)
    other = {"here": "there", "there": "here"}[lane]
    built = [s.name for s in steps if not s.name.startswith("model[")]
    # where β = 0, the vanilla and reference model's evaluation and the reference's attacks go: with the models
    # cached, beside the demo's β; with them to build, the vanilla one's after the demo's β and the reference's after
    # its alignment, on its own lane, then β = 0 there. (With stage 0 to train, β = 0 was on the vanilla lane until
    # 2026-12-04; but the reference's lane, which trains stage 0, ends its alignment 28-35 s after the vanilla lane
    # in the four cold runs of seed 0 on record, and then has 16 s of work against the vanilla lane's 70 s.)
    vanilla_eval = lane if built else other
    # with the models cached, the unlearned model's evaluation goes to the other lane, after β = 0's, while this
    # lane attacks it: with it here, this lane's work took 102-107 s per seed of the main job and the other's 82-88 s,
    # 54-58 s of which were the vanilla and reference model's results, now kept in the cache (result_cache.py)
    unlearned_eval = other if not built else lane
    examples = qa_examples(bench, cfg.views)
    digest = bench_digest(bench)
    attack = dict(share=cfg.relearn_share, epochs=cfg.relearn_epochs, seed=seed, views=cfg.views)
    work = tmp / f"seed-{seed}"
    base = Config(model=str(models["vanilla"]), forget=str(bench / "forget.jsonl"),
                  retain=str(bench / "retain.jsonl"), out=str(work / "saliency"), seed=seed, **cfg.unlearn)
    if cfg.distill_extras:
        base.distill_images = str(distill_file(bench, cfg.distill_extras, work / "distill-images.jsonl"))
    saliency = str(work / "saliency" / "saliency.safetensors")
    runs = {"unlearned": "unlearned", **({"unlearned (beta=0)": "unlearned-beta0"} if cfg.ablation else {})}
    models.update({name: work / d for name, d in runs.items()})

    def kept(name, kind, where, fn, args, params, after):
        """The step `kind` of the model `name`, a JSON value: the vanilla and reference model's kept in the cache
        (result_cache.py), an unlearned model's computed on every run."""
        keep = str(cache) if name in ("vanilla", "reference") else None
        return Step(kind, where, cached, (keep, kind, models[name], digest, params, fn, *args), after=(after,))

    def evaluated(name, where, after):
        return kept(name, f"eval[{name}]", where, score, (models[name], bench, cfg.views, seed, examples),
                    {"views": cfg.views, "seed": seed, "rouge": False}, after)

    def attacked(name, where, hold_out, after):
        kw = {**attack, "hold_out": hold_out}
        return kept(name, f"{ATTACKED[name]}{ATTACKS[hold_out]}", where, partial(relearn, models[name], bench, **kw),
                    (), kw, after)

    def unlearned(name, where, kw, eval_lane):
        run = replace(base, out=str(models[name]), saliency=saliency, **kw)
        return [Step(f"unlearn[{name}]", where, prune_and_mask, (run,), {"progress": False}, after=("saliency",)),
                evaluated(name, eval_lane, f"unlearn[{name}]")]

    reference = [evaluated("reference", other, "model[reference]"),
                 *(attacked("reference", other, hold_out, "model[reference]") for hold_out in ATTACKS)
                 ] if cfg.reference else []
    ablation = unlearned("unlearned (beta=0)", other, {**cfg.unlearn, "beta": 0.0, "distill_images": None},
                         other) if cfg.ablation else []
    # β changes nothing before unlearning: the saliency is collected once. With the models cached the other lane
    # has nothing to do until it is: each lane takes half its batches (the same bits as one pass, saliency.merge;
    # 36 s of a seed's 86-92 s on one lane before)
    if built:
        steps.append(Step("saliency", lane, collect_saliency, (base,), {"progress": False}, after=("model[vanilla]",)))
    else:
        steps += [Step("saliency[head]", other, saliency_half, (base, "head"), after=("model[vanilla]",)),
                  Step("saliency[tail]", lane, saliency_half, (base, "tail"), after=("model[vanilla]",)),
                  Step("saliency", lane, save_saliency, (base, From("saliency[head]"), From("saliency[tail]")),
                       after=("saliency[head]", "saliency[tail]"))]
    # a lane runs its steps in this list's order (one process: all of them): the reference's work, then β = 0
    steps += [*reference, *ablation,
              *unlearned("unlearned", lane, cfg.unlearn, unlearned_eval),
              *(attacked("unlearned", lane, hold_out, "unlearn[unlearned]") for hold_out in ATTACKS),
              evaluated("vanilla", vanilla_eval, "model[vanilla]")]
    values = run_plan(steps, pool, cfg.threads, timings, seed)

    vanilla_cached = values["model[vanilla]"][1]
    kinds = [s.name for s in steps if s.fn is cached]
    kept_results = [kind for kind in kinds if values[kind][1]]       # read from the cache, not computed
    if kept_results:
        log.info("seed %d: %s read from the cache (%s)", seed, ", ".join(kept_results), cache / "results")
    values.update({kind: values[kind][0] for kind in kinds})
    results, logprobs = {}, {}
    for name in ["vanilla", *(["reference"] if cfg.reference else []), *runs]:   # the table's order
        results[name] = values[f"eval[{name}]"]["results"]
        logprobs[name] = torch.tensor(values[f"eval[{name}]"]["logprobs"], dtype=torch.float64)
    reports = {name: values[f"unlearn[{name}]"] for name in runs}
    # text-only rows never reach the vision weights: every QA option's log-likelihood must be bit-identical
    shifts = {name: float((logprobs[name] - logprobs["vanilla"]).abs().max()) for name in runs}
    out = {"bench": str(bench), "bench_cached": bench_cached, "bench_digest": digest,
           "vanilla_model": str(models["vanilla"]), "vanilla_cached": vanilla_cached, "results_cached": kept_results,
           "results": results,
           "qa_logprob_max_abs_change": shifts,
           "unlearn": {name: {k: r[k] for k in ("pruned_neurons", "mask_density", "splits", "steps_run", "losses",
                                                "timings")
                              if k in r}
                       for name, r in reports.items()},
           **{f"relearn{x}": values[f"relearn{x}"] for x in ATTACKS.values()}}
    if cfg.reference:
        out["reference_model"] = str(models["reference"])
        out.update({f"relearn_reference{x}": values[f"relearn_reference{x}"] for x in ATTACKS.values()})
    log.info("seed %d:\n%s", seed, table(results))
    return out


def demo(out, cfg: DemoConfig | None = None, cache: Path | None = None, overwrite: bool = False) -> dict:
    """Run the demo into `out` (atomically). Returns the report (also written to OUT/report.json)."""
    cfg = cfg or DemoConfig.make()
    cfg.check()
    out, cache = Path(out), Path(cache or cache_root())
    if cache.exists() and not cache.is_dir():
        raise FileExistsError(f"--cache {cache} is a file, not a directory")
    if out.exists() and not overwrite:
        if not is_demo_output(out):
            raise FileExistsError(f"--out {out} already exists and is not a demo output (pass --overwrite to replace it)")
        log.info("replacing the previous demo output in %s", out)
        overwrite = True
    t0, timings = time.perf_counter(), {}
    with atomic_dir(out, overwrite, keep={"--cache": cache}) as tmp, torch_threads(cfg.threads), \
            (spawned_process() if cfg.processes == 2 else nullcontext()) as pool:
        per_seed = {}
        for seed in cfg.seeds:
            t = time.perf_counter()
            per_seed[seed] = run_seed(seed, cfg, tmp, cache, timings, pool)
            timings[f"seed_s[{seed}]"] = time.perf_counter() - t    # the seed's wall time, from its benchmark on
        mean, spread = summarize(per_seed)
        shifts = [x for r in per_seed.values() for x in r["qa_logprob_max_abs_change"].values()]
        checks = {"quick run: not a measurement": True} if cfg.quick else \
            targets(mean, shifts, {p: (mean["unlearned"].get(f"AG{x}"), mean.get("reference", {}).get(f"AG{x}"))
                                   for p, x in ATTACKS.items()},
                    cfg.unlearn.get("beta", Config.beta))
        timings["total_s"] = time.perf_counter() - t0
        attacks = {(name, seed, hold_out): r[key + suffix] for seed, r in per_seed.items()
                   for name, key in ATTACKED.items()
                   for hold_out, suffix in ATTACKS.items() if key + suffix in r}
        figure(mean, attacks, tmp / "demo.png")
        text = "\n\n".join([*(f"seed {s} ({cfg.views} views)\n{table(r['results'])}" for s, r in per_seed.items()),
                            seeds_table(mean, spread, cfg.seeds)])
        report = {"config": {**asdict(cfg), "out": str(out), "cache": str(cache)}, "seeds": list(cfg.seeds),
                  "views": cfg.views, "dtype": str(resolve_dtype(Config(**cfg.unlearn))).replace("torch.", ""),
                  "benchmark_models_dtype": "float32", "threads": torch.get_num_threads(),
                  "environment": environment("cpu"),
                  "per_seed": {str(s): r for s, r in per_seed.items()}, "mean": mean, "spread": spread,
                  "targets": checks, "timings": timings, "table": text}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        relocate(tmp, out.resolve())
    log.info("demo written to %s in %.0fs", out, timings["total_s"])
    return report
