"""torchrun on the CPU (gloo) for the multi-process tests: a free port per job, a time limit instead of a hang."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("driver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc-per-node nproc driver.py args...`, in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(DRIVER), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(job: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a job from `start`; fails the test (and kills the job) instead of hanging."""
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        out, err = job.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f}s (a hang?):\n{err[-5000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def torchrun(*args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start(*args, nproc=nproc), timeout)
