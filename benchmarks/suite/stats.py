"""Statistics over seeds: mean, std, standard error, the +/-2 standard-error comparison, markdown tables.

Example::

    from benchmarks.suite.stats import compare, fmt, table
    verdict = compare(losses_a, losses_b, lower_is_better=True)      # "win" / "tie" / "loss" for a
    print(table(["method", "loss"], [["a", fmt(losses_a)], ["b", fmt(losses_b)]]))
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

VERDICTS = ("win", "tie", "loss")


def _floats(xs: Iterable[float]) -> list[float]:
    return [float(x) for x in xs]


def mean(xs: Iterable[float]) -> float:
    """Mean; nan for no samples (a non-finite sample propagates)."""
    v = _floats(xs)
    return statistics.fmean(v) if v else math.nan


def std(xs: Iterable[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one sample, nan for none."""
    v = _floats(xs)
    if not v:
        return math.nan
    return statistics.stdev(v) if len(v) > 1 else 0.0


def sem(xs: Iterable[float]) -> float:
    """Standard error of the mean: std / sqrt(n)."""
    v = _floats(xs)
    return std(v) / math.sqrt(len(v)) if v else math.nan


def compare(a: Sequence[float], b: Sequence[float], lower_is_better: bool, *, paired: bool = False,
            k: float = 2.0) -> str:  # fmt: skip
    """``"win"`` if ``a`` is better than ``b`` by more than ``k`` standard errors of the difference of the means,
    ``"loss"`` if worse by more than that, else ``"tie"``.

    Unpaired (default): SE = sqrt(sem(a)^2 + sem(b)^2). ``paired=True`` (same seeds, in the same order): SE of the
    per-seed differences. Non-finite samples (a diverged run) count as the worst possible: a side with any loses to
    a side without; two such sides tie.

    Example::

        compare([0.10, 0.11, 0.12], [0.20, 0.21, 0.19], lower_is_better=True)    # "win"
    """
    a, b = _floats(a), _floats(b)
    if not a or not b:
        raise ValueError("compare needs at least one sample on each side")
    bad_a, bad_b = not all(map(math.isfinite, a)), not all(map(math.isfinite, b))
    if bad_a or bad_b:
        return "tie" if bad_a and bad_b else ("loss" if bad_a else "win")
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired compare needs as many samples on each side, got {len(a)} and {len(b)}")
        d = [x - y for x, y in zip(a, b)]
        diff, se = mean(d), sem(d)
    else:
        diff, se = mean(a) - mean(b), math.hypot(sem(a), sem(b))
    if abs(diff) <= k * se:
        return "tie"
    better = diff < 0 if lower_is_better else diff > 0
    return "win" if better else "loss"


def fmt(xs: Sequence[float], digits: int = 3, *, percent: bool = False) -> str:
    """``mean ± std`` with ``digits`` significant digits (``percent``: x100 with a % sign); non-finite runs are
    counted instead of averaged (``nan (2/5 runs)``), and the finite ones summarised."""
    v = _floats(xs)
    if not v:
        return "–"
    bad = [x for x in v if not math.isfinite(x)]
    good = [x for x in v if math.isfinite(x)]
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if not good:
        return f"nan ({len(bad)}/{len(v)} runs)"
    m, s = mean(good) * scale, std(good) * scale
    text = f"{_num(m, digits)} ± {_num(s, 2)}{unit}" if len(good) > 1 else f"{_num(m, digits)}{unit}"
    return f"{text}, nan in {len(bad)}/{len(v)}" if bad else text


def _num(x: float, digits: int) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if 1e-3 <= abs(x) < 1e5:
        decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
        return f"{x:.{decimals}f}"
    return f"{x:.{max(digits - 1, 0)}e}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table.

    Example::

        print(table(["task", "loss"], [["wine", "0.01 ± 0.002"]]))
    """
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def group(results: Iterable[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Results (the runner's dicts) grouped by the values of ``keys``, in first-seen order.

    Example::

        for (task, config), rs in group(results, "task", "config").items():
            print(task, config, fmt([r["final"]["train_loss"] for r in rs]))
    """
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
