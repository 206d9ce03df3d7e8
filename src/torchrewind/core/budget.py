"""The device history's memory budget (``Rewind(max_bytes=...)``): a pure rule, and the answer Rewind applies.

A slot holds everything one snapshot copies: the arena bytes (1/world of them with ``shard=True``), tensors copied
one by one (views, tied storage, subclasses, FSDP2 shards), tensors and Python values held by value (LBFGS's history
lists, ``None`` momentum buffers, ...) and, with ``grads=True``, the gradients. The tracker measures that at every
scan, before it moves anything, and asks :meth:`Budget.admit`; a refusal leaves the training state untouched.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from ..errors import RewindValueError


def points_that_fit(max_bytes: int, per_slot: int, capacity: int, extra_slots: int) -> int:
    """How many undo points fit in ``max_bytes`` when each slot costs ``per_slot`` bytes and ``extra_slots`` slots
    come on top of the undo points (redo's slot, overlap's staging slot). ``capacity`` if all of them fit."""
    if per_slot <= 0 or per_slot * (capacity + extra_slots) <= max_bytes:
        return capacity
    return max_bytes // per_slot - extra_slots


def value_nbytes(v: Any) -> int:
    """Bytes a by-value copy of ``v`` holds: tensors' data, Python objects' own size; containers walked."""
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple, set, frozenset)):
        return sys.getsizeof(v) + sum(value_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sys.getsizeof(v) + sum(value_nbytes(x) for x in v.values())
    return sys.getsizeof(v)


class Budget:
    """``max_bytes`` for the device history, with the ring's shape kept up to date by the Rewind. When a history
    does not fit: with a lower tier to fall back on, the answer is "keep fewer device points" (``shrink_to``, applied
    by the Rewind after the record in progress); without one, :class:`~torchrewind.errors.RewindValueError`."""

    def __init__(self, max_bytes: int | None, *, can_shrink: bool) -> None:
        self.max_bytes = max_bytes
        self.can_shrink = can_shrink
        self.capacity = 1  # undo points of the ring
        self.extra_slots = 0  # slots on top of them
        self.redo_slot = False  # one of the extra slots is redo's (redo=False would save it)
        self.shrink_to: int | None = None  # the pending answer: keep this many device points
        self.world = 1  # shard=True: each rank keeps 1/world of the arena bytes
        self.grads = False  # grads=True: every slot also holds the gradients
        self.fixed = 0  # RNG states, hyperparameters, schedulers' and the scaler's state: measured once

    def slot_bytes(self, arena: int, loose: int, params: int) -> int:
        """One slot's bytes from the state's arena bytes, its loose (one-by-one and by-value) bytes, and the
        parameters' bytes (the size of their gradients)."""
        return -(-arena // self.world) + loose + (params if self.grads else 0) + self.fixed

    def admit(self, per_slot: int) -> None:
        """Accept a history whose slots cost ``per_slot`` bytes each, or decide to shrink, or refuse."""
        if self.max_bytes is None:
            return
        fit = points_that_fit(self.max_bytes, per_slot, self.capacity, self.extra_slots)
        if fit >= self.capacity:
            return
        nslots = self.capacity + self.extra_slots
        need = per_slot * nslots
        if self.can_shrink and fit >= 1:
            warnings.warn(
                f"torchrewind: the history would need {need:,} bytes, over max_bytes={self.max_bytes:,}: the device "
                f"tier keeps {fit} undo point(s) instead of {self.capacity}; older points are reachable in the host "
                "tier with rollback_to().",
                RuntimeWarning,
                stacklevel=4,
            )
            self.shrink_to = fit
            return
        raise RewindValueError(
            f"history would need {need:,} bytes ({nslots} snapshots x {per_slot:,} bytes), over "
            f"max_bytes={self.max_bytes:,}. Lower capacity (at most {max(fit, 0)} fits"
            + (", or pass redo=False to save one snapshot" if self.redo_slot else "")
            + ") or raise max_bytes."
        )
