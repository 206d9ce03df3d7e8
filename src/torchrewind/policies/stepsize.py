"""The learning-rate schedule of a step-size search: shrink after a rejected trial, grow after an accepted step, back
to the iteration's start when the search gives up. Every param group is scaled by the same factor, so per-group
ratios are kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_number
from ..errors import RewindTypeError, RewindValueError
from ._common import check_factor, scales_each_step
from ._state import check_state, header
from .lr import lrs, scale_lrs, set_lrs


class StepSize:
    """×``shrink`` after a rejected trial; ×``grow`` after an accepted step (``"auto"``: 10 around an optimizer with
    an ``eps`` setting — with ``max_growth="auto"`` that is straight back to its lr: a rejection lowers one step, not
    the next ones —, 1.1 around any other), with the largest group lr capped at
    ``lr_max`` (None: no cap; ``"initial"``: the largest lr the optimizer has when :meth:`bind` is called) and at
    ``max_growth`` times that initial lr (None: no such cap; ``"auto"``: 1 around an optimizer that scales each
    parameter's step itself — one with an ``eps`` setting: Adam, AdamW, RMSprop, Adagrad, ... —, whose lr is a
    per-parameter step size already, 10 around any other, such as SGD); ×``shrink`` never takes the largest lr below
    ``min_fraction`` times that initial lr (None: no floor; at the floor a rejection ends the search); the lrs the
    iteration started with after a search that found nothing.

    Example::

        sizes = StepSize(shrink=0.5, grow=1.1, lr_max="initial"); sizes.bind(opt)
        sizes.shrink_lrs(opt)          # after a rejected trial
        sizes.grow_lrs(opt)            # after an accepted step
    """

    def __init__(self, shrink: float = 0.5, grow: float | str = 1.1, lr_max: float | str | None = None,
                 who: str = "StepSize", max_growth: float | str | None = None,
                 min_fraction: float | None = None) -> None:  # fmt: skip
        self.shrink = check_factor("shrink", shrink, who)
        if isinstance(grow, str) and grow != "auto":
            raise RewindValueError(f"{who}: grow must be a number >= 1 or 'auto', got {grow!r}.")
        self.grow_given: float | str = grow if grow == "auto" else check_number("grow", grow, who, lo=1.0)
        self.grow: float = 1.1 if grow == "auto" else float(grow)  # the factor in force ("auto" resolved by bind)
        self.lr_max_given = lr_max if lr_max == "initial" else _check_cap(lr_max, who)
        if max_growth is not None and max_growth != "auto":
            if isinstance(max_growth, str):
                raise RewindValueError(f"{who}: max_growth must be a number >= 1, 'auto' or None, got {max_growth!r}.")
            max_growth = check_number("max_growth", max_growth, who, lo=1.0)
        self.max_growth: float | str | None = max_growth  # as given ("auto" resolved by bind)
        self.growth: float | None = None if max_growth == "auto" or max_growth is None else float(max_growth)
        relative = lr_max == "initial" or max_growth is not None
        self.lr_max: float | None = None if relative else self.lr_max_given  # the cap in force
        self.min_fraction = None if min_fraction is None else check_number("min_fraction", min_fraction, who, lo=0.0,
                                                                           hi=1.0, lo_open=True)  # fmt: skip
        self.lr_min: float | None = None  # the floor in force (resolved by bind)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Resolve ``lr_max="initial"``, ``max_growth`` and ``grow`` against the optimizer (its largest lr now)."""
        top = max(lrs(optimizer))
        scaled = scales_each_step(optimizer)  # Adam & co.
        if self.max_growth == "auto":
            self.growth = 1.0 if scaled else 10.0
        if self.grow_given == "auto":
            self.grow = 10.0 if scaled else 1.1
        caps = [c for c in (top if self.lr_max_given == "initial" else self.lr_max_given,
                            None if self.growth is None else top * self.growth) if c is not None]  # fmt: skip
        self.lr_max = min(caps) if caps else None
        self.lr_min = None if self.min_fraction is None else top * self.min_fraction

    def can_shrink(self, optimizer: torch.optim.Optimizer) -> bool:
        """False when the largest lr is at the floor already: a rejection there ends the search."""
        return self.lr_min is None or max(lrs(optimizer)) > self.lr_min

    def shrink_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        factor = self.shrink
        if self.lr_min is not None:
            top = max(lrs(optimizer))
            factor = max(factor, self.lr_min / top) if top > 0 else factor
        scale_lrs(optimizer, factor)
        if self.lr_min is not None and max(lrs(optimizer)) < self.lr_min:  # an ulp below the floor: clamp
            top = max(lrs(optimizer))
            scale_lrs(optimizer, self.lr_min / top)

    def grow_lrs(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grow == 1.0:
            return
        factor = self.grow
        if self.lr_max is not None:
            top = max(lrs(optimizer))
            if top >= self.lr_max:
                return
            factor = min(factor, self.lr_max / top) if top > 0 else factor
        scale_lrs(optimizer, factor)
        if self.lr_max is not None and max(lrs(optimizer)) > self.lr_max:  # lr * (cap / lr) can overshoot by an ulp
            set_lrs(optimizer, [min(lr, self.lr_max) for lr in lrs(optimizer)])

    def reset(self, optimizer: torch.optim.Optimizer, start: Sequence[float]) -> None:
        """Back to the lrs the iteration started with (do not carry a collapsed lr into the next one)."""
        set_lrs(optimizer, start)

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"shrink": self.shrink, "grow": self.grow_given, "lr_max": self.lr_max_given,
                "max_growth": self.max_growth, "min_fraction": self.min_fraction}

    def state_dict(self) -> dict[str, Any]:
        """The cap and floor in force (``"initial"``, ``max_growth`` and ``min_fraction`` resolved when the search
        was built: a resumed search keeps the original run's cap and floor, not the lr it resumes with) and the
        settings."""
        return {**header(self, self.settings()), "lr_max": self.lr_max, "lr_min": self.lr_min}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        who = "StepSize.load_state_dict"
        sd = check_state(self, state_dict, self.settings(), ("lr_max",), strict, who)
        cap = _check_cap(sd["lr_max"], who)
        floor = _check_cap(sd.get("lr_min"), who, "lr_min")
        relative = self.lr_max_given == "initial" or self.max_growth is not None
        if strict or relative:  # strict=False with an explicit cap keeps that cap
            self.lr_max = cap
        if self.min_fraction is not None and (floor is not None or strict):
            self.lr_min = floor


def _check_cap(lr_max: Any, who: str, name: str = "lr_max") -> float | None:
    if lr_max is None:
        return None
    if not isinstance(lr_max, (int, float)) or isinstance(lr_max, bool):
        raise RewindTypeError(f"{who}: {name} must be a positive finite number, 'initial' or None, got {lr_max!r}.")
    return check_number(name, lr_max, who, lo=0.0, lo_open=True)
