"""surgery.progress: live bars on a terminal, at most one redraw per QUIET_INTERVAL seconds in a file or pipe."""
import io
import time

from surgery.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def renders(text: str, desc: str) -> int:
    return text.count(desc + ":")


def run(monkeypatch, stream, n, pause=0.0, **kw):
    monkeypatch.setattr("sys.stderr", stream)
    seen = []
    for i in progress_bar(range(n), "work", **kw):
        seen.append(i)
        time.sleep(pause)
    assert seen == list(range(n))           # the bar never changes what is iterated
    return stream.getvalue()


def test_a_file_gets_the_first_and_last_render_of_a_loop_under_the_interval(monkeypatch):
    out = run(monkeypatch, io.StringIO(), 8, pause=0.15)     # a terminal would redraw it 8 times (below)
    assert renders(out, "work") == 2 and "8/8" in out


def test_a_terminal_redraws_live(monkeypatch):
    out = run(monkeypatch, Terminal(), 8, pause=0.15)
    assert renders(out, "work") >= 8 and "8/8" in out


def test_hidden_writes_nothing(monkeypatch):
    assert run(monkeypatch, Terminal(), 5, show=False) == ""
