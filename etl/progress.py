"""Live progress of a long step: rows done of rows to do, rate and ETA, one line per update."""

from __future__ import annotations

import time


class Progress:
    """Prints ``<label>: done/total rows (pct), rate rows/s, ETA m:ss`` when ``done`` moves."""

    def __init__(self, label: str, total: int, clock=time.monotonic, out=print):
        self.label, self.total, self.clock, self.out = label, max(0, total), clock, out
        self.start, self.done = clock(), 0

    def line(self, done: int) -> str:
        """The progress line for ``done`` rows."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        pct = 100.0 * done / self.total if self.total else 100.0
        left = max(self.total - done, 0)
        eta = "-" if rate <= 0 else _clock(left / rate)
        return (f"{self.label}: {done}/{self.total} rows ({pct:.0f}%), {rate:.1f} rows/s, "
                f"ETA {eta}")

    def update(self, done: int) -> None:
        """Print a line when ``done`` grew since the last one."""
        if done > self.done:
            self.done = done
            self.out(self.line(done))


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
