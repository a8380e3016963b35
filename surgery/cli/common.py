"""What every command group shares: the `surgery` group, common options, error handling, --json output."""
import functools
import json
import logging
import os
import signal
import sys
import threading

import click

from ..config import SEED_LIMIT, Config, check_seeds
from ..data import DataError

log = logging.getLogger("surgery")


def _layers(ctx, param, value):
    if value is None:
        return None
    try:
        lo, _, hi = value.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a layer or an inclusive range like 16-23") from None
    if lo < 0 or hi < lo:
        raise click.BadParameter(f"{value!r}: expected 0 <= first <= last")
    return (lo, hi)


def model_options(f):
    for opt in reversed([
        click.option("--model", default="tiny-llava", show_default=True,
                     help="Local HF directory, alias (llava, qwen2-vl, qwen2.5-vl) in the local HF cache, "
                          "or tiny-llava / tiny-qwen2-vl / tiny-qwen2.5-vl."),
        click.option("--device", default="cpu", show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="auto: fp32 on CPU, bf16 on GPU."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default)."),
        click.option("--scope", type=click.Choice(["mlp", "vision", "full"]),
                     help="What trains: the live vision MLPs, encoder + projector, or every weight "
                          "(default: the method's own; mlp for vkd)."),
        click.option("--layers", callback=_layers, help="Vision layers, e.g. 16-23 (default: every live layer)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
        click.option("-v", "--verbose", is_flag=True),
    ]):
        f = opt(f)
    return f


def data_options(f):
    for opt in reversed([
        click.option("--forget", required=True, type=click.Path(), help="Forget JSONL (rows with image: fvqa; without: fqa)."),
        click.option("--retain", required=True, type=click.Path(), help="Retain JSONL (rvqa / rqa)."),
        click.option("--collect-batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--out", required=True, type=click.Path()),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
        click.option("--dry-run", is_flag=True, help="Validate data and model, print the plan, write nothing."),
    ]):
        f = opt(f)
    return f


def parallel_options(f):
    for opt in reversed([
        click.option("--shard-llm", is_flag=True,
                     help="Under torchrun: shard the frozen language model over the ranks with FSDP2 (the vision "
                          "tower and projector stay replicated)."),
        click.option("--checkpoint-llm", is_flag=True,
                     help="Recompute the language model's decoder-layer activations in backward: less memory, "
                          "one more forward of the LLM."),
        click.option("--checkpoint-vision", is_flag=True,
                     help="Recompute the vision tower's block activations in backward: less memory, one more "
                          "forward of the tower."),
        click.option("--offload-optimizer", is_flag=True,
                     help="Keep the optimizer's moments and masks in pinned host memory, brought to the GPU a chunk "
                          "at a time in each step: the same update, about 9 bytes per trainable weight less GPU "
                          "memory, two host transfers of the state per step."),
    ]):
        f = opt(f)
    return f


def _terminated(signum, frame):
    """SIGTERM (`kill`, `timeout`, a scheduler's preemption) unwinds as Ctrl-C does: every temporary output and
    scratch directory is removed on the way out, and nothing is left half-written."""
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def friendly(fn):
    """Turn expected failures into one clear line and exit status 1 (tracebacks only with -v)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # our progress at INFO; other libraries' (rouge-score, matplotlib) only from WARNING, under their own name
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
        log.setLevel(logging.DEBUG if kwargs.get("verbose") else logging.INFO)
        main_thread = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except (DataError, FileExistsError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            if kwargs.get("verbose"):
                raise
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:       # the shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM)
            terminated = str(e).startswith("terminated by signal")
            click.echo("Terminated." if terminated else "Aborted!", err=True)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, before)
    return wrapper


def emit(result: dict, as_json: bool) -> None:
    if as_json and os.environ.get("RANK", "0") == "0":   # under torchrun rank 0 speaks for the job
        click.echo(json.dumps(result, indent=2, default=str))


def config_from(kw: dict) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: v for k, v in kw.items() if k in fields and v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mllm-surgery")
def main():
    """Make a multimodal LLM forget what a person looks like (Visual Knowledge Distillation unlearning)."""


SEED = click.IntRange(0, SEED_LIMIT - 1)  # the type of a --seed option


def seeds_option(ctx, param, value):
    """A click callback: "0,1,2" -> (0, 1, 2), distinct and non-negative."""
    parts = [x.strip() for x in value.split(",") if x.strip()]
    if not all(x.isascii() and x.isdigit() for x in parts):   # int() also reads "1_0", "+3" and non-ASCII digits
        raise click.BadParameter(f"{value!r}: expected comma-separated seeds like 0,1,2")
    seeds = tuple(int(x) for x in parts)
    try:
        check_seeds(seeds)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected distinct seeds in [0, 2^32)") from None
    return seeds


def settings_option(ctx, param, values) -> dict:
    """--set FIELD=VALUE (repeatable) -> {field: value} (VALUE read as JSON when it parses, else as text)."""
    out = {}
    for v in values:
        name, sep, raw = v.partition("=")
        if not (sep and name):
            raise click.BadParameter(f"{v!r}: expected FIELD=VALUE, e.g. lr=1e-3")
        out[name.replace("-", "_")] = setting_value(raw)
    return out


def setting_value(raw: str):
    """The VALUE of a --set FIELD=VALUE: JSON when it parses (numbers, true/false; a list becomes the tuple a Config
    field holds), else the text itself."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return tuple(value) if isinstance(value, list) else value
