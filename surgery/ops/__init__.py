"""In-place model edits and the masked optimizer step (thin wrappers over `torch.ops.surgery.*`)."""
from .reference import masked_adamw_, prune_neurons_

__all__ = ["prune_neurons_", "masked_adamw_"]
