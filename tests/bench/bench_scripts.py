"""benchmarks/<name>.py imported as a module, for the tests of those scripts (the folder is not a package)."""
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parents[2] / "benchmarks"
if str(SCRIPTS) not in sys.path:        # the scripts import their shared pieces by name, as when run from there
    sys.path.append(str(SCRIPTS))


def benchmark_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
