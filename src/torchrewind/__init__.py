"""torchrewind: exact, fast undo/redo of a whole PyTorch training state.

Example::

    from torchrewind import Rewind
    rw = Rewind(model, optimizer, schedulers=[sched], capacity=8)
    optimizer.step(); rw.undo()        # bit-for-bit back to before the step
"""

from .errors import RewindError
from .rewind import Rewind, Trial

__all__ = ["Rewind", "RewindError", "Trial"]
__version__ = "0.1.0"
