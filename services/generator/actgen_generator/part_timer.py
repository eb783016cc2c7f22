"""Seconds per part of a sampler call, marked inside the real step loop (the benchmark's part timings).

On a GPU each mark records a CUDA event on the current stream, so marking never waits for the
device; :meth:`PartTimer.finish` synchronises once and adds up the intervals. On the CPU a mark
reads ``time.perf_counter``. The parts of one call tile it from :meth:`begin` to the last mark, so
their sum is the call's time on the device; the bench checks it against the wall time
(docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PartTimer:
    """Intervals between consecutive marks, summed per part name over the calls since :meth:`reset`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: defaultdict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []
        self._last: object | None = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        """The start of a call: the first part is timed from here."""
        self._last = self._now()

    def mark(self, part: str) -> None:
        """The time since the last mark (or :meth:`begin`) belongs to ``part``."""
        if self._last is None:
            return
        now = self._now()
        self._pending.append((part, self._last, now))
        self._last = now

    def finish(self) -> dict[str, float]:
        """Resolve the marks of the calls so far (one device sync on a GPU); the totals per part."""
        if self.cuda and self._pending:
            torch.cuda.synchronize()
        for part, start, end in self._pending:
            if self.cuda:
                seconds = start.elapsed_time(end) / 1000.0  # type: ignore[attr-defined]
            else:
                seconds = float(end) - float(start)  # type: ignore[arg-type]
            self.totals[part] += seconds
        self._pending.clear()
        self._last = None
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()
        self._pending.clear()
        self._last = None


__all__ = ["PartTimer"]
