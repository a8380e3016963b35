"""`surgery compare`: every unlearning method on the same vanilla model, data, seeds and relearning attack, in one
table laid out like the paper's Table 1 (forget / retain / real-world VQA and QA), plus the relearning gain AG, time
per step, peak memory and trainable weights per method.

Per benchmark seed: the benchmark (generated for the seed, or --bench), its vanilla model (fine-tuned once and cached,
or --model), the vanilla model's scores, then per method: unlearn on the shared loop -> evaluate -> relearning attack.
Each method run happens in a fresh process, so its peak resident memory is its own (CUDA: the allocator's peak).
Results are cached under CACHE/compare, keyed by the method, its resolved config, the vanilla model, the benchmark's
files, the attack and the evaluation: a re-run computes only what is new. A run whose loss or weights become
non-finite is reported as diverged and not scored. Several seeds give the mean and the spread (sample standard
deviation) of every number.
"""
import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import transformers

from . import __version__
# the benchmark: used only in the section marked below, so that a new benchmark version is a change there (lanes:
# the spawned process that isolates a run)
from .bench.demo import bench_digest, benchmark
from .bench.evaluate import evaluate, split_files
from .bench.finetune import FinetuneConfig, cache_root, vanilla_model
from .bench.lanes import spawned_process
from .bench.relearn import HOLD_OUTS, LR, relearn
from .config import Config, check_seeds, exclusive
from .data import load_jsonl, load_splits
from .methods import METHODS, NonFiniteError, get
from .methods.loop import check_run
from .models import load
from .pipeline import atomic_dir, check_device, environment, resolve, run, torch_threads

log = logging.getLogger("surgery")
COLUMNS = [("forget", "vqa"), ("forget", "qa"), ("retain", "vqa"), ("retain", "qa"), ("realworld", "vqa"),
           ("realworld", "qa")]
TRAINING = ("alpha", "lr", "weight_decay", "steps", "epochs", "stop_forget_loss", "stop_window", "stop_forget_accuracy",
            "stop_holdout", "stop_every", "schedule", "batch_size", "max_grad_norm")
# One training budget for every method that trains: the lr and step count chosen for VKD on the dev views before the
# demo's VKD stopped early (bench.demo.UNLEARN); the baselines were not tuned. Every method runs exactly these steps:
# an early stop is a setting of one method (--set vkd.stop_forget_accuracy=35), not part of a shared budget.
BUDGET = dict(lr=5e-4, steps=150)
PATHS = ("model", "forget", "retain", "out", "saliency", "teacher_cache")
EVAL_VERSION = 3          # bump when the scoring changes: cached results are then recomputed (3: rows of other
                          # option counts score on their own options; relearn's rows count both folds)


@dataclass
class CompareConfig:
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)       # benchmark seeds (with --bench: seeds of the vanilla fine-tune and the runs)
    bench: str | None = None            # an existing benchmark directory for every seed (default: generate one)
    model: str | None = None            # the vanilla model, used as it is (needs --bench)
    steps: int = BUDGET["steps"]        # one training budget for every method that trains (BUDGET)
    lr: float = BUDGET["lr"]
    batch_size: int = 4
    scope: str | None = None            # None: each method's own (its paper's)
    device: str = "cpu"
    overrides: dict = field(default_factory=dict)   # {method: {Config field: value}}
    relearn_share: float = 0.2
    relearn_epochs: int = 5
    generation: bool = False            # also letter accuracy and ROUGE-L by greedy generation (slower)
    threads: int = 1                    # torch CPU threads of every step (as the demo: reproducible numbers; 0: as set)
    views: str = "test"                 # test: held-out views (report); dev: the views tuning may look at
    isolate: bool = True                # one fresh process per method run (fair peak memory)
    bench_params: dict | None = None    # make_bench arguments (default: the demo's benchmark)
    finetune: dict = field(default_factory=dict)    # FinetuneConfig fields of the vanilla model

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(METHODS)}")
        check_seeds(self.seeds)
        if self.views not in ("test", "dev"):
            raise ValueError(f"--views {self.views!r}: choose test or dev")
        check_device(self.device)
        if self.model and not self.bench:
            raise ValueError("--model needs --bench: a vanilla model belongs to the benchmark it was trained on")
        if self.steps < 1 or not 0 < self.lr < math.inf or self.batch_size < 1:
            raise ValueError(f"--steps, --lr and --batch-size must be positive (got {self.steps}, {self.lr}, "
                             f"{self.batch_size})")
        if not 0 < self.relearn_share <= 1 or self.relearn_epochs < 1:
            raise ValueError(f"--relearn-share must be in (0, 1] and --relearn-epochs >= 1 (got "
                             f"{self.relearn_share}, {self.relearn_epochs})")
        settable = {f.name for f in fields(Config)} - set(PATHS) - {"method", "seed", "device", "extra"}
        for method, values in self.overrides.items():
            if method not in self.methods:
                raise ValueError(f"--set {method}.…: {method} is not among --methods")
            bad = sorted(set(values) - settable)
            if bad:
                raise ValueError(f"--set {method}.{bad[0]}: not a setting of a run (one of "
                                 f"{', '.join(sorted(settable))})")
            try:
                values = exclusive(values)
            except ValueError as e:
                raise ValueError(f"--set {method}.…: {e}") from None
            check_run(values, f"--set {method}.")


