"""Argument checks shared by the framework callbacks (validated at construction, not after a long setup)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .._checks import check_choice, check_optional_int
from ..errors import RewindError, RewindTypeError, RewindValueError
from ..policies import NonFiniteGuard
from ..rewind import Rewind
from ..trajectory import Trajectory

DEFAULT_ROLLBACK = 1  # each history slot is a full copy of parameters + optimizer state: keep large runs affordable


def check_rewind_args(name: str, capacity: Any, rewind_kwargs: Any, own: tuple[str, ...]) -> None:
    check_optional_int("capacity", capacity, 1, name)
    if not isinstance(rewind_kwargs, (dict, type(None))):
        raise RewindTypeError(f"{name}: rewind_kwargs must be a dict, got {type(rewind_kwargs).__name__}.")
    for key in own:
        if key in (rewind_kwargs or {}):
            raise RewindValueError(f"{name}: rewind_kwargs cannot set {key!r}; the callback sets it.")


def history_capacity(name: str, framework: str, guard: Any, capacity: int | None, guard_kwargs: dict) -> int:
    """The Rewind's capacity; for ``"spike"`` also sets ``guard_kwargs["rollback"]``. The step the framework just
    took occupies one history slot, so a roll-back of ``rollback`` steps needs ``capacity >= rollback + 1``."""
    if guard != "spike":
        return 1 if capacity is None else capacity
    rollback = guard_kwargs.get("rollback")
    if rollback is None:
        rollback = DEFAULT_ROLLBACK if capacity is None else capacity - 1
    if not isinstance(rollback, int) or isinstance(rollback, bool) or rollback < 1:
        raise (RewindValueError if isinstance(rollback, int) else RewindTypeError)(
            f"{name}('spike'): rollback must be an int >= 1, got {rollback!r} (capacity={capacity}: with {framework} "
            "the just-taken step occupies one history slot, so capacity must be >= rollback + 1 >= 2)."
        )
    if capacity is None:
        capacity = rollback + 1
    elif capacity < rollback + 1:
        raise RewindValueError(
            f"{name}('spike'): capacity={capacity} is too small for rollback={rollback}: the step {framework} just "
            f"took occupies one history slot; use capacity >= {rollback + 1}."
        )
    guard_kwargs["rollback"] = rollback
    return capacity


def check_guard_kwargs(
    name: str, cls: type[NonFiniteGuard], capacity: int, rng: bool | str, guard_kwargs: dict[str, Any]
) -> None:
    """Build the guard once on a throwaway Rewind: unknown names and bad values fail now, not after a long setup."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "rewind", "log"}
    unknown = sorted(set(guard_kwargs) - accepted)
    if unknown:
        raise RewindTypeError(f"{name}: {cls.__name__} has no option(s) {unknown}; valid: {sorted(accepted)}.")
    check_choice("rng", rng, (True, False, "all"), name)
    p = torch.zeros(1, requires_grad=True)
    rw = Rewind(None, torch.optim.SGD([p], lr=0.1), capacity=capacity, rng=False)
    try:
        cls(rw, **guard_kwargs).close()
    finally:
        rw.close()


def init_state(cb: Any, capacity: int, rng: bool | str, log: Trajectory | None, rewind_kwargs: Any,
               guard_kwargs: dict[str, Any]) -> None:  # fmt: skip
    """The attributes every callback has: its settings, the decision log, and the objects built at train start."""
    cb.capacity, cb.rng = capacity, rng
    cb.rewind_kwargs = dict(rewind_kwargs or {})
    cb.guard_kwargs = guard_kwargs
    cb.log = log if log is not None else Trajectory()
    cb.rewind = None  # Rewind, built when training starts
    cb.guard = None  # NonFiniteGuard / SpikeGuard, built when training starts
    cb.last_step_stood = None
    cb._optimizer = None
