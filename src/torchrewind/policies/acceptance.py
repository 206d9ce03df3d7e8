"""Acceptance rules of a step-size search: is the trial step, measured on the same mini-batch, good enough?

A rule is called with f0 (the loss before the step), f1 (the loss after it) and g·d (the directional derivative
∇f(θ)·Δ, measured only when the rule's ``needs_direction`` is True) and returns (accepted, why).
"""

from __future__ import annotations

from typing import Any

from .._checks import check_number
from ._common import check_factor


class Armijo:
    """Sufficient decrease: f(θ+Δ) ≤ f(θ) + c·∇f(θ)·Δ. If Δ is not a descent direction (∇f·Δ ≥ 0, possible with
    momentum or Adam), "the loss did not increase" instead. ``c`` in (0, 1); 1e-4 is the textbook value
    (Nocedal & Wright).

    Example::

        rule = Armijo(c=1e-4)
        ok, why = rule(f0=2.3, f1=2.1, gd=-0.5)
    """

    needs_direction = True

    def __init__(self, c: float = 1e-4, who: str = "Armijo") -> None:
        self.c = check_factor("c", c, who)

    def __call__(self, f0: float, f1: float, gd: float) -> tuple[bool, str]:
        if gd >= 0:
            return f1 <= f0, "not a descent direction: required no increase"
        bound = f0 + self.c * gd
        return f1 <= bound, f"armijo: f1={f1:.6g} vs f0+c*g.d={bound:.6g}"

    def settings(self) -> dict[str, Any]:
        return {"c": self.c}


class NoIncrease:
    """The bold-driver rule: the loss did not increase, within ``tolerance`` (relative): f1 ≤ f0 + tolerance·|f0|.

    Example::

        rule = NoIncrease(tolerance=0.0)
        ok, why = rule(f0=2.3, f1=2.4, gd=0.0)       # (False, ...)
    """

    needs_direction = False

    def __init__(self, tolerance: float = 0.0, who: str = "NoIncrease") -> None:
        self.tolerance = check_number("tolerance", tolerance, who, lo=0.0)

    def __call__(self, f0: float, f1: float, gd: float) -> tuple[bool, str]:
        bound = f0 + self.tolerance * abs(f0)
        return f1 <= bound, f"f1={f1:.6g} vs bound={bound:.6g}"

    def settings(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance}
