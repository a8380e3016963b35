"""In one process: --checkpoint-llm and --checkpoint-vision give the plain path's gradients (and collection its
statistics and Fisher) with fewer saved activations, frozen weights get no
gradient buffer, the VKD teacher (one entry per photo) read from memory-mapped files equals the one held in memory and
each row's own projector output, and how collection deals batches to ranks."""
from types import SimpleNamespace

import pytest
import torch

from rowdata import write_photo_split
from surgery.bench.evaluate import ImageCache, _continuation_logprobs, _prefill, option_answer
from surgery.config import Config
from surgery.data import load_jsonl, load_splits
from surgery.distributed import World, checkpoint_llm, checkpoint_vision, decoder_layers, launch, vision_layers
from surgery.methods import teacher
from surgery.methods.vkd import projector_features
from surgery.models import answer_loss, load
from surgery.saliency import collect, examples


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on 2 shared cores: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backward(adapter, params, batch) -> tuple[dict, int]:
    """Gradients of the summed answer loss w.r.t. `params`, and the bytes autograd kept for backward outside any
    checkpointed region."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = answer_loss(adapter.model(**batch.inputs).logits, batch.labels).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads, sum(kept)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_decoder_layers_are_the_language_models(tiny_dirs, name):
    adapter = load(str(tiny_dirs[name]))
    layers = decoder_layers(adapter)
    assert len(layers) == adapter.model.config.text_config.num_hidden_layers == 2
    owned = {id(p) for layer in layers for p in layer.parameters()}
    assert not any(id(p) in owned for n, p in adapter.model.named_parameters() if adapter.is_vision(n))


def test_checkpoint_llm_gives_the_same_gradients(tiny_dirs, data):
    adapter = load(str(tiny_dirs["tiny-llava"]))
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    batch = adapter.encode(examples(load_splits(*data).fvqa[:3]))
    runs = []
    decoder_layers(adapter)[0].mlp.register_forward_pre_hook(lambda *a: runs.append(1))
    plain, plain_bytes = backward(adapter, params, batch)
    assert len(runs) == 1
    assert checkpoint_llm(adapter) == 2
    runs.clear()
    checkpointed, checkpointed_bytes = backward(adapter, params, batch)
    assert len(runs) == 2                                  # the layer ran again in backward
    for n in plain:
        assert torch.equal(checkpointed[n], plain[n]), n
    assert checkpointed_bytes < 0.8 * plain_bytes
    frozen = [p for n, p in adapter.model.named_parameters() if n not in params]
    assert frozen and all(p.grad is None for p in frozen)  # no gradient buffers for frozen weights


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_vision_layers_are_the_towers_blocks(tiny_dirs, name):
    adapter = load(str(tiny_dirs[name]))
    layers = vision_layers(adapter)
    vision = adapter.model.config.vision_config
    assert len(layers) == getattr(vision, "num_hidden_layers", getattr(vision, "depth", None)) == len(adapter.mlps)
    names = {id(m): n for n, m in adapter.model.named_modules()}
    assert all(adapter.is_vision(names[id(layer)] + ".") for layer in layers)
    assert not {id(m) for m in layers} & {id(m) for m in decoder_layers(adapter)}


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_checkpoint_vision_gives_the_same_gradients_and_saliency(tiny_dirs, data, name):
    """The gradients, and collection's activation statistics, token counts and Fisher, bit for bit: the blocks run
    twice (the second time in backward), and the statistics hooks count the first run only."""
    adapter = load(str(tiny_dirs[name]))
    params = adapter.scope_params("mlp")
    adapter.train_only(params)
    splits = load_splits(*data)
    batch = adapter.encode(examples(splits.fvqa[:3]))
    runs = []
    adapter.mlps[0].fc_out.register_forward_pre_hook(lambda *a: runs.append(1))
    plain, plain_bytes = backward(adapter, params, batch)
    plain_saliency = collect(adapter, splits, params, batch_size=4, progress=False)
    assert len(runs) > 1
    runs.clear()
    assert checkpoint_vision(adapter) == len(adapter.mlps)
    checkpointed, checkpointed_bytes = backward(adapter, params, batch)
    assert len(runs) == 2                                  # the block ran again in backward
    for n in plain:
        assert torch.equal(checkpointed[n], plain[n]), n
    assert checkpointed_bytes < 0.9 * plain_bytes
    saliency = collect(adapter, splits, params, batch_size=4, progress=False)
    for split, stats in plain_saliency.stats.items():
        assert saliency.tokens[split] == plain_saliency.tokens[split], split
        for layer, s in stats.items():
            assert torch.equal(saliency.stats[split][layer], s), (split, layer)
        for n, f in plain_saliency.fisher[split].items():
            assert torch.equal(saliency.fisher[split][n], f), (split, n)


def test_checkpointed_llm_scores_with_its_kv_cache(tiny_dirs, tmp_path):
    """Without gradients (the held-back photos of --stop-forget-accuracy) a checkpointed layer runs as it is: the
    options are scored after the prompt's KV cache, as without checkpointing (the wrapper used to drop the cache)."""
    rows = [r for r in load_jsonl(write_photo_split(tmp_path / "photos.jsonl")) if r.options]
    adapter = load(str(tiny_dirs["tiny-llava"]))
    adapter.model.eval()

    def option_scores():
        images = ImageCache()
        cache, mask, first = _prefill(adapter, images.prompts(adapter, rows))
        assert cache.get_seq_length() > 0
        answers = [[adapter.answer_ids(option_answer(r, letter)) for letter in sorted(r.options)] for r in rows]
        return _continuation_logprobs(adapter, cache, mask, first, answers)
    with torch.no_grad():
        plain = option_scores()
        checkpoint_llm(adapter)
        torch.testing.assert_close(option_scores(), plain)