# ----- the benchmark: every call into surgery.bench is in this section ---------------------------------------------
def _benchmark(cfg: CompareConfig, seed: int, cache: Path) -> Path:
    """The benchmark of this seed: --bench, or the demo's benchmark for the seed (generated once, cached)."""
    if cfg.bench:
        return Path(cfg.bench).resolve()
    return benchmark(seed, cfg.bench_params or {}, cache)[0]


def _vanilla(cfg: CompareConfig, bench: Path, seed: int, cache: Path) -> tuple[Path, str, str]:
    """(vanilla model, where it came from: "--model", "cache" or "trained", an id that changes when the model does)."""
    if cfg.model:
        model = Path(cfg.model).resolve()
        files = sorted(p for p in model.iterdir() if p.is_file()) if model.is_dir() else []
        if not files:
            raise FileNotFoundError(f"--model {model}: not a model directory")
        stamp = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
        return model, "--model", f"{model}:{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    path, cached = vanilla_model(bench, FinetuneConfig(**{"seed": seed, "threads": cfg.threads, **cfg.finetune}), cache)
    return path, "cache" if cached else "trained", path.name   # the name holds the content hash of benchmark + fine-tune config


def _digest(bench: Path) -> str:
    return bench_digest(bench)


def _inputs(bench: Path) -> tuple[Path, Path]:
    """The method's forget and retain files (training rows; evaluation uses the held-out views)."""
    return bench / "forget.jsonl", bench / "retain.jsonl"


def _check_bench(bench: Path, views: str) -> None:
    """Every file a run reads, read (and its photos decoded) once before any model work: a broken benchmark is an
    input error, named with its file and line, not a failure of every method in turn."""
    load_splits(*_inputs(bench))
    files = split_files(bench, views)
    rows = {split: load_jsonl(path) for split, path in files.items()}
    if "forget" not in files:
        raise FileNotFoundError(f"--bench {bench}: no forget file for the {views} views (the relearning attack "
                                "measures forgetting on it)")
    if not any(r.is_vqa and r.options for r in rows["forget"]):
        raise ValueError(f"{files['forget']}: no multiple-choice VQA rows (the relearning attack measures forgetting "
                         "on them)")


def _score(model: Path, bench: Path, device: str, generation: bool, seed: int, views: str) -> dict:
    return evaluate(load(str(model), device=device, seed=seed), bench, letter=generation, rouge=generation,
                    views=views)


def _attack(model: Path, bench: Path, cfg: dict, seed: int, hold_out: str = "rows") -> dict:
    return relearn(model, bench, share=cfg["relearn_share"], epochs=cfg["relearn_epochs"], seed=seed,
                   device=cfg["device"], views=cfg["views"], hold_out=hold_out)


def _cache_root() -> Path:
    return cache_root()
