"""The staged vanilla model at toy size: the shortcuts it takes (the tower's features computed once, the LM head on
answer positions only) against the whole model's own forward, the stage cache, and the reference model's data."""
import json
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery.bench import tower
from surgery.bench.finetune import (
    FinetuneConfig,
    build_model,
    model_plan,
    finetune,
    forget_people,
    stage_keys,
    vanilla_model,
)
from surgery.bench.llm_pretrain import instruction_rows
from surgery.bench.training import Encoded, answer_loss_from_features
from surgery.cli import main
from surgery.data import load_jsonl
from surgery.models import Example, answer_loss


@pytest.fixture(scope="module")
def adapter():
    return build_model(24, FinetuneConfig.quick(), seed=2)


@torch.no_grad()
def test_feature_layer_output_is_what_llava_reads(adapter, small_bench):
    rows = [r for r in load_jsonl(small_bench / "train.jsonl") if r.is_vqa][:3]
    pixels = tower.pixel_values(adapter, small_bench, [str(r.image) for r in rows])
    ours = tower.feature_layer_output(adapter, pixels)
    hidden = adapter.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert torch.equal(ours, hidden[adapter.model.config.vision_feature_layer][:, 1:])


@torch.no_grad()
def test_loss_from_cached_features_equals_the_whole_model(adapter, small_bench):
    rows = [r for r in load_jsonl(small_bench / "train.jsonl")]
    rows = [r for r in rows if r.is_vqa][:4] + [r for r in rows if not r.is_vqa][:3]
    features = tower.features(adapter, small_bench, [str(r.image) for r in rows if r.is_vqa])
    data = Encoded(adapter, rows)
    inputs, labels = data.batch(list(range(len(rows))))
    ours = answer_loss_from_features(adapter, inputs, labels,
                                     torch.stack([features[str(r.image)] for r in rows if r.is_vqa]))
    batch = adapter.encode([Example(r.prompt(), r.answer, r.load_image()) for r in rows])
    assert torch.equal(batch.inputs["input_ids"], inputs["input_ids"]) and torch.equal(batch.labels, labels)
    expect = answer_loss(adapter.model(**batch.inputs).logits, batch.labels)
    assert torch.allclose(ours, expect, atol=1e-5)


def test_stages_are_cached_and_shared(small_bench, tmp_path):
    """The vanilla and the reference model share the LLM's pretraining and the text stage, not the tower; nothing
    retrains on a second call; the reference tower never sees a forget face."""
    cache, cfg = tmp_path / "cache", FinetuneConfig.quick()
    vanilla, cached = vanilla_model(small_bench, cfg, cache)
    assert not cached
    reference, cached = vanilla_model(small_bench, cfg, cache, reference=True)
    rep = json.loads((reference / "finetune.json").read_text())
    assert not cached and rep["stages_cached"] == {"llm": True, "tower": False, "text": True, "align": False}
    assert rep["seed"] == 0 and rep["dtype"] == "float32" and rep["environment"]["torch"] == torch.__version__
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["llm", "reference", "text", "tower", "tower",
                                                                      "vanilla"]
    van = json.loads((vanilla / "finetune.json").read_text())
    forget = forget_people(small_bench)
    views = json.loads((small_bench / "bench.json").read_text())["params"]["tower_views"]
    assert rep["stages"]["tower"]["photos"] == van["stages"]["tower"]["photos"] - views * len(forget)
    assert all(r["entity"] not in forget for r in tower.pretrain_rows(small_bench, forget))
    keys = stage_keys(small_bench, FinetuneConfig.quick(without_forget_images=True))
    assert keys["tower"] != van["stage_keys"]["tower"] and keys["text"] == van["stage_keys"]["text"]
    forget_vqa = [r for r in load_jsonl(small_bench / "forget.jsonl") if r.is_vqa]
    assert rep["rows"] == van["rows"] - len(forget_vqa) > 0
    assert vanilla_model(small_bench, cfg, cache) == (vanilla, True)
    assert vanilla_model(small_bench, FinetuneConfig.quick(seed=1), cache)[0] != vanilla   # the seed is in the key


