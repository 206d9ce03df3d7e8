"""What the tuners share: one training iteration from a loss function or the user's own step, hyperparameter edits."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RewindTypeError, RewindValueError


def check_step_fns(loss_fn: Any, train_step: Any, who: str) -> None:
    if (loss_fn is None) == (train_step is None):
        raise RewindTypeError(
            f"{who}: give exactly one of loss_fn (batch -> loss; the tuner runs zero_grad, backward and the optimizer "
            "step) or train_step= (batch -> loss; your function runs the whole iteration itself)."
        )
    f = loss_fn if loss_fn is not None else train_step
    if not callable(f):
        raise RewindTypeError(f"{who}: {'loss_fn' if loss_fn is not None else 'train_step'} must be callable.")


def run_step(
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable[[Any], Any] | None,
    train_step: Callable[[Any], Any] | None,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """One training iteration on ``batch``; returns the loss as a float (nan if it was not finite)."""
    if train_step is not None:
        return to_float(train_step(batch))
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return to_float(loss)


def to_float(loss: Any) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise RewindValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}; reduce it (.mean()).")
        v = float(loss.detach().reshape(()).item())
    elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
        v = float(loss)
    else:
        raise RewindTypeError(f"the loss must be a scalar tensor or a float, got {type(loss).__name__}.")
    return v if math.isfinite(v) else math.nan


def set_hparam(optimizer: torch.optim.Optimizer, key: str, value: Any) -> None:
    """Set ``key`` in every param group (a tensor hyperparameter is filled in place, keeping it a tensor)."""
    for g in optimizer.param_groups:
        old = g.get(key)
        new = value(old) if callable(value) else value
        if isinstance(old, torch.Tensor) and not isinstance(new, torch.Tensor):
            old.fill_(new)
        else:
            g[key] = new


def hparam_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    """Keys every param group has (what a candidate may set)."""
    groups = optimizer.param_groups
    return set.intersection(*(set(g) for g in groups)) - {"params"} if groups else set()


def plain(v: Any) -> Any:
    """A JSON/log-friendly value: tensors become floats (or lists), tuples lists."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v
