"""Stage 0 of the vanilla model: the LLM's own pretraining, before it meets the benchmark.

A real MLLM starts from an LLM that already knows how to answer a multiple-choice question: find the option it
means and name its letter. A tiny LLM trained from scratch on the benchmark's few hundred facts never learns that
(its letter-generation accuracy stays at chance: the letter of the right option changes from question to question,
and memorising the facts does not teach the lookup). Here it learns the format from generic instruction data about
no one: "Which option is X?" over the generator's names and values, answered "X (<letter>)": the only way to the
letter is to find X among the options. The skill forms abruptly after several hundred steps (an induction-style
copy), which is why this stage exists rather than a few such rows among the benchmark's. How it forms depends on
the data: on 2000 rows the LLM settled on guessing by position (72-79 %, right for A and D, half the time for B and
C), and on rows never repeated it reached only 32 % after 1250 steps. On 4000 rows it also depends on the
initialisation: 99 % on fresh rows from some, 50-75 % from others (a by-position guess, or the rows' letters
memorised; more rows, more heads or a third layer did not change that). So `pretrain_llm` tries initialisations in
turn until one learns the lookup.

Nothing here depends on a benchmark or its seed (the tokenizer is built from `make_bench.vocabulary()`), so the
stage is cached once and shared by every benchmark seed, the vanilla and the reference model.
"""
import logging
import time

import numpy as np
import torch

from ..data import Row
from ..models import Adapter
from .make_bench import ATTRIBUTES, FIRST, LAST, MC_INSTRUCTION, VALUES, _options
from .training import train_llm

log = logging.getLogger("surgery")
LLM_SEED = 0  # the pretrained LLM is one model, whatever the benchmark seed


def instruction_rows(n: int, seed: int = LLM_SEED) -> list[Row]:
    """`n` rows "Which option is X? <instruction>" with four options of one kind (names or one attribute's values),
    answered "X (<letter>)"."""
    names = [f"{first} {last}" for population in FIRST for first, last in zip(FIRST[population], LAST[population])]
    pools = {"name": names, **{a: VALUES[a] for a in ATTRIBUTES}}
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        kind = sorted(pools)[k % len(pools)]
        value = pools[kind][int(rng.integers(len(pools[kind])))]
        options, letter = _options(rng, value, pools[kind])
        rows.append(Row(f"Which option is {value}? {MC_INSTRUCTION}", f"{value} ({letter})", None, options, letter,
                        None, f"instruction-{k}"))
    return rows


@torch.no_grad()
def fresh_llm(adapter: Adapter, seed: int) -> None:
    """Draw the LLM's weights (embeddings, layers, head) afresh from a generator of their own, as transformers
    initialises a Llama (matrices normal with std `initializer_range`, norms one, the padding row zero), so that they
    do not depend on what was drawn before them from the global generator (the tower's weights, whose sizes would
    otherwise decide where the LLM starts)."""
    model = adapter.model
    generator = torch.Generator().manual_seed(seed)
    std = model.config.text_config.initializer_range
    for module in (model.model.language_model, model.lm_head):
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std, generator=generator)
            else:   # RMSNorm weights: Llama's layers have no biases
                p.fill_(1.0)
    embed = model.model.language_model.embed_tokens
    if embed.padding_idx is not None:
        embed.weight[embed.padding_idx].zero_()


def pretrain_llm(adapter: Adapter, *, rows: int, epochs: int, lr: float, batch_size: int, weight_decay: float,
                 warmup_steps: int, inits, target: float) -> dict:
    """Train the LLM (embeddings, layers, head) on `rows` instruction rows for `epochs` epochs, from each
    initialisation of `inits` in turn (`fresh_llm`'s seeds) until its letter-generation accuracy on 200 fresh
    instruction rows reaches `target` %; the adapter keeps the best. An initialisation trains to the same weights
    whichever came before it. Returns a report with every attempt and the kept LLM's accuracy on 400 other fresh
    rows."""
    from .evaluate import score_mc
    t0 = time.perf_counter()
    model = adapter.model
    modules = (model.model.language_model, model.lm_head)
    params = [p for m in modules for p in m.parameters()]
    check, held_out = instruction_rows(200, seed=LLM_SEED + 1), instruction_rows(400, seed=LLM_SEED + 5)
    train_rows = instruction_rows(rows)
    attempts, best = [], None
    if not inits:
        raise ValueError("pretrain_llm: no initialisation to try (inits is empty)")
    for init in inits:
        fresh_llm(adapter, init)
        losses = train_llm(adapter, train_rows, params, epochs=epochs, lr=lr, batch_size=batch_size,
                           weight_decay=weight_decay, warmup_steps=warmup_steps, seed=LLM_SEED,
                           desc=f"llm (instructions, init {init})")
        accuracy = 100.0 * float(np.mean(score_mc(adapter, check, letter=True)[1]))
        log.info("llm pretraining from init %d: letter accuracy on fresh instruction rows %.1f %%", init, accuracy)
        attempts.append({"init": init, "letter_accuracy": accuracy, "losses": losses})
        if best is None or accuracy > best[0]:
            best = (accuracy, init, [{k: v.clone() for k, v in m.state_dict().items()} for m in modules])
        if accuracy >= target:
            break
    accuracy, init, states = best
    for m, state in zip(modules, states):
        m.load_state_dict(state)
    if accuracy < target:
        log.warning("llm pretraining: no initialisation of %s reached %.0f %% letter accuracy; kept init %d (%.1f %%)",
                    list(inits), target, init, accuracy)
    held = 100.0 * float(np.mean(score_mc(adapter, held_out, letter=True)[1]))
    log.info("llm pretraining: kept init %d, letter accuracy on 400 other fresh rows %.1f %%", init, held)
    return {"rows": rows, "init": init, "attempts": attempts, "letter_accuracy": held,
            "seconds": time.perf_counter() - t0}
