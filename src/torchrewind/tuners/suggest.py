"""Rules that turn an LR range test's loss curve into a suggested learning rate.

All work on the smoothed loss against ``log10(lr)``, on the points between ``skip_start`` and ``len - skip_end`` whose
loss is finite:

* ``steepest``: where the loss falls fastest per decade of lr, before its minimum (the classic rule of torch-lr-finder
  and Lightning, which also look past the minimum, where a diverging loss swings both ways; it jumps around on noisy
  curves: the steepest point of a bumpy curve can be anywhere in the descent).
* ``valley``: the middle, in log-lr, of the descent: from where the loss leaves its plateau (the last point within
  10% of the drop from the plateau's top) to where it reaches the bottom (the first point within 10% of the
  minimum). It uses the whole descent rather than one derivative, so noise moves it less.
* ``minimum``: a tenth of the lr at the lowest loss (the rule of thumb "one order of magnitude before the minimum").

``benchmarks/bench_tuners.py`` measures how far each lands from the best lr of a grid of short trainings, on several
tasks; :func:`~torchrewind.lr_find` uses ``valley`` by default (see the README for the numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

RULES = ("valley", "steepest", "minimum")


def _window(lrs: Sequence[float], losses: Sequence[float], skip_start: int, skip_end: int) -> list[int]:
    n = len(losses)
    return [i for i in range(min(skip_start, n), max(n - skip_end, 0)) if math.isfinite(losses[i]) and lrs[i] > 0]


def steepest(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 10, skip_end: int = 1) -> float | None:
    """The lr where d(loss)/d(log10 lr) is most negative, up to the lowest loss (past it the loss of a diverging
    run swings both ways; ``None`` with fewer than 3 usable points)."""
    idx = _window(lrs, losses, skip_start, skip_end)
    if idx:
        idx = idx[: min(range(len(idx)), key=lambda k: losses[idx[k]]) + 1]
    if len(idx) < 3:
        return None
    x = torch.tensor([math.log10(lrs[i]) for i in idx], dtype=torch.float64)
    y = torch.tensor([losses[i] for i in idx], dtype=torch.float64)
    if not bool((x[1:] > x[:-1]).all()):
        return None  # the sweep must increase the lr
    (grad,) = torch.gradient(y, spacing=(x,))
    return lrs[idx[int(grad.argmin())]]


def valley(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 10, skip_end: int = 1) -> float | None:
    """The middle (in log-lr) of the descent: from the last point still within 10% of the plateau (the highest loss
    before the minimum) to the first point within 10% of the minimum. ``None`` without a descent."""
    idx = _window(lrs, losses, skip_start, skip_end)
    if len(idx) < 3:
        return None
    m = min(range(len(idx)), key=lambda k: losses[idx[k]])  # the first lowest point
    before = idx[: m + 1]
    lo = losses[idx[m]]
    top = max(losses[i] for i in before)
    drop = top - lo
    if len(before) < 3 or not drop > 0:
        return None
    a = max(k for k, i in enumerate(before) if losses[i] >= lo + 0.9 * drop)
    b = min(k for k, i in enumerate(before) if k >= a and losses[i] <= lo + 0.1 * drop)
    return 10 ** ((math.log10(lrs[before[a]]) + math.log10(lrs[before[b]])) / 2)


def minimum(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 10, skip_end: int = 1) -> float | None:
    """A tenth of the lr at the lowest loss (``None`` without a usable point)."""
    idx = _window(lrs, losses, skip_start, skip_end)
    if not idx:
        return None
    best = min(idx, key=lambda i: losses[i])
    return lrs[best] / 10


SUGGEST: dict[str, Callable[..., float | None]] = {"valley": valley, "steepest": steepest, "minimum": minimum}
