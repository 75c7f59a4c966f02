"""Where a real-time call's 80 ms frames begin, so that they are complete just before a tick.

Implements:
  * `TickGrid`: the engine's tick times while real-time calls are live, epoch + k * 80 ms;
  * `Aligner`: watches when a client's chunks arrive and, once, chooses how many zeros to put
    in front of the next samples (up to one frame; every sample is kept, in order) so that the
    call's frames end with the chunks that arrive closest before a tick (`best_shift`). The
    wait for a tick is then at most one of the client's chunks, whatever its phase.
Math only: `runtime.session` feeds it and applies the shift.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..model.config import FRAME_RATE, FRAME_SIZE

ALIGN_MIN_CHUNKS = 3  # chunk arrivals seen before going live that are enough to shift the framing then
ALIGN_WATCH_S = 0.5  # otherwise the arrivals are watched this long, live
ALIGN_MAX_CHUNKS = 64
ALIGN_LEAD_S = 0.005  # a frame should be complete this long before its tick (jitter of the pushes)
ALIGN_QUANTILE = 0.95  # of the observed waits: jitter beyond it costs a late frame now and then


@dataclass(frozen=True)
class TickGrid:
    """The engine's tick times while real-time calls are live: epoch + k * period."""

    epoch: float
    period_s: float = 1 / FRAME_RATE

    def after(self, t: float) -> float:
        """The first grid point later than `t`."""
        return self.epoch + (math.floor((t - self.epoch) / self.period_s) + 1) * self.period_s

    def at_or_after(self, t: float) -> float:
        return self.epoch + math.ceil((t - self.epoch) / self.period_s) * self.period_s


class Aligner:
    """The arrivals of one client's chunks, until the framing shift is chosen (once)."""

    def __init__(self, active: bool) -> None:
        self.shift: int | None = None if active else 0  # zeros put in front of the frames; None: not yet
        self._arrivals: list[tuple[float, int]] = []  # (time, samples received so far) after each chunk
        self._received = 0

    def observe(self, now: float, samples: int) -> None:
        self._received += samples
        if self.shift is None:
            self._arrivals.append((now, self._received))
            del self._arrivals[:-ALIGN_MAX_CHUNKS]

    @property
    def ready(self) -> bool:
        """Enough arrivals to choose the shift."""
        return self.shift is None and len(self._arrivals) >= ALIGN_MIN_CHUNKS

    def watched_s(self, now: float) -> float:
        return now - self._arrivals[0][0] if self._arrivals else 0.0

    def choose(self, grid: TickGrid) -> tuple[int, float]:
        """The shift (recorded) and the wait for a tick the call's frames will then have."""
        self.shift, wait = best_shift(self._arrivals, grid)
        self._arrivals.clear()
        return self.shift, wait


def best_shift(arrivals: list[tuple[float, int]], grid: TickGrid) -> tuple[int, float]:
    """Zeros to put in front of the next samples so that frames end where the client's chunks
    end that arrive closest before a tick (`ALIGN_LEAD_S` ahead, for `ALIGN_QUANTILE` of them),
    and the wait for the tick those chunks have.

    arrivals: (arrival time, samples received so far) after each chunk. A frame completes with
    the chunk that brings its last sample; after a shift of p zeros, frames end at the sample
    counts n with n + p = 0 (mod 1920). For each possible end n (mod 1920) the waits from the
    chunks' arrivals to the first tick `ALIGN_LEAD_S` later are compared."""
    waits: dict[int, list[float]] = defaultdict(list)
    for t, received in arrivals:
        waits[received % FRAME_SIZE].append(grid.after(t + ALIGN_LEAD_S) - t)
    quantiles = {end: float(np.quantile(w, ALIGN_QUANTILE)) for end, w in waits.items()}
    best = min(quantiles, key=lambda end: (quantiles[end], end))
    return (-best) % FRAME_SIZE, quantiles[best]
