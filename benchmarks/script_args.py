"""Arguments the benchmark scripts share (imported by its name: the scripts run from this folder)."""
import argparse
from pathlib import Path


def named_models(ap: argparse.ArgumentParser, specs: list[str]) -> dict[str, str]:
    """{NAME: DIR} from repeated --model NAME=DIR; a malformed spec, a name given twice or a directory without a
    config.json ends the script through `ap.error`."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--model {spec!r}: expected NAME=DIR")
        if name in models:
            ap.error(f"--model {spec!r}: the name {name!r} is given twice")
        if not (Path(path) / "config.json").is_file():
            ap.error(f"--model {spec}: {path} is not a model directory (no config.json)")
        models[name] = path
    return models
