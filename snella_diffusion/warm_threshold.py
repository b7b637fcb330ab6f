"""Warm-started exact τ selection: a narrow magnitude window around the previous step's τ.

After an optimizer step the factors move a little, so τ (the k-th smallest |M|) moves a
little. The cold CPU selection (``sparsify._bracketed_kthvalue``) estimates a window from a
strided sample, then reads all of M once more to count the entries below it and gather those
inside it. Warm-started, the first forward after a step counts and gathers inside a window
around the last τ while it builds M block by block (``blocked.merged_blocked_in_window``, the
blocks still in cache), and ``kthvalue`` runs on the gathered window only. When the k-th
smallest lies outside the window (a miss), the cold selection runs on M and the next window is
wider. Either way τ is exactly the k-th smallest |M|: the window changes the work, never the
value (tests/test_warm_threshold.py compares them bit for bit).

A change of k (the allocator moved the layer's budget) shifts the window by Δk divided by the
density of |M| near τ (entries per unit of magnitude, measured on the last window).

CPU only: on an accelerator, reading the count back would synchronise every layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

INITIAL_HALF_WIDTH = 1e-2
MIN_HALF_WIDTH = 1e-4
MAX_HALF_WIDTH = 0.25
# The next window's half-width is this many times the last relative move of τ, but shrinks
# by at most this factor per step (moves are noisy: a small one is often followed by a large one).
HALF_WIDTH_PER_MOVE = 4.0
HALF_WIDTH_DECAY = 0.7
# A k that moved by more than this fraction of itself selects cold: the density measured near
# the old τ says little so far away (a reallocation can move a layer's k by half).
MAX_RELATIVE_SHIFT = 0.05

_enabled = True


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every selection runs cold (the plain blocked path), e.g. to compare."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def enabled() -> bool:
    return _enabled


@dataclass
class WarmStart:
    """What the next selection of one adapter starts from.

    Attributes:
        threshold: the τ last selected (units of |M|).
        drop_count: the k it was selected for.
        density: entries of |M| per unit of magnitude near τ, from the last window, or None.
        half_width: the next window's half-width relative to τ.
    """

    threshold: float
    drop_count: int
    density: Optional[float] = None
    half_width: float = INITIAL_HALF_WIDTH

    def window(self, drop_count: int) -> Optional[tuple[float, float]]:
        """[low, high] expected to hold the ``drop_count``-th smallest |M|, or None when the
        last τ gives no guess: τ = 0, or k moved by more than ``MAX_RELATIVE_SHIFT`` or with
        the density near τ still unknown."""
        if self.threshold <= 0.0:
            return None
        center = self.threshold
        slack = self.half_width * self.threshold
        if drop_count != self.drop_count:
            if not self.density or abs(drop_count - self.drop_count) > MAX_RELATIVE_SHIFT * self.drop_count:
                return None
            shift = (drop_count - self.drop_count) / self.density
            center += shift
            slack += 0.5 * abs(shift)
        return max(center - slack, 0.0), center + slack


def after_hit(state: WarmStart, threshold: float, drop_count: int, window: tuple[float, float],
              window_count: int) -> WarmStart:
    """The state after a selection that found τ inside ``window`` (``window_count`` entries)."""
    low, high = window
    move = abs(threshold - 0.5 * (low + high)) / state.threshold
    half_width = max(HALF_WIDTH_PER_MOVE * move, HALF_WIDTH_DECAY * state.half_width, MIN_HALF_WIDTH)
    half_width = min(half_width, MAX_HALF_WIDTH)
    density = window_count / (high - low) if high > low and window_count else state.density
    return WarmStart(threshold, drop_count, density, half_width)


def after_cold(state: Optional[WarmStart], threshold: float, drop_count: int, missed: bool) -> WarmStart:
    """The state after a cold selection: the first one, or a fallback after a miss (the next
    window is then twice as wide)."""
    if state is None:
        return WarmStart(threshold, drop_count)
    half_width = min(2.0 * state.half_width, MAX_HALF_WIDTH) if missed else state.half_width
    return WarmStart(threshold, drop_count, state.density, half_width)