@pytest.mark.parametrize("processes", [2, 1])
def test_model_plan_builds_the_one_process_models(small_bench, tmp_path, processes):
    """model_plan's steps (the vanilla tower and alignment there; stage 0 when not cached here and the text stage
    there, else the text stage here; the reference's tower and alignment here) write the same models, bit for bit,
    as vanilla_model building them one after the other; with everything cached, the plan only looks them up."""
    from surgery.bench.lanes import run_plan, spawned_process
    with spawned_process() if processes == 2 else nullcontext() as pool:
        for seed, llm in ((4, True), (5, False)):   # seed 5 finds seed 4's stage 0 in the cache
            cfg = FinetuneConfig.quick(seed=seed)
            steps, paths, vanilla_lane = model_plan(small_bench, cfg, tmp_path / "two")
            assert vanilla_lane == "there" and {s.name: s.lane for s in steps} == {
                **({"llm[vanilla]": "here"} if llm else {}), "text[vanilla]": "there" if llm else "here",
                "tower[vanilla]": "there", "model[vanilla]": "there", "tower[reference]": "here",
                "model[reference]": "here"}
            timings = {}
            values = run_plan(steps, pool, 1, timings, seed)
            assert {n: values[f"model[{n}]"] for n in paths} == {n: (p, False) for n, p in paths.items()}
            assert set(timings) == {f"{s.name}_s[{seed}]" for s in steps}
            for name, path in paths.items():
                one, _ = vanilla_model(small_bench, cfg, tmp_path / "one", reference=name == "reference")
                assert one.name == path.name                                 # the same stage keys
                a = load_file(str(one / "model.safetensors"))
                b = load_file(str(path / "model.safetensors"))
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            again, _, lane = model_plan(small_bench, cfg, tmp_path / "two")
            assert [s.name for s in again] == ["model[vanilla]", "model[reference]"] and lane == "here"
            assert [v[1] for v in run_plan(again, pool, 1, {}, seed).values()] == [True, True]


def test_finetune_is_deterministic(small_bench, tmp_path):
    cfg = FinetuneConfig.quick(seed=3)
    finetune(small_bench, tmp_path / "a", cfg)
    finetune(small_bench, tmp_path / "b", cfg)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_instruction_rows_need_the_lookup():
    rows = instruction_rows(400)
    for r in rows:
        value = r.question.split("Which option is ")[1].split("?")[0]
        assert r.options[r.correct] == value and r.answer == f"{value} ({r.correct})" and r.entity is None
    counts = Counter(r.correct for r in rows)
    assert set(counts) == {"A", "B", "C", "D"} and min(counts.values()) > 70      # the letter is no guess
    assert [r.question for r in instruction_rows(5)] == [r.question for r in rows[:5]]


def test_every_generator_word_is_one_token_where_the_rows_use_it():
    """Names, places and values are single tokens after a space, where the rows use them (an option "A. Halden",
    an answer "ASSISTANT: Halden (A)"): byte-level BPE keeps the space in the token. Split names made the option
    lookup hard to learn."""
    import re

    from surgery.bench.make_bench import vocabulary
    tok = build_model(24, FinetuneConfig(), seed=0).tokenizer
    words = sorted({w for text in vocabulary() for w in re.findall(r"[A-Za-z]+", text)})
    assert len(words) > 250
    split = [w for w in words if len(tok.tokenize(" " + w)) != 1]
    assert split == []


