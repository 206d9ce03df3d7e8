"""Tuners that leave no trace: an LR range test, a batch-size search and branch-and-pick, on top of Rewind.

Example::

    from torchrewind import lr_find
    res = lr_find(model, opt, loss_fn, loader)     # training state afterwards: bitwise as before
    opt.param_groups[0]["lr"] = res.suggestion
"""

from .batch_size import BatchSizeResult, BatchTrial, find_batch_size
from .branch import BranchAndPick, BranchRound, scaled
from .hold import StateHold
from .lr_find import LRFindResult, LRSweep, lr_find

__all__ = [
    "BatchSizeResult",
    "BatchTrial",
    "BranchAndPick",
    "BranchRound",
    "LRFindResult",
    "LRSweep",
    "StateHold",
    "find_batch_size",
    "lr_find",
    "scaled",
]
