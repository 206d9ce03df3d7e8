"""Policies built on exact undo: guards against non-finite values and loss spikes, and step-size search."""

from .guards import NonFiniteGuard, SpikeDetector, SpikeGuard
from .linesearch import BoldDriver, LineSearch

__all__ = ["BoldDriver", "LineSearch", "NonFiniteGuard", "SpikeDetector", "SpikeGuard"]
