"""`surgery` command line: a thin shell over the library, one module per command group (each imports only
`common` and the library). Logs and progress on stderr; stdout only --json."""
from . import bench, compare, demo, method  # noqa: F401  (each module adds its commands to `main`)
from .common import main

__all__ = ["main"]
