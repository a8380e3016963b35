"""Progress bars on stderr. On a terminal a bar redraws live; written to a file or a pipe (a logged run, CI, the
demo's second process) every redraw is another line, which made a cold `surgery demo --seeds 0,1,2 > log 2>&1` 5.9
MB of bars, so there a bar redraws at most once every `QUIET_INTERVAL` seconds: a long stage still shows where it
is, and the log keeps the per-epoch and per-stage lines readable."""
import sys

from tqdm import tqdm

QUIET_INTERVAL = 30.0


def progress_bar(iterable, desc: str, *, show: bool = True, leave: bool = True) -> tqdm:
    """`tqdm(iterable)` on stderr, hidden when not `show`; at most one redraw per `QUIET_INTERVAL` s off a terminal."""
    stream = sys.stderr
    live = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(iterable, desc=desc, disable=not show, leave=leave, file=stream,
                mininterval=0.1 if live else QUIET_INTERVAL)
