"""`surgery` command line: a thin shell over the library, one module per command group (each imports only
`common` and the library). Logs and progress on stderr; stdout only --json.

Every command computes with portable CPU numerics (`surgery.numerics`), set before anything imports torch.
"""
from ..numerics import pin_cpu_numerics

pin_cpu_numerics()

from . import bench, compare, demo, method  # noqa: E402, F401  (each module adds its commands to `main`)
from .common import main  # noqa: E402

__all__ = ["main"]