# ---------------------------------------------------------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """One method on one seed: unlearn (into a scratch directory) -> evaluate -> relearning attack. Runs in a fresh
    process when isolated; a NonFiniteError is a result (diverged), any other error propagates."""
    if job.get("log_level") is not None:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
        log.setLevel(job["log_level"])
    cfg = Config(**job["config"])
    out = Path(cfg.out)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])       # its own process (or restored by compare() when in-process)
    try:
        try:
            report = run(cfg, overwrite=True, progress=job.get("progress", False))
            memory = report["memory"]       # the run's own peak (before evaluation and attack)
        except NonFiniteError as e:
            log.warning("%s diverged on seed %d: %s", cfg.method, cfg.seed, e)
            return {"status": "diverged", "error": str(e)}
        bench = Path(job["bench"])
        scores = _score(out, bench, cfg.device, job["generation"], cfg.seed, job["views"])
        attack = _attack(out, bench, job, cfg.seed)
        try:
            people = _attack(out, bench, job, cfg.seed, hold_out="people")
        except ValueError as e:     # a benchmark without two named forget people: the paper's attack alone
            log.warning("no relearning attack on held-out people for %s: %s", cfg.method, e)
            people = None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    timings = report["timings"]
    return {"status": "ok", "scores": scores, "relearn": attack, "AG": attack["AG"], "relearn_people": people,
            "AG_people": people and people["AG"],
            "steps": len(report["losses"]), "step_s": timings.get("step_s"), "train_s": timings.get("train_s"),
            "prepare_s": timings.get("prepare_s"), "total_s": timings.get("total_s"), "memory": memory,
            "memory_isolated": job["isolate"], "trainable_weights": report["trainable_weights"],
            "scope": report["scope"]["name"], "pruned_neurons": sum((report.get("pruned_neurons") or {}).values()),
            "config": {**report["config"], "out": None}, "dtype": report["dtype"], "losses_last": report["losses"][-1] if report["losses"] else None}


def _execute(job: dict, isolate: bool) -> dict:
    if not isolate:
        return run_job(job)
    # a fresh interpreter per run: its peak RSS is the run's own, and nothing leaks from one method to the next
    with spawned_process() as pool:
        return pool.submit(run_job, job).result()


def job_config(cfg: CompareConfig, method: str, seed: int, vanilla: Path, bench: Path, out: Path) -> Config:
    """The run's Config with the method's defaults filled in (what report.json records)."""
    forget, retain = _inputs(bench)
    base = Config(method=method, model=str(vanilla), forget=str(forget), retain=str(retain), out=str(out), seed=seed,
                  device=cfg.device, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, scope=cfg.scope)
    return resolve(replace(base, **exclusive(cfg.overrides.get(method, {}))))[0]


def cache_key(run_cfg: Config, trains: bool, vanilla_id: str, digest: str, cfg: CompareConfig) -> str:
    """What a method's result depends on: its config (paths aside; training settings aside for a training-free
    method), the vanilla model, the benchmark files, the attack, the evaluation and the library versions."""
    settings = {k: v for k, v in run_cfg.to_dict().items() if k not in PATHS and (trains or k not in TRAINING)}
    for stop, its in (("stop_forget_loss", ("stop_window",)), ("stop_forget_accuracy", ("stop_holdout", "stop_every"))):
        if settings.get(stop) is None:                  # no such early stop: its options are no setting (older keys
            for k in (stop, *its):                      # hold)
                settings.pop(k, None)
        else:                                           # 1 and 1.0 are one setting
            settings[stop] = float(settings[stop])
    for later in ("checkpoint_vision", "offload_optimizer"):  # added later, and off: older keys hold
        if not settings.get(later):
            settings.pop(later, None)
    what = {"config": settings, "vanilla": vanilla_id, "bench": digest, "relearn": [cfg.relearn_share,
            cfg.relearn_epochs, HOLD_OUTS, LR], "generation": cfg.generation, "views": cfg.views, "threads": cfg.threads,
            "eval": EVAL_VERSION,
            "versions": [__version__, torch.__version__, transformers.__version__]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached(path: Path, compute):
    """The JSON in `path`, or compute() written there (atomically) and returned. Returns (value, was cached)."""
    if path.is_file():
        return json.loads(path.read_text()), True
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{id(value)}")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)
    return value, False


def summarize(seeds: dict, methods: tuple) -> dict:
    """Per row (vanilla, then each method) and number: the values over the seeds where the run is scored, their mean
    and sample standard deviation; the per-person interval of a single seed when the benchmark gives one."""
    rows = {"vanilla": [s["vanilla"] for s in seeds.values()]}
    for m in methods:
        rows[m] = [s["methods"][m] for s in seeds.values()]
    summary = {}
    for name, results in rows.items():
        scored = [r for r in results if name == "vanilla" or r["status"] == "ok"]
        entry = {"runs": len(results), "scored": len(scored),
                 "diverged": sum(1 for r in results if r.get("status") == "diverged"),
                 "failed": sum(1 for r in results if r.get("status") == "failed")}
        for split, kind in COLUMNS:
            scores = [r["scores"] if name != "vanilla" else r for r in scored]
            entry[f"{split}_{kind}"] = _stat([s.get(split, {}).get(kind) for s in scores])
            entry[f"{split}_{kind}_letter"] = _stat([s.get(split, {}).get(f"{kind}_letter") for s in scores])
            if len(scores) == 1 and scores[0].get(split, {}).get(f"{kind}_ci"):
                entry[f"{split}_{kind}"]["ci"] = scores[0][split][f"{kind}_ci"]
            entry[f"{split}_rougeL_vqa"] = _stat([s.get(split, {}).get("rougeL_vqa") for s in scores])
        if name != "vanilla":
            for key in ("AG", "AG_people", "step_s", "trainable_weights", "pruned_neurons"):
                entry[key] = _stat([r.get(key) for r in scored])
            entry["unlearn_s"] = _stat([(r.get("prepare_s") or 0) + (r.get("train_s") or 0) for r in scored])
            entry["peak_rss_bytes"] = _stat([r["memory"].get("peak_rss_bytes") for r in scored
                                             if r["memory_isolated"]])
            entry["cuda_max_allocated_bytes"] = _stat([r["memory"].get("cuda_max_allocated_bytes") for r in scored])
        summary[name] = entry
    return summary


def _stat(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def _cell(stat: dict, digits: int = 1, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean'] / scale:.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std'] / scale:.{digits}f}"
    elif stat.get("ci"):
        lo, hi = stat["ci"]
        text += f" [{lo / scale:.{digits}f}, {hi / scale:.{digits}f}]"
    return text


def table(summary: dict, methods: tuple, seeds: tuple, views: str = "test", given: str = "") -> str:
    """Markdown, Table 1 layout: accuracy (%) by option likelihood on held-out views, then AG (forget-VQA gain under
    the relearning attack), seconds per step, prepare + training time, peak memory and trainable weights; with
    generation scored, a second table by letter generation (MLLMU-Bench's style) and ROUGE-L. `given`: "bench" when
    every seed ran on one --bench, "model" when on one --model too (the seeds then vary less than the benchmark)."""
    head = ["method", "forget VQA ↓", "forget QA", "retain VQA ↑", "retain QA ↑", "real-world VQA ↑",
            "real-world QA ↑", "AG ↓", "AG people ↓", "s / step", "unlearn s", "peak mem (GiB)", "trainable", "scope"]
    lines = _rows(summary, head, lambda name, entry: [_cell(entry[f"{s}_{k}"]) for s, k in COLUMNS] + (
        ["–"] * 7 if name == "vanilla" else
        [_cell(entry["AG"]), _cell(entry["AG_people"]), _cell(entry["step_s"], 2), _cell(entry["unlearn_s"], 1), _cell(_memory(entry), 2, 2**30),
         _cell(entry["trainable_weights"], 0), entry.get("scope", "")]))
    if any(entry["forget_vqa_letter"]["n"] for entry in summary.values()):
        head = ["method", *(f"{h} (letter)" for h in head[1:7]), "forget ROUGE-L ↓", "retain ROUGE-L ↑"]
        lines += [""] + _rows(summary, head, lambda name, entry: [_cell(entry[f"{s}_{k}_letter"]) for s, k in COLUMNS]
                              + [_cell(entry["forget_rougeL_vqa"]), _cell(entry["retain_rougeL_vqa"])])
    n = len(seeds)
    kind = {"bench": "seeds (one benchmark, --bench; each seed its own vanilla fine-tune and runs)",
            "model": "seeds (one benchmark and one vanilla model, --bench and --model: the seeds vary the runs only)"
            }.get(given, "benchmark seeds")
    note = (f"Mean ± sample standard deviation over {n} {kind} ({', '.join(map(str, seeds))})." if n > 1
            else f"Seed {seeds[0]}; [a, b]: per-person bootstrap 95 % interval where the benchmark gives it.")
    where = "held-out test" if views == "test" else "dev"
    return "\n".join(lines) + "\n\n" + note + (
        f" Accuracy in %, {where} views, by option likelihood (letter: the first letter A-D of the greedy answer). AG: "
        "forget-VQA accuracy after the relearning attack − before it; AG people: the same on the forget people the "
        "attack left out (the attacker trains on the other half). unlearn s: the method's prepare step (statistics, "
        "masks, pruning) + training. Memory: peak RSS of the run's own process (CUDA: max allocated).")


def _memory(entry: dict) -> dict:
    return entry["cuda_max_allocated_bytes"] if entry["cuda_max_allocated_bytes"]["n"] else entry["peak_rss_bytes"]


def _rows(summary: dict, head: list, cells) -> list[str]:
    """Markdown rows: `cells(name, entry)` for scored rows; a method never scored says why."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, entry in summary.items():
        label = name
        if name != "vanilla" and entry["scored"] == 0:
            status = "diverged" if entry["diverged"] else "failed"
            row = [f"**{status}** ({entry[status]} of {entry['runs']})"] + ["–"] * (len(head) - 2)
        else:
            row = cells(name, entry)
            for status in ("diverged", "failed"):
                if name != "vanilla" and entry[status]:
                    label += f" ({status} on {entry[status]} of {entry['runs']} seeds)"
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def figure(summary: dict, methods: tuple, path: Path) -> None:
    """Forget-VQA drop against retain-VQA drop (vanilla − method, points) per method, AG in the label and the colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    van = summary["vanilla"]
    fig, ax = plt.subplots(figsize=(7, 5))
    points, skipped = [], []
    for m in methods:
        e = summary[m]
        if not e["scored"]:
            skipped.append(m)
            continue
        x = van["forget_vqa"]["mean"] - e["forget_vqa"]["mean"]
        y = van["retain_vqa"]["mean"] - e["retain_vqa"]["mean"]
        points.append((m, x, y, e["forget_vqa"]["std"] or 0, e["retain_vqa"]["std"] or 0, e["AG"]["mean"]))
    if points:
        ags = [p[5] for p in points]
        scatter = ax.scatter([p[1] for p in points], [p[2] for p in points], c=ags, cmap="coolwarm", s=70, zorder=3,
                             vmin=min(0.0, *ags), vmax=max(1.0, *ags))
        ax.errorbar([p[1] for p in points], [p[2] for p in points], xerr=[p[3] for p in points],
                    yerr=[p[4] for p in points], fmt="none", ecolor="grey", lw=1, zorder=2)
        for m, x, y, *_, ag in points:
            ax.annotate(f"{m} (AG {ag:+.1f})", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        fig.colorbar(scatter, ax=ax, label="AG (forget-VQA gain under relearning, points)")
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("forget-VQA drop from vanilla (points, higher: more forgotten)")
    ax.set_ylabel("retain-VQA drop from vanilla (points, lower: better kept)")
    ax.set_title("unlearning methods" + (f" (not scored: {', '.join(skipped)})" if skipped else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _method_result(cfg: CompareConfig, method: str, seed: int, vanilla: Path, vanilla_id: str, bench: Path,
                   digest: str, cache: Path, progress: bool, ledger: dict) -> dict:
    """One method on one seed: from the cache, or run (in its own process unless --in-process) and cached."""
    scratch = Path(tempfile.mkdtemp(prefix=f"surgery-compare-{method}-"))
    run_cfg = job_config(cfg, method, seed, vanilla, bench, scratch / "out")
    key = cache_key(run_cfg, get(method).trains, vanilla_id, digest, cfg)
    job = {"config": run_cfg.to_dict(), "bench": str(bench), "generation": cfg.generation, "views": cfg.views,
           "relearn_share": cfg.relearn_share, "relearn_epochs": cfg.relearn_epochs, "device": cfg.device,
           "isolate": cfg.isolate, "progress": progress, "log_level": log.getEffectiveLevel(),
           "threads": cfg.threads}
    t, path = time.perf_counter(), cache / "compare" / f"{method}-{key}.json"
    if cfg.isolate and path.is_file() and json.loads(path.read_text()).get("memory_isolated") is False:
        path.unlink()       # measured in-process: run it again in its own process for a fair peak
    try:
        result, hit = _cached(path, partial(_execute, job, cfg.isolate))
    except Exception as e:  # noqa: BLE001  (one method's bug must not hide the others' results)
        log.error("%s failed on seed %d: %s: %s", method, seed, type(e).__name__, e)
        result, hit = {"status": "failed", "error": f"{type(e).__name__}: {e}"}, None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ledger["failed" if hit is None else "reused" if hit else "computed"].append(f"{method}@{seed}")
    ledger["timings"][f"{method}_s[{seed}]"] = time.perf_counter() - t
    log.info("%s seed %d: %s%s", method, seed, result["status"], " (cached)" if hit else "")
    return {**result, "cache_key": key}


def _seed_results(cfg: CompareConfig, seed: int, cache: Path, progress: bool,
                  ledger: dict) -> dict:
    """The benchmark and vanilla model of one seed, the vanilla scores, and every method's result."""
    t = time.perf_counter()
    bench = _benchmark(cfg, seed, cache)
    _check_bench(bench, cfg.views)
    vanilla, vanilla_source, vanilla_id = _vanilla(cfg, bench, seed, cache)
    digest = _digest(bench)
    ledger["timings"][f"vanilla_s[{seed}]"] = time.perf_counter() - t
    key = hashlib.sha256(json.dumps([vanilla_id, digest, cfg.generation, cfg.views, EVAL_VERSION, cfg.device,
                                     cfg.threads, __version__, torch.__version__, transformers.__version__]).encode())
    scores, hit = _cached(cache / "compare" / f"vanilla-{key.hexdigest()[:20]}.json",
                          partial(_score, vanilla, bench, cfg.device, cfg.generation, seed, cfg.views))
    ledger["reused" if hit else "computed"].append(f"vanilla@{seed}")
    return {"bench": str(bench), "bench_digest": digest,
            "vanilla_model": str(vanilla), "vanilla_source": vanilla_source, "vanilla": scores,
            "methods": {m: _method_result(cfg, m, seed, vanilla, vanilla_id, bench, digest, cache, progress, ledger)
                        for m in cfg.methods}}


def compare(out, cfg: CompareConfig, cache: Path | None = None, overwrite: bool = False, progress: bool = True
            ) -> dict:
    """Run the comparison into `out` (atomically): report.json, table.md, compare.png and the benchmarks used."""
    cfg.check()
    out, cache = Path(out).resolve(), Path(cache).resolve() if cache else _cache_root().resolve()
    t0, ledger = time.perf_counter(), {"computed": [], "reused": [], "failed": [], "timings": {}}
    with atomic_dir(out, overwrite, {"--bench": cfg.bench, "--model": cfg.model}, keep={"--cache": cache}) as tmp, \
            torch_threads(cfg.threads):
        seeds = {seed: _seed_results(cfg, seed, cache, progress, ledger) for seed in cfg.seeds}
        summary = summarize(seeds, cfg.methods)
        for m in cfg.methods:
            scored = [s["methods"][m] for s in seeds.values() if s["methods"][m]["status"] == "ok"]
            summary[m]["scope"] = scored[0]["scope"] if scored else ""
        markdown = table(summary, cfg.methods, cfg.seeds, cfg.views, "model" if cfg.model else "bench" if cfg.bench else "")
        figure(summary, cfg.methods, tmp / "compare.png")
        ledger["timings"]["total_s"] = time.perf_counter() - t0
        given = {k: str(Path(v).resolve()) for k, v in (("bench", cfg.bench), ("model", cfg.model)) if v}
        report = {"compare": {**asdict(cfg), **given}, "out": str(out), "cache": str(cache), "environment": environment(cfg.device),
                  "seeds": {str(k): v for k, v in seeds.items()}, "summary": summary, "table": markdown, **ledger}
        (tmp / "table.md").write_text(markdown + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("compare written to %s in %.0fs (%d runs computed, %d from the cache)", out,
             ledger["timings"]["total_s"], len(ledger["computed"]), len(ledger["reused"]))
    return report
