"""The determinism report: how far two runs of the same iteration, from the same exact state, differ — per quantity.

It quantifies nondeterministic kernels (atomics in scatter/index_add backward, some cuDNN/cuBLAS algorithms, ...):
on CPU with torch's default kernels every difference is 0; on a GPU the largest relative difference tells what
``tolerance`` a fault triage needs so that nondeterminism is not taken for a transient fault.

Example::

    report = DeterminismReport()
    report.record("loss", 2.3125, 2.3125001)
    print(report.summary())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .._checks import check_choice, check_type
from ..distributed import local
from ..errors import RewindValueError
from ._common import grads
from .outcome import as_int_bits, rel_diff, same_number

QUANTITIES = ("loss", "grad_norm", "grads")
_FIELDS = ("runs", "identical", "max_abs", "max_rel")


class DeterminismReport:
    """Per quantity (``loss``: this rank's loss; ``grad_norm``: the global gradient norm; ``grads``: every gradient
    element), over the reruns recorded: how many, how many were bitwise identical, the largest absolute and the
    largest relative difference. Under torch.distributed the numbers are the maximum over ranks.

    Example::

        triage = FaultTriage(rw, report_every=100)      # rerun every 100th iteration
        ...; print(triage.determinism.summary())
    """

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {q: _empty() for q in QUANTITIES}

    def record(self, quantity: str, a: float, b: float) -> None:
        """Record the two values of a scalar quantity."""
        check_choice("quantity", quantity, QUANTITIES, "DeterminismReport.record")
        diff = abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if same_number(a, b) else math.inf)
        self.record_diff(quantity, same_number(a, b), diff, rel_diff(a, b))

    def record_diff(self, quantity: str, identical: bool, max_abs: float, max_rel: float) -> None:
        """Record one rerun's comparison of ``quantity`` (already reduced, e.g. over ranks)."""
        s = self.stats[quantity]
        s["runs"] += 1
        s["identical"] += int(identical)
        s["max_abs"] = max(s["max_abs"], max_abs)
        s["max_rel"] = max(s["max_rel"], max_rel)

    @property
    def max_rel(self) -> float:
        """The largest relative difference of any quantity (a lower bound for a triage's ``tolerance``)."""
        return max(s["max_rel"] for s in self.stats.values())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {q: dict(s) for q, s in self.stats.items()}

    def summary(self) -> str:
        """A table: quantity, reruns, bitwise identical, largest absolute and relative difference."""
        rows = ["| quantity | reruns | bitwise identical | max abs diff | max rel diff |", "|---|---|---|---|---|"]
        for q, s in self.stats.items():
            rows.append(f"| {q} | {s['runs']} | {s['identical']} | {s['max_abs']:.3g} | {s['max_rel']:.3g} |")
        return "\n".join(rows)

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.as_dict()}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        who = "DeterminismReport.load_state_dict"
        check_type("state_dict", state_dict, Mapping, who, "a dict returned by DeterminismReport.state_dict()")
        stats = state_dict.get("stats")
        if not isinstance(stats, Mapping) or set(stats) != set(QUANTITIES):
            raise RewindValueError(f"{who}: 'stats' must have the quantities {QUANTITIES}.")
        for q in QUANTITIES:
            s = stats[q]
            if not isinstance(s, Mapping) or set(s) != set(_FIELDS):
                raise RewindValueError(f"{who}: stats[{q!r}] must have {_FIELDS}, got {s!r}.")
        self.stats = {q: {k: stats[q][k] for k in _FIELDS} for q in QUANTITIES}


def _empty() -> dict[str, Any]:
    return {"runs": 0, "identical": 0, "max_abs": 0.0, "max_rel": 0.0}


def copy_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """A copy of every (local) gradient, to compare with a rerun's (the report's ``grads`` quantity)."""
    return [local(g).detach().clone() for g in grads(optimizer)]


def compare_grads(before: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[bool, float, float]:
    """(bitwise identical, largest |difference|, that relative to the largest |gradient|) between ``before`` and the
    gradients now in ``.grad``."""
    now = [local(g).detach() for g in grads(optimizer)]
    if len(now) != len(before) or any(a.shape != b.shape for a, b in zip(now, before)):
        return False, math.inf, math.inf
    if not now:
        return True, 0.0, 0.0
    same = all(torch.equal(as_int_bits(a), as_int_bits(b)) for a, b in zip(now, before))
    if same:
        return True, 0.0, 0.0
    dense = [(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b) for a, b in zip(now, before)]
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in dense if a.numel())
    scale = max(float(a.double().abs().max()) for a, _ in dense if a.numel())
    if math.isnan(diff):
        diff = math.inf
    return False, diff, (diff / scale if scale > 0 and math.isfinite(scale) else math.inf)
