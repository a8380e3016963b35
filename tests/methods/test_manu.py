"""MANU: the neurons it prunes match its four importance functions computed here from raw activations, and the saved
model differs from the input only in those neurons (zeroed)."""
import json

import torch
from click.testing import CliRunner
from handwritten import encode
from safetensors.torch import load_file

from surgery.cli import main
from surgery.data import load_splits
from surgery.methods.manu import language_mlps
from surgery.models import load


def activations(adapter, modules, rows, text=False):
    """The inputs of `modules` (MLP output projections) on `rows`: [tokens, H] fp64 each; for the language model's
    (`text`), padding tokens dropped."""
    seen = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args: seen[mod].append(args[0].detach())) for m in modules]
    batch = encode(adapter, rows)
    with torch.no_grad():
        adapter.model(**batch.inputs)
    for h in handles:
        h.remove()
    keep = batch.inputs["attention_mask"].bool()
    return [(seen[m][0][keep] if text else seen[m][0].reshape(-1, seen[m][0].shape[-1])).double() for m in modules]


def functions(z):
    return [z.abs().mean(0), (z > 0).double().mean(0), z.std(0, unbiased=False), z.pow(2).mean(0).sqrt()]


def expected_neurons(forget, retain, weights, frac):
    score = sum(w * (f / (r + 1e-8) - 1) for w, f, r in zip(weights, functions(forget), functions(retain)))
    return set(torch.topk(score, round(frac * score.numel())).indices.tolist())


def test_prunes_the_top_scored_neurons_and_nothing_else(tiny_dirs, data, tmp_path):
    weights, frac = (1.0, 0.5, 2.0, 1.5), 0.05
    model = tiny_dirs["tiny-llava"]
    out = tmp_path / "manu"
    res = CliRunner().invoke(main, ["unlearn", "--method", "manu", "--model", str(model), "--forget", str(data[0]),
                                    "--retain", str(data[1]), "--out", str(out), "--manu-weights", "1,0.5,2,1.5",
                                    "--prune-frac", str(frac), "--steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["scope"] == "full" and report["losses"] == [] and report["trainable_weights"] == 0
    chosen = load_file(str(out / "masks.safetensors"))

    adapter = load(str(model))
    splits = load_splits(*data)
    vision = [m for m in adapter.mlps if m.layer in adapter.live_layers]
    text = language_mlps(adapter)
    expected = {}
    for mlp, f, r in zip(vision, activations(adapter, [m.fc_out for m in vision], splits.fvqa),
                         activations(adapter, [m.fc_out for m in vision], splits.rvqa)):
        expected[(mlp.path, str(mlp.layer))] = expected_neurons(f, r, weights, frac)
    downs = [m.down_proj for m in text.values()]
    for name, f, r in zip(text, activations(adapter, downs, splits.fqa, text=True),
                          activations(adapter, downs, splits.rqa, text=True)):
        expected[(name, name)] = expected_neurons(f, r, weights, frac)
    assert len(expected) == 3 + 2
    for (_, key), neurons in expected.items():
        assert set(chosen[f"neurons.{key}"].tolist()) == neurons, key
        assert report["pruned_neurons"][key] == len(neurons) > 0

    before = adapter.model.state_dict()
    after = load(str(out)).model.state_dict()
    zeroed = {}
    for mlp in vision:
        idx = torch.tensor(sorted(expected[(mlp.path, str(mlp.layer))]))
        zeroed[f"{mlp.path}.fc1.weight"], zeroed[f"{mlp.path}.fc1.bias"] = (idx, slice(None)), (idx,)
        zeroed[f"{mlp.path}.fc2.weight"] = (slice(None), idx)
    for name in text:
        idx = torch.tensor(sorted(expected[(name, name)]))
        zeroed[f"{name}.gate_proj.weight"] = zeroed[f"{name}.up_proj.weight"] = (idx, slice(None))
        zeroed[f"{name}.down_proj.weight"] = (slice(None), idx)
    assert set(after) == set(before)
    for key, value in before.items():
        if key not in zeroed:
            assert torch.equal(after[key], value), key
            continue
        where = torch.zeros_like(value, dtype=torch.bool)
        where[zeroed[key]] = True
        assert (after[key][where] == 0).all() and torch.equal(after[key][~where], value[~where]), key
