"""benchmarks/<name>.py imported as a module, for the tests of those scripts (the folder is not a package)."""
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).parents[2] / "benchmarks"


def benchmark_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
