"""Two lanes of work for the demo: this process and one spawned beside it, and a plan of steps run over them.

A step is a top-level function with its arguments (among them, as `From`, values of steps it comes after), a lane
("here" or "there") and the steps it must come `after`.
`run_plan` runs a step here as soon as what it comes after has finished, and queues a step there as soon as what it
comes after has finished or is queued there before it (the spawned process runs its queue in order). Every step
seeds itself and runs at the demo's thread count, so its result does not depend on its lane or on what ran beside
it: with one process (`pool` None) the same plan runs in its own order, with the same results."""
import logging
import multiprocessing
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("surgery")


class LaneDied(RuntimeError):
    """The spawned process ended without finishing its steps."""


@contextmanager
def spawned_process():
    """A pool of one spawned process (never a fork of a process that holds torch threads) that logs as this one. When
    the block raises (a failure, Ctrl-C, or SIGTERM sent to this process alone), the child is stopped at once instead
    of being waited for to finish its step (a whole model's training)."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_init,
                               initargs=(log.getEffectiveLevel(),))
    try:
        yield pool
    except BaseException:
        for child in list((getattr(pool, "_processes", None) or {}).values()):
            child.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _child_init(level: int) -> None:
    """Log as the parent does. Progress bars (ours and transformers') take a thread lock, not tqdm's default
    multiprocessing one: a semaphore made in the child is registered with the parent's resource tracker, and a child
    stopped by `terminate` cannot release it, so a Ctrl-C ended with a "leaked semaphore objects" warning. Nothing
    shares the lock with another process: the parent's bars have a lock of their own."""
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(level)


def _in_lane(threads: int, fn, *args, **kw) -> tuple:
    """fn(*args, **kw) on `threads` torch threads: (value, seconds)."""
    from ..pipeline import torch_threads
    with torch_threads(threads):
        t = time.perf_counter()
        return fn(*args, **kw), time.perf_counter() - t


@dataclass(frozen=True)
class From:
    """An argument of a step: the value of the step `name`, which that step must come after (and which travels to the
    spawned process when the step runs there)."""
    name: str


@dataclass
class Step:
    name: str
    lane: str                       # "here" (this process) or "there" (the spawned one)
    fn: Callable
    args: tuple = ()
    kw: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()

    def needs(self) -> set[str]:
        """The steps whose values are among this step's arguments."""
        return {a.name for a in (*self.args, *self.kw.values()) if isinstance(a, From)}


def run_plan(steps: list[Step], pool, threads: int, timings: dict, seed: int) -> dict:
    """Run `steps` (in an order where each comes after the steps it needs) over this process and `pool`'s (None:
    all here, in order). Returns {step name: value}; each step's seconds go into `timings` as NAME_s[SEED]."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"plan: step names must be unique (got {names})")
    for k, s in enumerate(steps):
        if s.lane not in ("here", "there"):
            raise ValueError(f"plan: step {s.name!r}: lane must be here or there, not {s.lane!r}")
        if missing := [d for d in s.after if d not in names[:k]]:
            raise ValueError(f"plan: step {s.name!r} comes after {missing}, which do not come before it")
        if unordered := sorted(s.needs() - set(s.after)):
            raise ValueError(f"plan: step {s.name!r} takes the value of {unordered} but does not come after it")

    def key(name):
        return f"{name}_s[{seed}]"

    values, futures, lane = {}, {}, {s.name: ("here" if pool is None else s.lane) for s in steps}
    queue = [s for s in steps if lane[s.name] == "there"]
    local = [s for s in steps if lane[s.name] == "here"]

    def collect(name):
        try:
            values[name], timings[key(name)] = futures.pop(name).result()
        except BrokenProcessPool:
            raise LaneDied(f"the second process died while it ran or waited to run step {name!r} (killed by the "
                           "system, e.g. out of memory?). What finished is cached: run the same command again, or "
                           "with --processes 1") from None

    def finished(name):
        if name in futures and futures[name].done():
            collect(name)
        return name in values

    def resolved(s):
        """s's arguments with each From replaced by the value of its step."""
        def value(a):
            return values[a.name] if isinstance(a, From) else a
        return tuple(map(value, s.args)), {k: value(a) for k, a in s.kw.items()}

    while queue or local:
        # queue there, in order, behind what is queued there before it (but not behind a step whose value it takes)
        while queue and all(finished(d) or (d in futures and d not in queue[0].needs()) for d in queue[0].after):
            s = queue.pop(0)
            args, kw = resolved(s)
            futures[s.name] = pool.submit(_in_lane, threads, s.fn, *args, **kw)
        if local and all(finished(d) for d in local[0].after):
            s = local.pop(0)
            args, kw = resolved(s)
            values[s.name], timings[key(s.name)] = _in_lane(threads, s.fn, *args, **kw)
            continue
        if not futures:   # cannot happen for a plan in the order checked above; never spin
            raise RuntimeError(f"plan: nothing runs and {(local or queue)[0].name!r} waits")
        wait(list(futures.values()), return_when=FIRST_COMPLETED)
    for name in list(futures):
        collect(name)
    return values
