"""surgery: Visual Knowledge Distillation unlearning for multimodal LLMs."""
__version__ = "0.1.0"
