"""What one run of a training iteration produced — its loss, gradient norm and gradient checksum on this rank — and
whether two runs of the same iteration agree: the evidence fault triage compares.

All three are *local* (this rank's): the loss before it is averaged over ranks, this rank's share of the squared
gradient norm, and the bits of this rank's gradient tensors. Under DDP the gradients are already all-reduced, so a
rank whose local loss did not reproduce is the one that computed something else; a gradient difference alone shows on
every rank.

Example::

    first = Outcome.of(loss, optimizer, checksum=True)
    ...  # restore the iteration's start, run it again
    second = Outcome.of(loss2, optimizer, checksum=True)
    first.differs(second)          # (loss differs, gradients differ)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from ..distributed import local
from ._common import grad_sq, grads, loss_value

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_int_bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as a signed integer tensor of the same element size (a view when ``t`` is contiguous).
    Complex tensors are viewed as their real and imaginary parts first."""
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if not t.is_contiguous():
        t = t.contiguous()
    return t.view(_INT[t.element_size()])


def grad_checksum(optimizer: torch.optim.Optimizer) -> int:
    """A checksum of the bits of every (local) gradient: the integer sum of each gradient's bit patterns, weighted
    by its position. Integer sums do not depend on summation order, so two runs that computed the same bits give
    the same checksum on any device; one flipped bit changes it. One device sync."""
    sums = []
    for g in grads(optimizer):
        g = local(g)
        g = g.coalesce().values() if g.is_sparse else g
        sums.append(as_int_bits(g.detach()).sum(dtype=torch.int64).cpu())
    if not sums:
        return 0
    total = 0
    for i, s in enumerate(torch.stack(sums).tolist()):
        total = (total + (i + 1) * s) % (1 << 64)
    return total


@dataclass(frozen=True)
class Outcome:
    """This rank's result of one run of an iteration: ``loss`` (local, before averaging over ranks), ``grad_sq``
    (this rank's share of the squared global gradient norm; None when not measured) and ``checksum`` (of the local
    gradients' bits; None when not computed)."""

    loss: float
    grad_sq: float | None = None
    checksum: int | None = None

    @classmethod
    def of(
        cls, loss: object, optimizer: torch.optim.Optimizer, group: object = None, *, grad_norm: bool = True,
        checksum: bool = False, who: str = "",
    ) -> Outcome:  # fmt: skip
        """Measure a run: the loss (a scalar tensor or a float), the gradients now in ``.grad``."""
        return cls(
            loss_value(loss, who),
            grad_sq(optimizer, group) if grad_norm else None,
            grad_checksum(optimizer) if checksum else None,
        )

    def with_checksum(self, optimizer: torch.optim.Optimizer) -> Outcome:
        """The same outcome with the checksum of the gradients now in ``.grad`` (which must be this run's)."""
        return Outcome(self.loss, self.grad_sq, grad_checksum(optimizer))

    def differs(self, other: Outcome, tolerance: float = 0.0) -> tuple[bool, bool]:
        """(the loss differs, the gradients differ) between two runs. ``tolerance`` 0: bit for bit (NaN equals NaN,
        whatever its payload); > 0: a relative difference up to ``tolerance`` counts as equal, and the checksum
        (bits only) is not compared."""
        loss = not same_number(self.loss, other.loss, tolerance)
        g = False
        if self.grad_sq is not None and other.grad_sq is not None:
            g = not same_number(self.grad_sq, other.grad_sq, tolerance)
        if tolerance == 0.0 and self.checksum is not None and other.checksum is not None:
            g = g or self.checksum != other.checksum
        return loss, g


def same_number(a: float, b: float, tolerance: float = 0.0) -> bool:
    """Bitwise equality of two floats (NaN equals NaN; 0.0 and -0.0 differ), or within a relative ``tolerance``."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if struct.pack("<d", a) == struct.pack("<d", b):
        return True
    if tolerance > 0.0 and math.isfinite(a) and math.isfinite(b):
        return abs(a - b) <= tolerance * max(abs(a), abs(b))
    return False


def rel_diff(a: float, b: float) -> float:
    """|a − b| / max(|a|, |b|) (0 for equal values, inf when only one is finite, 0 for two NaNs)."""
    if same_number(a, b):
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))