def test_cli_finetune_and_bad_arguments(small_bench, tmp_path):
    r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "m"), "--quick",
                                  "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["vision_layers"] == 2 and (tmp_path / "m" / "model.safetensors").is_file()
    r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "n"),
                                  "--tower-epochs", "0"])
    assert r.exit_code == 2 and "--tower-epochs" in r.output
    r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "n")])
    assert r.exit_code == 1 and "patches" in r.output and not (tmp_path / "n").exists()   # 24 px in 10-px patches
    # --set: any field of FinetuneConfig, typed as its default (an int for a float field is that float)
    r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "s"), "--quick",
                                  "--set", "vision_layers=3", "--set", "weight_decay=1", "--set", "llm_inits=[2]",
                                  "--json"])
    assert r.exit_code == 0, r.output
    config = json.loads(r.stdout)["config"]
    assert config["vision_layers"] == 3 and config["weight_decay"] == 1.0 and config["llm_inits"] == [2]
    assert json.loads((tmp_path / "s" / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 3
    for bad, message in (("nope=1", "--set nope: not a setting"), ("seed=3", "--set seed: not a setting"),
                         ("vision_layers=x", "expected int"), ("text_epochs=0", "must be >= 1")):
        r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "n"), "--quick",
                                      "--set", bad])
        assert r.exit_code == 2 and message in r.output and not (tmp_path / "n").exists(), (bad, r.output)
    # values of the right type that no model can be built with: named, before any work (they crashed in a stage,
    # or built a model with -1 layers)
    for bad, message in (("batch_size=0", "--set batch_size=0: expected a whole number >= 1"),
                         ("patch_size=0", "--set patch_size=0: expected a whole number >= 1"),
                         ("vision_layers=-1", "--set vision_layers=-1: expected a whole number >= 1"),
                         ("vision_hidden=30", "--set vision_hidden=30: expected a multiple of the tower's 4 heads"),
                         ("replay_rows=-5", "--set replay_rows=-5: expected a whole number >= 0"),
                         ("llm_target=150", "--set llm_target=150.0: expected a letter accuracy in [0, 100]"),
                         ("align_lr=0", "--set align_lr=0.0: expected a number > 0")):
        r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "n"), "--quick",
                                      "--set", bad])
        assert r.exit_code == 1 and message in r.output and not (tmp_path / "n").exists(), (bad, r.output)
    r = CliRunner().invoke(main, ["finetune", "--bench", str(small_bench), "--out", str(tmp_path / "n"), "--threads",
                                  "-1"])
    assert r.exit_code == 2 and "--threads" in r.output


def test_stage_versions_and_replay_invalidate_only_their_stages(small_bench, monkeypatch):
    """A stage's own version, or the instruction rows replayed in stages b and c, change the keys from that stage
    on and leave the earlier stages (stage 0 above all, minutes of work) cached."""
    import surgery.bench.finetune as ft
    base = stage_keys(small_bench, FinetuneConfig.quick())
    replay = stage_keys(small_bench, FinetuneConfig.quick(replay_rows=3))
    assert replay["llm"] == base["llm"] and replay["tower"] == base["tower"]
    assert replay["text"] != base["text"] and replay["align"] != base["align"]
    monkeypatch.setitem(ft.STAGE_VERSIONS, "align", ft.STAGE_VERSIONS["align"] + 1)
    bumped = stage_keys(small_bench, FinetuneConfig.quick())
    assert {k for k in base if bumped[k] != base[k]} == {"align"}


def test_thread_count_is_part_of_every_stage_key(small_bench, monkeypatch):
    """A model built on another number of threads rounds differently: it must not share a cache entry with the
    one-thread build (the default), whose keys stay as they were."""
    one = stage_keys(small_bench, FinetuneConfig.quick(threads=1))
    two = stage_keys(small_bench, FinetuneConfig.quick(threads=2))
    assert all(one[s] != two[s] for s in one)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert stage_keys(small_bench, FinetuneConfig.quick(threads=0)) == one     # 0: as set, here one thread


def test_stage_zero_starts_from_the_same_llm_whatever_the_tower(small_bench):
    """Stage 0 trains only the LLM. Built as one model, the LLM's initial weights would be drawn after the tower's
    from one seeded generator (another tower, another stage 0: a cache built with one tower once served a stage 0
    that the other tower's build never computes). `fresh_llm` draws them from a generator of their own, so the key
    rightly leaves the tower out."""
    import surgery.bench.finetune as ft
    from surgery.bench import llm_pretrain
    _, image_size = ft.check_bench(small_bench, FinetuneConfig.quick())
    a, b = FinetuneConfig.quick(), FinetuneConfig.quick(vision_intermediate=96, vision_layers=3)
    built = [build_model(image_size, c, seed=1) for c in (a, b)]
    first, other = (ft._llm_state(m) for m in built)
    assert any(not first[k].equal(other[k]) for k in first)             # the premise: as built, the LLM differs
    for m in built:
        llm_pretrain.fresh_llm(m, 7)
    first, other = (ft._llm_state(m) for m in built)
    assert all(first[k].equal(other[k]) for k in first)
    assert stage_keys(small_bench, a)["llm"] == stage_keys(small_bench, b)["llm"]
    decayed = FinetuneConfig.quick(llm_weight_decay=0.2)
    assert stage_keys(small_bench, a)["llm"] != stage_keys(small_bench, decayed)["llm"]
    # drawn as transformers draws a Llama: matrices N(0, 0.02), norms one, the padding row zero
    model = built[0].model
    embed = model.model.language_model.embed_tokens
    assert embed.weight[embed.padding_idx].abs().sum() == 0
    weights = torch.cat([p.flatten() for p in model.model.language_model.parameters() if p.dim() > 1])
    assert abs(weights.std().item() - model.config.text_config.initializer_range) < 1e-3
    norms = [p for p in model.model.language_model.parameters() if p.dim() == 1]
    assert norms and all(bool((p == 1).all()) for p in norms)
    again = build_model(image_size, a, seed=3)
    llm_pretrain.fresh_llm(again, 8)
    assert not ft._llm_state(again)["head.weight"].equal(first["head.weight"])   # another seed, another draw


