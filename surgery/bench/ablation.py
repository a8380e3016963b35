"""Ablations of the vision encoder, for checking where a model keeps what it recognises in an image.

  mlp         every live vision MLP outputs zero (its layer keeps attention and the residual stream)
  embeddings  every vision encoder layer passes its input through unchanged, so what reaches the projector is the
              patch + position embeddings alone (after the tower's input norm, LLaVA's `pre_layrnorm`)

A model whose vision encoder recognises the person loses VQA accuracy under both; a model that identifies people
from colours the patch embeddings carry straight through keeps it under `embeddings`.
"""
from contextlib import contextmanager

import torch

from ..models import Adapter

ABLATIONS = ("mlp", "embeddings")


def _zero_output(module, args, output):
    return torch.zeros_like(output)


def _pass_input_through(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def ablated(adapter: Adapter, kind: str | None):
    """Within the block, `adapter.model` runs with the vision encoder ablated as `kind` says (None: unchanged).
    The weights are not touched; forward hooks do it, ahead of any other hook (transformers records hidden states
    with hooks of its own, and they must see the ablated output)."""
    if kind is None:
        yield adapter
        return
    if kind == "mlp":
        handles = [m.fc_out.register_forward_hook(_zero_output, prepend=True) for m in adapter.select_layers(None)]
    elif kind == "embeddings":
        handles = [layer.register_forward_hook(_pass_input_through, with_kwargs=True, prepend=True)
                   for layer in adapter.model.get_submodule(adapter.family.layers)]
    else:
        raise ValueError(f"--ablate {kind!r}: choose one of {', '.join(ABLATIONS)}")
    try:
        yield adapter
    finally:
        for h in handles:
            h.remove()
