"""Policies built on exact undo: guards against non-finite values and loss spikes, and step-size search.

One concept per module: ``guard`` (the :class:`Guard` base, its :class:`Decision` and the driver that carries it
out), ``nonfinite`` and ``spike`` (the two guards), ``detector`` (:class:`SpikeDetector`), ``buffers``
(:class:`BufferWatch`), ``cooldown`` (:class:`LrCooldown`), ``budget`` (:class:`RollbackBudget`), ``linesearch``
(the backtracking engine, LineSearch, BoldDriver), ``acceptance`` (their acceptance rules), ``stepsize`` (their lr
schedule), ``lr`` (lr edits);
``triage`` (:class:`FaultTriage`: a transient machine fault or bad data, by exact rerun), ``outcome`` (what a run
produced, compared bit for bit), ``quarantine`` (:class:`Quarantine`), ``determinism`` (:class:`DeterminismReport`),
``inject`` (:class:`FaultInjector`, for tests and demos).
"""

from .acceptance import Armijo, NoIncrease
from .budget import RollbackBudget
from .buffers import BufferWatch
from .cooldown import LrCooldown
from .detector import SpikeDetector
from .determinism import DeterminismReport
from .guard import Decision, Guard
from .inject import FaultInjector
from .linesearch import Backtracking, BoldDriver, LineSearch
from .nonfinite import NonFiniteGuard
from .outcome import Outcome
from .quarantine import Quarantine
from .spike import SpikeGuard
from .stepsize import StepSize
from .triage import FaultTriage, ReproducibleFaultError, TriageError, UnreliableDeviceError

__all__ = [
    "Armijo",
    "Backtracking",
    "BoldDriver",
    "BufferWatch",
    "Decision",
    "DeterminismReport",
    "FaultInjector",
    "FaultTriage",
    "Guard",
    "LineSearch",
    "LrCooldown",
    "NoIncrease",
    "NonFiniteGuard",
    "Outcome",
    "Quarantine",
    "ReproducibleFaultError",
    "RollbackBudget",
    "SpikeDetector",
    "SpikeGuard",
    "StepSize",
    "TriageError",
    "UnreliableDeviceError",
]
