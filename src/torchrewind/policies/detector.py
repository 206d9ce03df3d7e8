"""Robust online detection of upward spikes in a scalar series (a loss, a gradient norm)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from .._checks import check_choice, check_int, check_number, check_type
from ..errors import RewindValueError
from ._common import check_factor
from ._state import check_state, header


class SpikeDetector:
    """Robust online detection of upward spikes in a scalar series (a loss, a gradient norm).

    ``space="log"`` (default) judges log(x): a loss near zero is noisy in ratio terms (a batch of 0.1 among batches
    of 0.01 is ordinary once a classifier fits its data) and a spike is a jump by a *factor*, so the run's own noise
    is measured in log units. While the window's median is not positive (a loss that goes negative) it judges x
    itself, as ``space="linear"`` does. Values at or below zero count as ``tiny`` in log space.

    ``method="mad"``: z = (u − median) / max(scale, ``min_scale``) of u (log x, or x) over the last ``window``
    accepted values. The scale is 1.4826·MAD of the values (their spread); in log space with ``noise="diff"``
    (default) it is the smaller of that and 1.4826·MAD of the differences between consecutive values / √2 (the
    batch-to-batch noise, which a loss falling fast does not inflate: the spread alone, ``noise="level"``, counts
    the descent as noise and hides a spike early in training). ``method="ema"``: z = (u − mean) / max(std,
    ``min_scale``) with exponentially weighted mean and variance (``alpha``). ``min_scale`` is the least noise assumed (in log space: 0.1 ≈ a 10% spread; in linear
    space it is relative to |centre|): a series that barely moves does not make every small wobble a spike.
    A value is a spike when, after ``warmup`` values, z > ``threshold``, x > (1 + ``min_rel``)·median (the
    relative tolerance, on x itself) and x − median > ``min_abs``·(the median of the first ``warmup`` values) (the
    absolute tolerance, in units of the loss at the start: a loss that fell to 0 does not make 1e-9 a spike).
    Non-finite values are always spikes and never learned.

    The defaults (log space, noise from differences, window 50, threshold 4, min_scale 0.1, min_rel 0.5: at least
    1.5x the median, min_abs 0.01) were chosen on the ``tune`` half of ``benchmarks/suite``
    (``benchmarks/bench_policies.py``): no false roll-back in any clean run of its 14 tasks, and more of the faults
    that hurt (inputs x1e3, lr x50, NaN batches) caught than with threshold 6 / min_rel 1.

    The interface a guard uses: :meth:`score` and :meth:`is_spike` judge a value without changing anything,
    :meth:`update` learns an accepted one, :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    statistics (a resumed run keeps its warm-up and its window).

    Example::

        det = SpikeDetector(window=50, threshold=4)
        if det.is_spike(loss_value): ...
        else: det.update(loss_value)
    """

    def __init__(
        self,
        window: int = 50,
        threshold: float = 4.0,
        warmup: int = 20,
        min_rel: float = 0.5,
        method: str = "mad",
        alpha: float = 0.05,
        space: str = "log",
        min_scale: float = 0.1,
        min_abs: float = 0.01,
        noise: str = "diff",
    ) -> None:
        who = "SpikeDetector"
        check_choice("method", method, ("mad", "ema"), who)
        check_choice("noise", noise, ("diff", "level"), who)
        check_choice("space", space, ("log", "linear"), who)
        check_number("min_scale", min_scale, who, lo=0.0)
        check_number("min_abs", min_abs, who, lo=0.0)
        check_int("window", window, 3, who)
        check_int("warmup", warmup, 1, who)
        if method == "mad" and warmup > window:
            raise RewindValueError(f"{who}: warmup ({warmup}) cannot exceed window ({window}) with method='mad'.")
        # threshold=inf is allowed: only non-finite values are spikes then
        check_number("threshold", threshold, who, lo=0.0, lo_open=True, finite=False)
        check_number("min_rel", min_rel, who, lo=0.0)
        check_factor("alpha", alpha, who)
        self.window, self.threshold, self.warmup, self.min_rel = window, float(threshold), warmup, float(min_rel)
        self.method, self.alpha = method, float(alpha)
        self.space, self.min_scale, self.min_abs, self.noise = space, float(min_scale), float(min_abs), noise
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0
        self.mean = 0.0  # EMA of x and its variance (method="ema")
        self.var = 0.0
        self.log_mean = 0.0  # EMA of log x and its variance (method="ema", space="log")
        self.log_var = 0.0
        self.first: list[float] = []  # the first ``warmup`` values: their median is the run's starting level
        self._cached: tuple[float, float, float, float, float] | None = None

    @property
    def in_log(self) -> bool:
        """Whether values are judged in log space now (``space="log"`` and a positive median)."""
        return self.space == "log" and self._stats()[0] > 0

    def _stats(self) -> tuple[float, float, float, float, float]:
        """(median of x, log-space centre, log-space scale, linear centre, linear scale), cached until the next
        update/load (a guard asks several times per step)."""
        if self._cached is None:
            xs = sorted(self.values)
            med = _median(xs)
            if self.method == "ema":
                lin = self.mean, math.sqrt(self.var)
                logc = self.log_mean, math.sqrt(self.log_var)
            else:
                lin = med, _mad(xs, med)
                us = [_log(x) for x in xs]  # sorted too: log is monotone
                um = _median(us)
                spread = _mad(us, um)
                if self.noise == "diff" and len(self.values) >= 3:
                    # batch-to-batch noise: MAD of consecutive differences (about their median, the trend) / sqrt 2;
                    # the smaller of the two, since a trend inflates the spread and a few heavy-tailed values the
                    # differences
                    seq = [_log(x) for x in self.values]
                    ds = sorted(b - a for a, b in zip(seq, seq[1:]))
                    dm = _median(ds)
                    spread = min(spread, _mad(ds, dm) / math.sqrt(2.0))
                logc = um, spread
            self._cached = (med, *logc, *lin)
        return self._cached

    def centre_and_scale(self) -> tuple[float, float]:
        """(centre, scale) of the values as judged: of log x in log space, of x in linear space; the centre is the
        median (EMA mean with ``method="ema"``), the scale 1.4826·MAD (EMA std), floored at ``min_scale`` (times
        |centre| in linear space)."""
        med, lc, ls, c, sc = self._stats()
        if self.space == "log" and med > 0:
            return lc, max(ls, self.min_scale)
        return c, max(sc, self.min_scale * abs(c))

    def score(self, x: float) -> float:
        """The z-score of ``x`` (of log x in log space; 0 during warm-up)."""
        if self.count < self.warmup:
            return 0.0
        centre, scale = self.centre_and_scale()
        if scale <= 0:
            scale = 1e-12 * max(abs(centre), 1.0)
        return ((_log(x) if self.in_log else x) - centre) / scale

    def is_spike(self, x: float, threshold: float | None = None, min_rel: float | None = None) -> bool:
        """Whether ``x`` is a spike (non-finite values always are, even during warm-up). ``threshold`` and
        ``min_rel`` replace the detector's own for this one judgement (a guard's lower bar after a roll-back)."""
        if not math.isfinite(x):
            return True
        if self.count < self.warmup:
            return False
        med = self._stats()[0]
        threshold = self.threshold if threshold is None else threshold
        min_rel = self.min_rel if min_rel is None else min_rel
        return (self.score(x) > threshold and x > med + min_rel * abs(med)
                and x - med > self.min_abs * abs(_median(sorted(self.first))))  # fmt: skip

    def update(self, x: float) -> None:
        """Learn an accepted value (non-finite values are ignored)."""
        if not math.isfinite(x):
            return
        self._cached = None
        self.values.append(x)
        if len(self.first) < self.warmup:
            self.first.append(x)
        u = _log(x)
        if self.count == 0:
            self.mean, self.var = x, 0.0
            self.log_mean, self.log_var = u, 0.0
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
            d = u - self.log_mean
            self.log_mean += self.alpha * d
            self.log_var = (1 - self.alpha) * (self.log_var + self.alpha * d * d)
        self.count += 1

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "warmup": self.warmup, "min_rel": self.min_rel,
                "method": self.method, "alpha": self.alpha, "space": self.space,
                "min_scale": self.min_scale, "min_abs": self.min_abs, "noise": self.noise}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The statistics alone (window of values, count, EMA mean and variance of x and of log x, the first
        ``warmup`` values): what an undo restores, since a guard has its Rewind record them at every undo point."""
        return {"values": list(self.values), "count": self.count, "mean": self.mean, "var": self.var,
                "log_mean": self.log_mean, "log_var": self.log_var, "first": list(self.first)}  # fmt: skip

    def load_stats(self, stats: dict[str, Any]) -> None:
        """Restore :meth:`stats` (as recorded, unchecked; :meth:`load_state_dict` checks a saved state first)."""
        self.values = deque(stats["values"], maxlen=self.window)
        self.count, self.mean, self.var = stats["count"], stats["mean"], stats["var"]
        self.log_mean, self.log_var = stats["log_mean"], stats["log_var"]
        self.first = list(stats["first"])
        self._cached = None

    def state_dict(self) -> dict[str, Any]:
        """The statistics (window of values, count, EMA mean and variance) and the settings, as plain data.

        Example::

            torch.save(det.state_dict(), "det.pt")
            det2 = SpikeDetector(); det2.load_state_dict(torch.load("det.pt"))
        """
        return {**header(self, self.settings()), **self.stats()}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`. ``strict``: the settings must equal this detector's (a window of another size
        or another method would judge differently); ``strict=False`` keeps this detector's settings and loads the
        statistics (the newest ``window`` values). Refuses a malformed or mismatched state before changing anything.
        """
        who = "SpikeDetector.load_state_dict"
        sd = check_state(self, state_dict, self.settings(),
                         ("values", "count", "mean", "var", "log_mean", "log_var", "first"), strict, who)  # fmt: skip
        values = check_type("values", sd["values"], (list, tuple), who, "a list of finite numbers")
        first = check_type("first", sd["first"], (list, tuple), who, "a list of finite numbers")
        for v in (*values, *first):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RewindValueError(f"{who}: values must be finite numbers, got {v!r}.")
        count = check_int("count", sd["count"], len(values), who)
        # mean/var may have overflowed to inf on absurd values: any float is a state update() can produce
        ema = {k: float(check_type(k, sd[k], (int, float), who, "a number")) for k in ("mean", "var", "log_mean", "log_var")}
        first = [float(v) for v in first][: self.warmup]
        self.load_stats({"values": [float(v) for v in values], "count": count, **ema, "first": first})


TINY = 1e-30  # what a value at or below zero counts as in log space (a loss of exactly 0 happens)


def _log(x: float) -> float:
    return math.log(x) if x > TINY else math.log(TINY)


def _median(xs: list[float]) -> float:
    n = len(xs)
    if n == 0:
        return 0.0
    m = n // 2
    return xs[m] if n % 2 else 0.5 * (xs[m - 1] + xs[m])


def _mad(xs: list[float], centre: float) -> float:
    """1.4826 x the median absolute deviation from ``centre``: the standard deviation for normal data, robust."""
    return 1.4826 * _median(sorted(abs(x - centre) for x in xs))
