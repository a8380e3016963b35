"""The demo's plan of steps over two lanes: order, timings, and plans that cannot run."""
import os
from contextlib import nullcontext

import pytest

import torch

from surgery.bench.lanes import From, LaneDied, Step, run_plan, spawned_process


def _square(x):
    return x * x


def _add(*xs):
    return sum(xs)


def _die():
    os._exit(9)                 # as a process the system kills: no exception, no result


def test_one_process_runs_the_steps_in_order_and_times_each():
    order = []
    steps = [Step("a", "there", order.append, ("a",)), Step("b", "here", order.append, ("b",), after=("a",)),
             Step("c", "there", _square, (3,))]
    timings = {}
    values = run_plan(steps, None, 1, timings, seed=7)
    assert order == ["a", "b"] and values["c"] == 9 and set(timings) == {"a_s[7]", "b_s[7]", "c_s[7]"}


def test_two_processes_give_every_value_and_wait_where_a_step_needs_the_other_lane():
    steps = [Step("x", "there", _square, (4,)), Step("y", "here", _add, (1, 2)),
             Step("z", "here", _add, (5,), after=("x",)), Step("w", "there", _square, (2,), after=("y", "x"))]
    with spawned_process() as pool:
        values = run_plan(steps, pool, 1, {}, seed=0)
    assert values == {"x": 16, "y": 3, "z": 5, "w": 4}


def _ones(n):
    return torch.ones(n)


def _total(*tensors, scale=1.0):
    return float(sum(t.sum() for t in tensors)) * scale


@pytest.mark.parametrize("processes", [1, 2])
def test_a_step_takes_the_values_of_the_steps_it_comes_after_on_either_lane(processes):
    """From: a value made here goes there and one made there (a tensor) comes here; a step there that takes the value
    of a step queued there before it waits for it to finish."""
    steps = [Step("there1", "there", _ones, (3,)), Step("here1", "here", _ones, (4,)),
             Step("there2", "there", _total, (From("there1"), From("here1")), after=("there1", "here1")),
             Step("here2", "here", _total, (From("there1"),), {"scale": From("there2")}, after=("there1", "there2"))]
    with spawned_process() if processes == 2 else nullcontext() as pool:
        values = run_plan(steps, pool, 1, {}, seed=0)
    assert values["there2"] == 7.0 and values["here2"] == 21.0 and values["there1"].equal(torch.ones(3))


@pytest.mark.parametrize("steps, message", [
    ([Step("a", "here", _square, (1,)), Step("b", "here", _square, (From("a"),))], "takes the value of \\['a'\\]"),
    ([Step("a", "here", _square, (1,), after=("b",)), Step("b", "here", _square, (1,))], "do not come before it"),
    ([Step("a", "elsewhere", _square, (1,))], "lane must be here or there"),
    ([Step("a", "here", _square, (1,)), Step("a", "there", _square, (1,))], "names must be unique"),
])
def test_a_plan_that_cannot_run_is_refused_before_anything_runs(steps, message):
    with pytest.raises(ValueError, match=message):
        run_plan(steps, None, 1, {}, seed=0)


def test_a_dead_second_process_names_the_step_and_what_to_do():
    steps = [Step("fine", "here", _add, (1, 2)), Step("dies", "there", _die), Step("after", "here", _add, (3,),
                                                                                    after=("dies",))]
    with spawned_process() as pool, pytest.raises(LaneDied, match="'dies'.*run the same command again"):
        run_plan(steps, pool, 1, {}, seed=0)


def _sleep(seconds):
    import time
    time.sleep(seconds)
    return seconds


def test_an_interrupted_block_stops_the_spawned_process_at_once():
    """Ctrl-C or SIGTERM to this process alone (a KeyboardInterrupt here) must not wait for the child's step (the
    demo's other lane: a whole model's training) to finish."""
    import time
    with spawned_process() as pool:
        assert pool.submit(_sleep, 0).result() == 0      # the child is up
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with spawned_process() as pool:
            pool.submit(_sleep, 0).result()
            pool.submit(_sleep, 60)
            raise KeyboardInterrupt
    assert time.perf_counter() - t < 30


_CHILD_STEPS = '''
import time
from surgery.progress import progress_bar

def bar():
    return len(list(progress_bar(range(3), "step", show=True)))

def sleep(s):
    time.sleep(s)
'''
_INTERRUPTED_RUN = '''
from surgery.bench.lanes import spawned_process
import steps

if __name__ == "__main__":
    try:
        with spawned_process() as pool:
            assert pool.submit(steps.bar).result() == 3     # the child has drawn a progress bar
            pool.submit(steps.sleep, 60)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("interrupted")
'''


def test_an_interrupted_block_leaves_no_semaphore_behind(tmp_path):
    """A child stopped at once must hold nothing that the resource tracker reports at exit: tqdm's default lock is a
    multiprocessing semaphore registered with the parent's tracker, which a terminated child never releases (a
    Ctrl-C of `surgery compare` or `demo` ended with "leaked semaphore objects")."""
    import subprocess
    import sys
    (tmp_path / "steps.py").write_text(_CHILD_STEPS)
    (tmp_path / "run.py").write_text(_INTERRUPTED_RUN)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "interrupted" in r.stdout, r.stderr
    assert "step" in r.stderr and "leaked" not in r.stderr, r.stderr
