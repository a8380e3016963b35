"""Run under torchrun by the tests in this folder.

    driver.py runs RUNS.json           every argument list in RUNS.json through the `surgery` command line, in this one
                                       job (the imports and the process group are paid once)
    driver.py fail ARGS...             the `surgery` command ARGS, where at their second training step rank 1 raises
                                       an exception and rank 2 is killed (SIGKILL)
    driver.py differ EXTRA ARGS...     the `surgery` command ARGS, rank 1's with the JSON list EXTRA appended (a
                                       wrapper that gives one rank other settings)
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from surgery.cli import main as surgery


def fail_at_second_step() -> None:
    import surgery.methods.loop as loop
    backward, calls = loop._backward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "1":
            raise ValueError("injected failure")
        if len(calls) == 2 and os.environ["RANK"] == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        return backward(*args, **kwargs)
    loop._backward = failing


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "runs":
        dist.init_process_group("gloo")
        for args in json.loads(Path(sys.argv[2]).read_text()):
            if os.environ["RANK"] == "0":
                print(f"surgery {' '.join(args)}", file=sys.stderr, flush=True)
            surgery(args, prog_name="surgery", standalone_mode=False)
        dist.destroy_process_group()
    elif mode == "fail":
        fail_at_second_step()
        surgery(sys.argv[2:], prog_name="surgery")
    elif mode == "differ":
        extra = json.loads(sys.argv[2]) if os.environ["RANK"] == "1" else []
        surgery(sys.argv[3:] + extra, prog_name="surgery")