@pytest.mark.parametrize("file_bytes", [teacher.FILE_BYTES, 1])
def test_teacher_features_from_disk_equal_those_in_memory(tiny_dirs, tmp_path, monkeypatch, file_bytes):
    """Both hold one entry per photo (two rows ask about each photo here), bit for bit the same, and give every row
    its photo's features: those `projector_features` computes for that row alone. Alone, not in a batch of three: on
    some CPUs (an Intel Xeon, numerics pinned to AVX2: 2e-8 apart) a matrix product rounds differently with the
    batch's size, so that comparison is to float tolerance, far below the distance between two photos' features."""
    monkeypatch.setattr(teacher, "FILE_BYTES", file_bytes)    # 1: a file per batch
    adapter = load(str(tiny_dirs["tiny-llava"]))
    rows = load_jsonl(write_photo_split(tmp_path / "photos.jsonl", people=2, photos=3))[::-1]
    computed = []

    def features(chunk):
        computed.extend(r.image for r in chunk)
        return projector_features(adapter, chunk, 3)

    def context(gb):
        cfg = Config(out=str(tmp_path / "out"), teacher_memory_gb=gb, teacher_cache=str(tmp_path / "cache"))
        return SimpleNamespace(cfg=cfg, world=World(), scratch=[])
    in_memory = teacher.cache(context(8.0), rows, features, 3)
    assert sorted(computed[1:]) == sorted({r.image for r in rows}) and computed[0] == rows[0].image   # size probe first
    ctx = context(0.0)
    on_disk = teacher.cache(ctx, rows, features, 3)
    assert in_memory.photos is not None and on_disk.photos is None
    assert ctx.scratch[0].parent == tmp_path / "cache" and ctx.scratch[1:] == [tmp_path / "cache"]   # made: removed
    assert len(list(ctx.scratch[0].glob("*.safetensors"))) == (2 if file_bytes == 1 else 1)
    assert len(on_disk) == len(in_memory) == len(rows) == 12
    assert on_disk.entries() == in_memory.entries() == 6
    # once per photo: the features depend on the image alone
    alone = {r.image: projector_features(adapter, [r])[0] for r in {r.image: r for r in rows}.values()}
    for i, row in enumerate(rows):
        own = alone[row.image]
        assert torch.equal(on_disk[i], in_memory[i]), i
        torch.testing.assert_close(in_memory[i], own, rtol=1e-5, atol=1e-6)
        other = min((own - f).abs().max() for image, f in alone.items() if image != row.image)
        assert (in_memory[i] - own).abs().max() < 1e-3 * other, i      # its own photo, not a neighbour's


def test_collection_deals_batches_round_robin_in_lockstep():
    assert [World(r, 3).rounds(7) for r in range(3)] == [[0, 3, 6], [1, 4, None], [2, 5, None]]
    assert World().rounds(3) == [0, 1, 2] and World(1, 2).rounds(1) == [None] and World(0, 2).rounds(0) == []


def test_launch_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launch("cpu") as (world, device):
        assert world == World() and device == "cpu"
