"""Is a person's identity still linearly decodable from the vision tower, layer by layer? A linear probe per layer.

VKD edits the vision tower's MLPs only (layers 4-6 by default), and a relearning attack restores the forget VQA
accuracy far past what the reference model (a tower that never saw the forget people) reaches. This asks whether
the forgetting is shallow: for every model given, every photo's output of each live vision layer (the hidden state
after the layer, patch tokens mean-pooled, CLS dropped) and of the projector (mean-pooled over its rows) is
extracted with the model's own preprocessing; then, for the forget people and the retain people separately, a
multinomial logistic-regression probe (features standardised with the training photos' mean and std, a small L2,
full-batch L-BFGS from zero weights: deterministic) is fitted on the training views (forget.jsonl / retain.jsonl)
and scored on the held-out views (eval_*.jsonl; dev_*.jsonl with --views dev). One label per photo: its entity.

    python benchmarks/identity_probe.py --bench B --model vanilla=V --model reference=R --model unlearned=U \\
        --views test --json out/probe.json

A table of held-out accuracies (%) goes to stderr, rows model x group, columns the layers and the projector, with
the chance level (100 / people in the group). LLaVA-family models only. One torch thread by default, as the demo.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from surgery.numerics import pin_cpu_numerics

pin_cpu_numerics()   # as `surgery`'s command line: before torch picks its kernels
import torch  # noqa: E402

from surgery.bench.tower import feature_layer_output, in_chunks, pixel_values  # noqa: E402
from surgery.data import DataError, load_jsonl  # noqa: E402
from surgery.models import load  # noqa: E402
from script_args import named_models  # noqa: E402

GROUPS = ("forget", "retain")


def photos(bench: Path, split: str) -> tuple[list[str], list[str]]:
    """The distinct photos of a JSONL file's image rows (absolute paths, first-seen order) and each one's entity."""
    seen: dict[str, str] = {}
    for row in load_jsonl(bench / split):
        if row.image is None:
            continue
        if row.entity is None:
            raise DataError(f"{row.where}: an image row without an 'entity'")
        image = str(Path(row.image).resolve())
        if seen.setdefault(image, row.entity) != row.entity:
            raise DataError(f"{row.where}: {row.image} is a photo of {seen[image]!r} elsewhere, here of {row.entity!r}")
    if not seen:
        raise DataError(f"{bench / split}: no image rows")
    return list(seen), list(seen.values())


def probe_sets(bench: Path, views: str) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """{group: {"train": (photos, entities), "test": (photos, entities)}}."""
    held_out = "eval" if views == "test" else "dev"
    return {g: {"train": photos(bench, f"{g}.jsonl"), "test": photos(bench, f"{held_out}_{g}.jsonl")} for g in GROUPS}


def extract(adapter, images: list[str]) -> dict[str, torch.Tensor]:
    """Each photo's mean-pooled patch tokens after every live vision layer ("layer i") and its mean-pooled projector
    output ("projector"): {name: [N, D]}, computed by `feature_layer_output` with a hook on each layer."""
    layers = adapter.model.model.vision_tower.encoder.layers
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in adapter.live_layers}

    def keep(i):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            outputs[i].append(out[:, 1:].mean(1))    # CLS dropped, as the projector reads them
        return hook
    handles = [layers[i].register_forward_hook(keep(i)) for i in adapter.live_layers]
    try:
        projected = in_chunks(lambda x: adapter.projector(feature_layer_output(adapter, x)).mean(1),
                              pixel_values(adapter, "/", images))
    finally:
        for h in handles:
            h.remove()
    feats = {f"layer {i}": torch.cat(outputs[i]) for i in adapter.live_layers}
    feats["projector"] = projected
    return {k: v.double() for k, v in feats.items()}


def fit_probe(x_train: torch.Tensor, y_train: list, x_test: torch.Tensor, y_test: list, *, l2: float = 1e-3,
              seed: int = 0, max_iter: int = 500) -> float:
    """Held-out accuracy (%) of a multinomial logistic regression fitted on (x_train, y_train): features standardised
    with the training set's mean and std, mean cross-entropy + l2/2 * |W|^2, full-batch L-BFGS from zero weights in
    float64. A test label never seen in training counts as a miss."""
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    xs, xt = (x_train - mean) / std, (x_test - mean) / std
    target = torch.tensor([index[y] for y in y_train])
    torch.manual_seed(seed)
    weight = torch.zeros(xs.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ weight + bias, target) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        predicted = (xt @ weight + bias).argmax(1).tolist()
    hits = sum(index.get(y, -1) == p for y, p in zip(y_test, predicted))
    return 100.0 * hits / len(y_test)


def probe_model(path: str, sets: dict, seed: int) -> tuple[dict, dict]:
    """({group: {"people", "train_photos", "test_photos", "chance", "accuracy": {column: %}}}, {group: the test
    photos' features}) for one model."""
    adapter = load(path)
    if adapter.family.style != "llava":
        raise ValueError(f"--model {path}: a {adapter.model_type} model; the probe reads LLaVA's vision tower only")
    adapter.model.eval()
    out, features = {}, {}
    for group, s in sets.items():
        (train_images, train_y), (test_images, test_y) = s["train"], s["test"]
        train, test = extract(adapter, train_images), extract(adapter, test_images)
        people = len(set(train_y))
        out[group] = {"people": people, "train_photos": len(train_y), "test_photos": len(test_y),
                      "chance": 100.0 / people,
                      "accuracy": {k: fit_probe(train[k], train_y, test[k], test_y, seed=seed) for k in train}}
        features[group] = test
    return out, features


def shift(features: dict, base: dict) -> dict:
    """{column: how far `features` moved from `base`'s, per photo |f - b| / |b|, mean over the photos}."""
    return {k: ((features[k] - base[k]).norm(dim=1) / base[k].norm(dim=1).clamp_min(1e-12)).mean().item()
            for k in base}


def table(results: dict, key: str = "accuracy", cell: str = "{:9.1f}") -> str:
    columns = list(next(iter(next(iter(results.values())).values()))[key])
    head = f"{'model':<20} {'group':<7} {'chance':>6}  " + "  ".join(f"{c.replace('layer ', 'L'):>9}" for c in columns)
    lines = [head]
    for name, groups in results.items():
        for group, r in groups.items():
            lines.append(f"{name:<20} {group:<7} {r['chance']:6.1f}  "
                         + "  ".join(cell.format(r[key][c]) for c in columns))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, required=True, help="a `surgery make-bench` directory")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                    help="a model to probe, named for the table (repeatable)")
    ap.add_argument("--views", choices=("test", "dev"), default="test",
                    help="held-out photos: eval_*.jsonl (test, default) or dev_*.jsonl (dev)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the probes (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--shift-from", metavar="NAME", help="also report how far each model's test-photo features moved "
                    "from this model's (e.g. vanilla): per photo |f - f_NAME| / |f_NAME|, mean")
    args = ap.parse_args(argv)
    if not args.bench.is_dir():
        ap.error(f"--bench {args.bench}: no such directory")
    held_out = "eval" if args.views == "test" else "dev"
    for split in (*(f"{g}.jsonl" for g in GROUPS), *(f"{held_out}_{g}.jsonl" for g in GROUPS)):
        if not (args.bench / split).is_file():
            ap.error(f"--bench {args.bench}: no {split}")
    models = named_models(ap, args.model)
    if args.json and not args.json.parent.is_dir():
        ap.error(f"--json {args.json}: the directory {args.json.parent} does not exist")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1 (got {args.threads})")
    if args.shift_from is not None and args.shift_from not in models:
        ap.error(f"--shift-from {args.shift_from}: not one of the --model names ({', '.join(models)})")
    torch.set_num_threads(args.threads)
    try:
        sets = probe_sets(args.bench, args.views)
    except (DataError, OSError) as e:
        ap.error(f"--bench {args.bench}: {e}")
    results, features = {}, {}
    for name, path in models.items():
        t0 = time.perf_counter()
        try:
            results[name], features[name] = probe_model(path, sets, args.seed)
        except (OSError, ValueError) as e:
            sys.exit(f"--model {name}={path}: {e}")
        print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    print(table(results), file=sys.stderr)
    if args.shift_from is not None:
        base = features[args.shift_from]
        for name in models:
            for group in GROUPS:
                results[name][group]["shift"] = shift(features[name][group], base[group])
        print(f"feature shift from {args.shift_from} (test photos, mean |f - f_{args.shift_from}| / "
              f"|f_{args.shift_from}|):", file=sys.stderr)
        print(table(results, "shift", "{:9.3f}"), file=sys.stderr)
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps({"bench": str(args.bench), "views": args.views, "seed": args.seed,
                                   "shift_from": args.shift_from,
                                   "threads": args.threads, "models": models, "results": results}, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
