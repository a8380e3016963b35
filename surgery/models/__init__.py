"""Model loading and adapters."""
from .adapters import FAMILIES, SCOPES, Adapter, Batch, Example, VisionMLP, answer_loss, family_of
from .loading import ALIASES, load, resolve, save

__all__ = ["ALIASES", "FAMILIES", "SCOPES", "Adapter", "Batch", "Example", "VisionMLP", "answer_loss",
           "family_of", "load", "resolve", "save"]
