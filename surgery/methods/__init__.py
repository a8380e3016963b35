"""Unlearning methods on one loop."""
