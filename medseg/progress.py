"""Progress display: the one place that decides how long-running loops report progress.

Three displays, chosen per call by :func:`choose_display`:

``"bar"``
    a ``tqdm.auto`` bar (a widget in Jupyter), when the stream is a terminal;
``"lines"``
    plain lines without carriage returns, at most one every :data:`LINE_INTERVAL_S`
    seconds (a CI log or a file is not flooded; a short loop prints nothing);
``"quiet"``
    nothing, when :func:`set_quiet` was called (``medseg ... --quiet``) or the environment
    sets ``MEDSEG_QUIET=1``.

Errors and the commands' summary lines are printed by their callers whatever the display.
Keras's own progress bar follows the same decision through :func:`keras_verbose`, and
papermill's through :func:`papermill_progress`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

__all__ = [
    "LINE_INTERVAL_S",
    "choose_display",
    "is_quiet",
    "keras_verbose",
    "papermill_progress",
    "set_quiet",
    "start_bar",
]

# the least time between two plain progress lines
LINE_INTERVAL_S = 30.0
# values of MEDSEG_QUIET that silence progress
_TRUE = {"1", "true", "yes", "on"}

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) progress display for this process (``--quiet``)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """Whether progress is silenced: :func:`set_quiet` or ``MEDSEG_QUIET=1``."""
    return _quiet or os.environ.get("MEDSEG_QUIET", "").strip().lower() in _TRUE


def _is_terminal(stream: IO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def choose_display(stream: IO | None = None) -> str:
    """``"quiet"``, ``"bar"`` (``stream`` is a terminal) or ``"lines"``.

    Parameters
    ----------
    stream : file, optional
        Where the progress goes; default ``sys.stderr`` (tqdm's).
    """
    if is_quiet():
        return "quiet"
    return "bar" if _is_terminal(sys.stderr if stream is None else stream) else "lines"


def keras_verbose() -> int:
    """Keras's ``verbose`` for ``fit`` and medseg's loop: 1 (a progress bar with ETA) on a
    terminal, 2 (one line per epoch) otherwise, 0 when quiet.

    Keras's bar rewrites its line with carriage returns whenever it thinks it may
    (on any POSIX system), so it is asked for only when stdout, where it writes, is a
    terminal.
    """
    return {"quiet": 0, "bar": 1, "lines": 2}[choose_display(sys.stdout)]


def papermill_progress() -> bool:
    """papermill's ``progress_bar=``: on a terminal and not quiet."""
    return choose_display() == "bar"


def start_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    leave: bool = True,
    min_total: int = 0,
    stream: IO | None = None,
    interval: float = LINE_INTERVAL_S,
):
    """A progress display of ``total`` steps; advance it with ``update()``, end it with
    ``close()`` (or use it as a context manager).

    Parameters
    ----------
    total : int, optional
        Steps expected (None: unknown, only the count is shown).
    desc : str
        What progresses, e.g. ``"predict"`` or ``"fold 2/5"``.
    unit : str
        One step, e.g. ``"case"``.
    leave : bool
        Keep the finished bar on screen. A bar that is not kept (a nested bar) prints no
        plain lines either.
    min_total : int
        Display nothing when ``total`` is below it (a nested bar only for big cases).
    stream : file, optional
        Where it is displayed (default ``sys.stderr``).
    interval : float
        Seconds between two plain lines.

    Returns
    -------
    object
        With ``update(n=1)``, ``set_postfix_str(text)``, ``write(text, file=None)`` (print a
        line without breaking the bar), ``close()`` and ``active`` (a bar is drawn).
    """
    display = choose_display(stream)
    if display == "quiet" or (total is not None and total < min_total):
        return _Silent()
    if display == "lines":
        return _Lines(total, desc, unit, stream, interval) if leave else _Silent()
    from tqdm.auto import tqdm  # imported only where a bar is drawn

    # disable=None: tqdm itself turns the bar off if the stream is not a terminal
    bar = tqdm(
        total=total, desc=desc, unit=unit, leave=leave, file=stream, disable=None,
        dynamic_ncols=True, mininterval=0.5,
    )
    bar.active = not bar.disable
    return bar


class _Silent:
    """No display; ``write`` still prints (the caller's lines are not progress)."""

    active = False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def write(self, text: str, file: IO | None = None) -> None:
        print(text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lines(_Silent):
    """Plain lines, at most one per ``interval`` seconds, and a last one if any was printed."""

    def __init__(self, total, desc, unit, stream, interval):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream, self.interval = stream, float(interval)
        self.n, self.postfix, self.printed = 0, "", False
        self.start = self.last = time.monotonic()

    def _print(self, now: float, done: bool = False) -> None:
        elapsed = now - self.start
        count = f"{self.n}" if self.total is None else f"{self.n}/{self.total}"
        timing = f"{elapsed:.0f} s"
        if done:
            timing = f"done in {timing}"
        elif self.total and self.n:  # a linear estimate, as tqdm's
            timing += f", ETA {elapsed / self.n * (self.total - self.n):.0f} s"
        postfix = f" {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {count} {self.unit}{postfix} ({timing})",
            file=self.stream or sys.stderr, flush=True,
        )
        self.last, self.printed = now, True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._print(now)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.printed:  # a loop short enough to print nothing stays silent
            self._print(time.monotonic(), done=True)
            self.printed = False
