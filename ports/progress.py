"""Progress displays of every long command, in one place.

- ``bar``: the rich bar of ``jaxmask generate`` / ``augment`` (description, bar, done/total, a
  free ``rate`` field, ETA) and, with ``note=True``, of ``jaxmask quality`` (elapsed time too).
- ``Bars``: several such bars, one task per phase, or nothing (``jaxmask quality``).
- ``Clock``: wall-clock seconds per named phase (a phase can be entered many times).
- ``reporter``: a one-line text bar on stderr for training loops (``train-toy``, the segmenter),
  which also reads well in a log file.
"""

import contextlib
import sys
import time
from collections.abc import Callable


def bar(disable: bool = False, *, note: bool = False):
    """A rich ``Progress``: description, bar, done/total, the task's ``rate`` field, ETA; with
    ``note`` a fixed-width description, the task's ``note`` field and the elapsed time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if note:
        columns = (
            TextColumn("{task.description:<40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
    return Progress(*columns, disable=disable)


class Bars:
    """One ``bar(note=True)`` with a task per phase, or nothing when not ``enabled``."""

    def __init__(self, enabled: bool):
        self.progress = bar(note=True) if enabled else None

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)

    def callback(self, description: str, total: int) -> Callable[[int, float | None], None]:
        """``f(done, loss_or_None)``: moves the phase's bar to ``done``."""
        if self.progress is None:
            return lambda done, value: None
        task = self.progress.add_task(description, total=total, note="")

        def update(done, value):
            note = "" if value is None else f"loss {value:.3f}"
            self.progress.update(task, completed=done, note=note)

        return update


class Clock:
    """Wall-clock seconds per named phase: ``with clock("load"): ...``; ``totals()`` adds the
    whole time since the clock was made."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

    def totals(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


def reporter(progress, steps: int, label: str, start: int = 0) -> Callable[[int, float], None]:
    """``report(done, loss)``: redraws ``label [####   ] done/steps loss ... s, eta ... s``.

    ``start`` is the step a resumed run began at: the time and rate count from there.

    ``progress`` True draws the bar, False draws nothing, a callable is returned as it is (a
    caller's own progress display). The line ends when ``done == steps``.
    """
    if callable(progress):
        return progress
    if not progress:
        return lambda done, value: None
    began = time.perf_counter()

    def report(done, value):
        elapsed = time.perf_counter() - began
        eta = elapsed / max(done - start, 1) * (steps - done)
        filled = "#" * int(30 * done / steps)
        print(
            f"\r{label} [{filled:<30}] {done}/{steps} loss {value:.4f} "
            f"{elapsed:.0f} s, eta {eta:.0f} s",
            end="\n" if done == steps else "",
            file=sys.stderr,
            flush=True,
        )

    return report