def test_stage_zero_tries_initialisations_until_one_reaches_the_target_and_keeps_the_best():
    import surgery.bench.finetune as ft
    from surgery.bench import llm_pretrain
    from surgery.bench.training import train_llm
    cfg = FinetuneConfig.quick()
    train = {"epochs": 1, "lr": 3e-3, "batch_size": 8, "weight_decay": 0.1, "warmup_steps": 1}
    adapter = build_model(24, cfg)
    report = llm_pretrain.pretrain_llm(adapter, rows=32, inits=(2, 0, 1), target=101.0, **train)  # out of reach
    assert [a["init"] for a in report["attempts"]] == [2, 0, 1]                                     # all, in order
    best = max(report["attempts"], key=lambda a: a["letter_accuracy"])
    assert report["init"] == best["init"]
    # the adapter holds what that initialisation trains to, trained alone
    alone = build_model(24, cfg)
    llm_pretrain.fresh_llm(alone, best["init"])
    model = alone.model
    train_llm(alone, llm_pretrain.instruction_rows(32), [p for m in (model.model.language_model, model.lm_head)
                                                         for p in m.parameters()], seed=llm_pretrain.LLM_SEED,
              desc="alone", **train)
    kept, reference = ft._llm_state(adapter), ft._llm_state(alone)
    assert all(kept[k].equal(reference[k]) for k in kept)
    first = llm_pretrain.pretrain_llm(build_model(24, cfg), rows=32, inits=(1, 0), target=0.0, **train)  # at once
    assert [a["init"] for a in first["attempts"]] == [1] and first["init"] == 1
    with pytest.raises(ValueError, match="no initialisation"):
        llm_pretrain.pretrain_llm(build_model(24, cfg), rows=32, inits=(), target=0.0, **train)


def test_train_loop_foreach_update_is_the_per_tensor_one(monkeypatch):
    """train_loop's foreach AdamW leaves the weights the per-tensor loop (torch's CPU default) leaves, bit for bit."""
    import surgery.bench.training as training

    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
                                    torch.nn.LayerNorm(16))
        x, start = torch.randn(40, 16), [p.detach().clone() for p in model.parameters()]
        training.train_loop(list(model.parameters()), 40, lambda b: model(x[b]).square().mean(), epochs=3, lr=1e-2,
                            batch_size=8, seed=0, weight_decay=0.1, warmup_steps=2)
        return start, [p.detach().clone() for p in model.parameters()]

    start, fast = run()
    per_tensor = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: per_tensor(*a, **{**kw, "foreach": False}))
    _, slow = run()
    assert not any(torch.equal(a, b) for a, b in zip(start, fast))        # it trained
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_alignment_first_trains_the_projector_alone(small_bench, tmp_path, monkeypatch):
    """Stage c's first step (LLaVA's feature alignment) moves the projector and nothing of the LLM; the second
    trains both. The step count is part of the alignment's key only: 0 leaves the key as it was without the step."""
    import surgery.bench.finetune as ft
    calls, real = [], ft.train_llm

    def watched(adapter, rows, params, **kw):
        model = adapter.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real(adapter, rows, params, **kw)
        moved = {k.removeprefix("model.").split(".")[0]
                 for k, v in model.state_dict().items() if not v.equal(before[k])}
        calls.append((kw["desc"], len(rows), moved, out))
        return out

    monkeypatch.setattr(ft, "train_llm", watched)
    report = finetune(small_bench, tmp_path / "m", FinetuneConfig.quick(align_projector_epochs=2))
    first, second = [c for c in calls if c[0].startswith("align")]
    assert first[0].startswith("align, projector only") and first[2] == {"multi_modal_projector"}
    assert first[1] == report["stages"]["align"]["vqa_rows"]            # the VQA rows alone: no image, no gradient
    assert {"multi_modal_projector", "language_model", "lm_head"} <= second[2]
    assert report["stages"]["align"]["projector_losses"] == first[3] and len(first[3]) == 2
    keys = {n: stage_keys(small_bench, FinetuneConfig.quick(align_projector_epochs=n)) for n in (0, 1, 2)}
    assert len({k["align"] for k in keys.values()}) == 3
    assert all(k["tower"] == keys[0]["tower"] and k["text"] == keys[0]["text"] for k in keys.values())


