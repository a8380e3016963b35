"""The saliency file matches an independent computation on the same model and data."""
import pytest
import torch

from surgery.data import SPLITS, load_splits
from surgery.models import load
from surgery.saliency import Saliency, collect, examples, halfway, merge


def hidden_z(adapter, mlp, x):
    """z recomputed from the MLP input, not read at the output projection."""
    m = adapter.model.get_submodule(mlp.path)
    if len(mlp.fc_in) == 2:                       # gated: act(gate(x)) * up(x)
        return m.act_fn(mlp.fc_in[0](x)) * mlp.fc_in[1](x)
    act = getattr(m, "activation_fn", None) or m.act
    return act(mlp.fc_in[0](x))


def independent(adapter, splits, params, batch_size):
    stats, fisher, tokens = {}, {}, {}
    names = list(params)
    for split in SPLITS:
        rows = splits[split]
        acc = {m.layer: torch.zeros(4, m.hidden, dtype=torch.float64) for m in adapter.mlps}
        count = {m.layer: 0 for m in adapter.mlps}
        handles = []
        for mlp in adapter.mlps:
            def hook(module, args, layer=mlp.layer, mlp=mlp):
                z = hidden_z(adapter, mlp, args[0]).detach().double().reshape(-1, mlp.hidden)
                acc[layer] += torch.stack([z.sum(0), z.abs().sum(0), (z * z).sum(0), (z > 0).sum(0).double()])
                count[layer] += z.shape[0]
            handles.append(adapter.model.get_submodule(mlp.path).register_forward_pre_hook(hook))
        f = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        for chunk in chunks:
            batch = adapter.encode(examples(chunk))
            logits = adapter.model(**batch.inputs).logits.double()
            logp = torch.log_softmax(logits[:, :-1], -1)
            labels = batch.labels[:, 1:]
            keep = labels != -100
            tok = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
            loss = (tok.sum(1) / keep.sum(1)).mean()
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        f[n] += g.double() ** 2 / len(chunks)
        for h in handles:
            h.remove()
        stats[split], fisher[split], tokens[split] = acc, f, count
    return stats, fisher, tokens


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_collect_matches_independent_computation(name, tiny_dirs, data, tmp_path):
    adapter = load(str(tiny_dirs[name]))
    splits = load_splits(*data)
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    sal = collect(adapter, splits, params, batch_size=3, progress=False)
    sal.save(tmp_path / "saliency.safetensors")
    sal = Saliency.load(tmp_path / "saliency.safetensors")
    stats, fisher, tokens = independent(adapter, splits, params, batch_size=3)
    for split in SPLITS:
        for layer, ref in stats[split].items():
            torch.testing.assert_close(sal.stats[split][layer].double(), ref, rtol=1e-5, atol=1e-4)
            assert sal.tokens[split][layer] == tokens[split][layer]
        for n, ref in fisher[split].items():
            torch.testing.assert_close(sal.fisher[split][n].double(), ref, rtol=1e-4, atol=1e-12)
    # text-only splits never reach the vision encoder
    assert all(sal.stats["fqa"][l].abs().sum() == 0 and sal.tokens["fqa"][l] == 0 for l in sal.stats["fqa"])
    assert all(sal.fisher["rqa"][n].abs().sum() == 0 for n in params)
    assert all(sal.fisher["fvqa"][n].abs().sum() > 0 for n in params)
    assert sal.batches == {"fvqa": 2, "fqa": 1, "rvqa": 3, "rqa": 2}


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_a_pass_in_two_halves_merges_to_the_bits_of_one_pass(name, tiny_dirs, data):
    """collect(stop=cut) + collect(start=cut, record=True), merged: bit-identical to one pass, wherever the cut falls
    (batches of 3: fvqa 2, fqa 1, rvqa 3, rqa 2)."""
    adapter = load(str(tiny_dirs[name]))
    splits = load_splits(*data)
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    whole = collect(adapter, splits, params, batch_size=3, progress=False)
    assert halfway(splits, 3) == (2, 0)        # 5 image batches: the first 2 (fvqa) before it, 3 (rvqa) from it
    for cut in [(0, 1), (2, 2), (3, 1)]:         # in fvqa, in rvqa, in rqa (text only)
        head = collect(adapter, splits, params, batch_size=3, progress=False, stop=cut)
        tail = collect(adapter, splits, params, batch_size=3, progress=False, start=cut, record=True)
        for split in ("fvqa", "rvqa"):       # every image batch from the cut on, recorded
            assert len(tail.records[split]) == sum((SPLITS.index(split), i) >= cut for i in range(whole.batches[split]))
        sal = merge(head, tail)
        assert sal.tokens == whole.tokens and sal.batches == whole.batches
        for split in SPLITS:
            assert all(sal.stats[split][l].equal(t) for l, t in whole.stats[split].items()), (cut, split)
            assert all(sal.fisher[split][n].equal(t) for n, t in whole.fisher[split].items()), (cut, split)
    assert any(t.abs().sum() > 0 for t in whole.fisher["rvqa"].values())
    tail.source = {"forget": "another file"}
    with pytest.raises(ValueError, match="different data"):
        merge(head, tail)
