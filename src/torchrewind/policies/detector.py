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

    ``method="mad"``: z = (x − median) / (1.4826·MAD) over the last ``window`` accepted values;
    ``method="ema"``: z = (x − mean) / std with exponentially weighted mean and variance (``alpha``).
    A value is a spike when, after ``warmup`` values, z > ``threshold`` and x > (1 + ``min_rel``)·centre.
    Non-finite values are always spikes and never learned.

    The interface a guard uses: :meth:`score` and :meth:`is_spike` judge a value without changing anything,
    :meth:`update` learns an accepted one, :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    statistics (a resumed run keeps its warm-up and its window).

    Example::

        det = SpikeDetector(window=50, threshold=6)
        if det.is_spike(loss_value): ...
        else: det.update(loss_value)
    """

    def __init__(
        self,
        window: int = 50,
        threshold: float = 6.0,
        warmup: int = 20,
        min_rel: float = 0.2,
        method: str = "mad",
        alpha: float = 0.05,
    ) -> None:
        who = "SpikeDetector"
        check_choice("method", method, ("mad", "ema"), who)
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
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self._cached: tuple[float, float] | None = None

    def centre_and_scale(self) -> tuple[float, float]:
        """(median, 1.4826·MAD) of the window, or (mean, std) with ``method="ema"``."""
        if self._cached is None:  # cached until the next update/load: a guard asks several times per step
            if self.method == "ema":
                self._cached = self.mean, math.sqrt(self.var)
            else:
                xs = sorted(self.values)
                med = _median(xs)
                self._cached = med, 1.4826 * _median(sorted(abs(x - med) for x in xs))
        return self._cached

    def score(self, x: float) -> float:
        """The z-score of ``x`` (0 during warm-up)."""
        if self.count < self.warmup:
            return 0.0
        centre, scale = self.centre_and_scale()
        if scale <= 0:
            scale = 1e-12 * max(abs(centre), 1.0)
        return (x - centre) / scale

    def is_spike(self, x: float) -> bool:
        """Whether ``x`` is a spike (non-finite values always are, even during warm-up)."""
        if not math.isfinite(x):
            return True
        if self.count < self.warmup:
            return False
        centre, _ = self.centre_and_scale()
        return self.score(x) > self.threshold and x > centre + self.min_rel * abs(centre)

    def update(self, x: float) -> None:
        """Learn an accepted value (non-finite values are ignored)."""
        if not math.isfinite(x):
            return
        self._cached = None
        self.values.append(x)
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.count += 1

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"window": self.window, "threshold": self.threshold, "warmup": self.warmup, "min_rel": self.min_rel,
                "method": self.method, "alpha": self.alpha}  # fmt: skip

    def stats(self) -> dict[str, Any]:
        """The statistics alone (window of values, count, EMA mean and variance): what an undo restores, since a
        guard has its Rewind record them at every undo point."""
        return {"values": list(self.values), "count": self.count, "mean": self.mean, "var": self.var}

    def load_stats(self, stats: dict[str, Any]) -> None:
        """Restore :meth:`stats` (as recorded, unchecked; :meth:`load_state_dict` checks a saved state first)."""
        self.values = deque(stats["values"], maxlen=self.window)
        self.count, self.mean, self.var = stats["count"], stats["mean"], stats["var"]
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
        sd = check_state(self, state_dict, self.settings(), ("values", "count", "mean", "var"), strict, who)
        values = check_type("values", sd["values"], (list, tuple), who, "a list of finite numbers")
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RewindValueError(f"{who}: values must be finite numbers, got {v!r}.")
        count = check_int("count", sd["count"], len(values), who)
        # mean/var may have overflowed to inf on absurd values: any float is a state update() can produce
        mean = float(check_type("mean", sd["mean"], (int, float), who, "a number"))
        var = float(check_type("var", sd["var"], (int, float), who, "a number"))
        self.load_stats({"values": [float(v) for v in values], "count": count, "mean": mean, "var": var})


def _median(xs: list[float]) -> float:
    n = len(xs)
    if n == 0:
        return 0.0
    m = n // 2
    return xs[m] if n % 2 else 0.5 * (xs[m - 1] + xs[m])