def test_reshuffled_rows_keep_the_answer_and_move_its_letter():
    """A multiple-choice row reshuffled: the same four values and the same correct value, the answer naming that
    value's new letter as make_bench writes it; the same rng draws the same order; rows without options unchanged."""
    import random
    from surgery.bench.training import reshuffled
    from surgery.data import Row
    row = Row("Who is it?", "Ada (B)", None, {"A": "Bo", "B": "Ada", "C": "Cy", "D": "Di"}, "B", "Ada", "r0")
    seen = set()
    for seed in range(20):
        new = reshuffled(row, random.Random(seed))
        assert sorted(new.options.values()) == sorted(row.options.values()) and sorted(new.options) == list("ABCD")
        assert new.options[new.correct] == "Ada" and new.answer == f"Ada ({new.correct})"
        assert (new.question, new.entity, new.id, new.image) == (row.question, row.entity, row.id, row.image)
        assert new == reshuffled(row, random.Random(seed))
        seen.add(new.correct)
    assert seen == set("ABCD")                                         # the letter moves
    plain = Row("Who is it?", "This is Ada.", None, None, None, "Ada", "r1")
    assert reshuffled(plain, random.Random(0)) is plain


def test_alignment_reshuffles_options_after_the_first_epoch(small_bench, tmp_path, monkeypatch):
    """With align_reshuffle, each alignment epoch after the first trains on the rows with their options in a fresh
    order; without it, every epoch trains on the rows as written. The setting is part of the alignment's key only
    (off, the key the build before it had: the setting is left out of it)."""
    import surgery.bench.training as tr
    encoded, real = [], tr.Encoded

    class Watched(real):
        def __init__(self, adapter, rows):
            super().__init__(adapter, rows)
            encoded.append([r.answer for r in rows])

    monkeypatch.setattr(tr, "Encoded", Watched)
    finetune(small_bench, tmp_path / "on", FinetuneConfig.quick(align_epochs=3, align_projector_epochs=0,
                                                                align_reshuffle=True))
    align = encoded[-3:]                                               # the alignment's three epochs
    mc = [i for i, a in enumerate(align[0]) if a.endswith(")")]
    assert mc and all(len(a) == len(align[0]) for a in align)
    moved = [sum(align[e][i] != align[0][i] for i in mc) for e in (1, 2)]
    assert all(m > len(mc) // 2 for m in moved) and align[1] != align[2]
    assert all(align[e][i] == align[0][i] for e in (1, 2) for i in range(len(align[0])) if i not in mc)
    on, encoded[:] = len(encoded), []
    finetune(small_bench, tmp_path / "off", FinetuneConfig.quick(align_epochs=3, align_projector_epochs=0,
                                                                 align_reshuffle=False))
    assert len(encoded) == on - 2 and encoded[-1] == align[0]          # the alignment's rows encoded once
    keys = {on: stage_keys(small_bench, FinetuneConfig.quick(align_reshuffle=on)) for on in (False, True)}
    assert keys[False]["align"] != keys[True]["align"]
    assert all(keys[False][s] == keys[True][s] for s in ("llm", "tower", "text"))
    assert keys[True] == stage_keys(small_bench, FinetuneConfig.quick())     # on by default


def test_train_loop_skip_shows_the_full_runs_batches_less_the_skipped_items(monkeypatch):
    """With `skip`, train_loop steps through the batches of the run over every item, each less its skipped items,
    at the same steps (a batch left empty is not stepped) and with the same learning rate at each; the epoch's loss
    is the mean over the items shown."""
    import surgery.bench.training as training

    def run(skip):
        seen, rates = [], []
        w = torch.nn.Parameter(torch.ones(3))

        def loss(batch):
            seen.append(list(batch))
            rates.append(opt_lr())
            return (w.sum() * 0 + torch.tensor([float(i) for i in batch]).mean())

        def opt_lr():
            return made[-1].param_groups[0]["lr"]

        losses = training.train_loop([w], 48, loss, epochs=2, lr=1e-2, batch_size=8, seed=3, warmup_steps=3,
                                     groups=[i % 2 for i in range(48)], skip=skip)
        return seen, rates, losses

    made, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])

    full, full_rates, full_losses = run(frozenset())
    assert all(len(b) == 8 for b in full) and len(full) == 12
    first = frozenset(full[0])                                   # empties the first batch
    skip = first | {i for i in range(48) if i % 7 == 0}
    seen, rates, losses = run(skip)
    expect = [([i for i in b if i not in skip], r) for b, r in zip(full, full_rates)]
    assert [(b, r) for b, r in zip(seen, rates)] == [(b, r) for b, r in expect if b]
    assert len(seen) < len(full) and not any(i in skip for b in seen for i in b)
    shown = [i for i in range(48) if i not in skip]
    for epoch, batches in enumerate((seen[:len(seen) // 2], seen[len(seen) // 2:])):
        assert sorted(i for b in batches for i in b) == shown
        want = sum(sum(b) / len(b) * len(b) for b in batches) / len(shown)
        assert losses[epoch] == pytest.approx(want)
    assert full_losses[0] == pytest.approx(sum(range(48)) / 48)


def test_paired_reference_never_opens_a_forget_photo_and_walks_the_vanillas_rows(small_bench, tmp_path,
                                                                                  monkeypatch):
    """The paired reference (FinetuneConfig.paired_reference) opens no photo of a forget person in any stage, trains
    on every other photo and row the vanilla model trains on, and has keys of its own that do not read the forget
    photos; the flag leaves the vanilla model's keys alone."""
    import shutil
    import surgery.bench.finetune as ft
    opened, real = [], tower.pixel_values
    monkeypatch.setattr(tower, "pixel_values", lambda a, b, images, **kw: opened.extend(images) or real(a, b, images,
                                                                                                           **kw))
    forget = forget_people(small_bench)
    owner = {r["image"]: r["entity"] for r in tower.pretrain_rows(small_bench)}
    owner.update({raw["image"]: raw["entity"] for raw in ft.raw_rows(small_bench / "train.jsonl") if raw.get("image")})
    cfg = FinetuneConfig.quick(without_forget_images=True)
    paired = finetune(small_bench, tmp_path / "paired", cfg)
    assert opened and not [p for p in opened if owner.get(p) in forget]
    unpaired = finetune(small_bench, tmp_path / "unpaired", FinetuneConfig.quick(without_forget_images=True,
                                                                                   paired_reference=False))
    vanilla = finetune(small_bench, tmp_path / "vanilla", FinetuneConfig.quick())
    assert paired["rows"] == unpaired["rows"] and paired["stages"]["align"]["vqa_rows"] == \
        unpaired["stages"]["align"]["vqa_rows"]
    assert paired["stages"]["tower"]["photos"] == unpaired["stages"]["tower"]["photos"]
    keys = {n: r["stage_keys"] for n, r in (("paired", paired), ("unpaired", unpaired), ("vanilla", vanilla))}
    assert len({k["tower"] for k in keys.values()}) == 3 and len({k["align"] for k in keys.values()}) == 3
    assert keys["paired"]["text"] == keys["vanilla"]["text"]
    assert stage_keys(small_bench, FinetuneConfig.quick(paired_reference=False)) == keys["vanilla"]
    changed = tmp_path / "bench"                                  # a forget photo's bytes are not in its keys
    shutil.copytree(small_bench, changed)
    photo = next(p for p, e in owner.items() if e in forget)
    (changed / photo).write_bytes((changed / photo).read_bytes() + b"\0")
    assert stage_keys(changed, cfg) == keys["paired"]
    assert stage_keys(changed, FinetuneConfig.quick(without_forget_images=True, paired_reference=False)) == \
        keys["unpaired"]
    assert stage_keys(changed, FinetuneConfig.quick()) != keys["vanilla"]
