"""Pruning: zero the chosen neurons in place and describe which weight entries they own."""
import torch

from . import ops
from .models import Adapter


def prune(adapter: Adapter, neurons: dict[int, torch.Tensor]) -> None:
    """Zero neuron n of layer l: row n of every input projection and its bias, column n of the output."""
    for mlp in adapter.mlps:
        idx = neurons.get(mlp.layer)
        if idx is None or idx.numel() == 0:
            continue
        idx = idx.to(mlp.fc_out.weight.device)
        biases = [lin.bias for lin in mlp.fc_in]
        ops.prune_neurons_([lin.weight for lin in mlp.fc_in], biases if any(b is not None for b in biases) else None,
                           mlp.fc_out.weight, idx)


def pruned_entries(adapter: Adapter, neurons: dict[int, torch.Tensor], params: dict[str, torch.nn.Parameter]
                   ) -> dict[str, torch.Tensor]:
    """Per trainable parameter, a bool tensor: True where the entry belongs to a pruned neuron."""
    owned = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    for mlp in adapter.mlps:
        idx = neurons.get(mlp.layer)
        if idx is None or idx.numel() == 0:
            continue
        for name, p in adapter.mlp_params(mlp).items():
            if name not in owned:
                continue
            is_out = name.rsplit(".", 2)[-2] == adapter.family.mlp_out
            if is_out and name.endswith(".weight"):
                owned[name][:, idx.to(p.device)] = True
            elif not is_out:
                owned[name][idx.to(p.device)] = True
    return owned
