"""What the framework callbacks of :class:`~torchrewind.FaultTriage` share: checking its options when the callback is
built (a typo fails before a long setup) and building it on the Rewind made when training starts."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .._checks import check_choice, check_type
from ..errors import RewindTypeError, RewindValueError
from ..policies import FaultTriage, Quarantine
from ..rewind import Rewind

# FaultTriage options a callback does not take: the Rewind and the guard are the callback's (a guard steps itself,
# which a framework's loop does not let it do)
NOT_FOR_CALLBACKS = ("self", "rewind", "guard")
OWN_REWIND_ARGS = ("model", "optimizer", "schedulers", "scaler", "capacity", "rng")


def check_triage_kwargs(name: str, triage_kwargs: dict[str, Any], rewind_kwargs: dict[str, Any]) -> None:
    """Unknown or misspelled options, a value FaultTriage refuses, ``on_reproducible="rollback"`` (needs a guard,
    which steps itself) and Rewind options the callback sets: refused now, with the reason."""
    accepted = set(inspect.signature(FaultTriage.__init__).parameters) - set(NOT_FOR_CALLBACKS)
    unknown = sorted(set(triage_kwargs) - accepted)
    if unknown:
        raise RewindTypeError(f"{name}: FaultTriage has no option(s) {unknown}; valid: {sorted(accepted)}.")
    if triage_kwargs.get("on_reproducible") == "rollback":
        raise RewindValueError(
            f"{name}: on_reproducible='rollback' needs a guard that takes the steps, which a framework's loop does; "
            "use 'skip' or 'raise'."
        )
    for key in OWN_REWIND_ARGS:
        if key in rewind_kwargs:
            raise RewindValueError(f"{name}: rewind_kwargs cannot set {key!r}; the callback sets it.")
    # build it once on a throwaway Rewind: bad values fail with FaultTriage's own message (without reading a
    # quarantine file: only its type is checked here)
    q = triage_kwargs.get("quarantine")
    probe = dict(triage_kwargs)
    if isinstance(q, str) or hasattr(q, "__fspath__"):
        probe["quarantine"] = Quarantine()  # a path: fine; anything else FaultTriage refuses below
    p = torch.zeros(1, requires_grad=True)
    rw = Rewind(None, torch.optim.SGD([p], lr=0.1), rng=False)
    try:
        FaultTriage(rw, **probe)
    finally:
        rw.close()


def check_callback_args(
    name: str,
    batch_id: Any,
    batch_id_form: str,
    rng: Any,
    rewind_kwargs: dict[str, Any] | None,
    triage_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The checks both callbacks run on their arguments; returns ``triage_kwargs`` with a quarantine path replaced by
    its :class:`Quarantine` (the file is read once, here: resumed fits keep adding to it)."""
    if batch_id is not None and not callable(batch_id):
        raise RewindTypeError(f"{name}: batch_id must be a function {batch_id_form} -> id, got {batch_id!r}.")
    check_choice("rng", rng, (True, False, "all"), name)
    check_type("rewind_kwargs", rewind_kwargs, (dict, type(None)), name, "a dict")
    check_triage_kwargs(name, triage_kwargs, rewind_kwargs or {})
    q = triage_kwargs.get("quarantine")
    if q is not None and not isinstance(q, Quarantine):
        triage_kwargs = {**triage_kwargs, "quarantine": Quarantine(os.fspath(q))}
    return triage_kwargs


def build_triage(rewind: Rewind, triage_kwargs: dict[str, Any]) -> FaultTriage:
    return FaultTriage(rewind, **triage_kwargs)
