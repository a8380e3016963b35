"""Unlearning methods, one file each, on one loop (`loop.py`). `get(name)` gives a method; `METHODS` names them."""
import importlib

from .loop import Context, Method, NonFiniteError, Term, train

METHODS = ("ga", "ga_diff", "kl_min", "npo", "mmu", "manu", "vgid", "vkd")

__all__ = ["METHODS", "Context", "Method", "NonFiniteError", "Term", "get", "train"]


def get(name: str) -> Method:
    """A fresh instance of the method (a run keeps state on it: its teacher, its retain splits)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return type(importlib.import_module(f".{name}", __name__).METHOD)()
