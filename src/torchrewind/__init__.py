"""torchrewind: exact, fast undo/redo of a whole PyTorch training state.

Example::

    from torchrewind import Rewind
    rw = Rewind(model, optimizer, schedulers=[sched], capacity=8)
    optimizer.step(); rw.undo()        # bit-for-bit back to before the step
"""

from .errors import RewindError
from .policies import (
    BoldDriver,
    DeterminismReport,
    FaultInjector,
    FaultTriage,
    LineSearch,
    NonFiniteGuard,
    Quarantine,
    ReproducibleFaultError,
    SpikeDetector,
    SpikeGuard,
    TriageError,
    UnreliableDeviceError,
)
from .rewind import Rewind, Trial
from .skipping import SkippableIterator
from .tiers import DiskCheckpoints, HostArchive, Tiers
from .trajectory import Event, Trajectory
from .tuners import BatchSizeResult, BranchAndPick, LRFindResult, find_batch_size, lr_find

__all__ = [
    "BatchSizeResult",
    "BoldDriver",
    "BranchAndPick",
    "DeterminismReport",
    "DiskCheckpoints",
    "Event",
    "FaultInjector",
    "FaultTriage",
    "HostArchive",
    "LRFindResult",
    "LineSearch",
    "NonFiniteGuard",
    "Quarantine",
    "ReproducibleFaultError",
    "Rewind",
    "RewindError",
    "SkippableIterator",
    "SpikeDetector",
    "SpikeGuard",
    "Tiers",
    "Trajectory",
    "TriageError",
    "Trial",
    "UnreliableDeviceError",
    "find_batch_size",
    "lr_find",
]
__version__ = "0.1.0"
