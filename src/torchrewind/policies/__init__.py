"""Policies built on exact undo: guards against non-finite values and loss spikes, and step-size search.

One concept per module: ``guard`` (the :class:`Guard` base, its :class:`Decision` and the driver that carries it
out), ``nonfinite`` and ``spike`` (the two guards), ``detector`` (:class:`SpikeDetector`), ``cooldown``
(:class:`LrCooldown`), ``budget`` (:class:`RollbackBudget`), ``linesearch`` (the backtracking engine, LineSearch,
BoldDriver), ``acceptance`` (their acceptance rules), ``stepsize`` (their lr schedule), ``lr`` (lr edits).
"""

from .acceptance import Armijo, NoIncrease
from .budget import RollbackBudget
from .cooldown import LrCooldown
from .detector import SpikeDetector
from .guard import Decision, Guard
from .linesearch import Backtracking, BoldDriver, LineSearch
from .nonfinite import NonFiniteGuard
from .spike import SpikeGuard
from .stepsize import StepSize

__all__ = [
    "Armijo",
    "Backtracking",
    "BoldDriver",
    "Decision",
    "Guard",
    "LineSearch",
    "LrCooldown",
    "NoIncrease",
    "NonFiniteGuard",
    "RollbackBudget",
    "SpikeDetector",
    "SpikeGuard",
    "StepSize",
]
