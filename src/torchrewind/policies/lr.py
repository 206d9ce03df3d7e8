"""Learning-rate edits the policies make: read, scale and set every param group's lr, and scale them for one step
that someone else takes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def lrs(optimizer: torch.optim.Optimizer) -> tuple[float, ...]:
    """The learning rate of every param group, as Python floats."""
    return tuple(float(g["lr"]) for g in optimizer.param_groups)


def scale_lrs(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every group's lr by ``factor`` (tensor lrs in place, keeping them tensors)."""
    for g in optimizer.param_groups:
        lr = g["lr"]
        if isinstance(lr, torch.Tensor):
            lr.mul_(factor)
        else:
            g["lr"] = lr * factor


def set_lrs(optimizer: torch.optim.Optimizer, values: Iterable[float]) -> None:
    """Set every group's lr (tensor lrs filled in place)."""
    for g, v in zip(optimizer.param_groups, values):
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(v)
        else:
            g["lr"] = v


class OneStepLrScale:
    """Scales every lr for the next optimizer step only, for a step someone else takes (a framework): the lrs are put
    back by a step post-hook right after that step, before anything else reads them (e.g. an LR scheduler).

    Example::

        scaled = OneStepLrScale(opt)
        scaled.apply(0.5); opt.step()        # this step at half the lrs; param_groups are back afterwards
        scaled.close()                       # removes the hook
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.scale = 1.0  # the factor the coming step is taken with
        self.used: tuple[float, ...] | None = None  # the lrs the coming step is taken with
        self._saved: tuple[float, ...] | None = None
        self._hook: Any = None

    def apply(self, scale: float) -> None:
        if scale != 1.0:
            base = lrs(self.optimizer)
            scale_lrs(self.optimizer, scale)
            self._saved = base
            if self._hook is None:
                self._hook = self.optimizer.register_step_post_hook(self.restore)
        self.used = lrs(self.optimizer)
        self.scale = scale

    def restore(self, *_: Any) -> None:
        """Put the lrs back now if they are still scaled (the step raised, or never ran)."""
        if self._saved is not None:
            set_lrs(self.optimizer, self._saved)
            self._saved = None

    def close(self) -> None:
        self.restore()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
