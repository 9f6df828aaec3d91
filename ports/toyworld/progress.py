"""A one-line text progress bar on stderr for the toy world's training loops."""

import sys
import time
from collections.abc import Callable


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
        bar = "#" * int(30 * done / steps)
        print(
            f"\r{label} [{bar:<30}] {done}/{steps} loss {value:.4f} "
            f"{elapsed:.0f} s, eta {eta:.0f} s",
            end="\n" if done == steps else "",
            file=sys.stderr,
            flush=True,
        )

    return report
