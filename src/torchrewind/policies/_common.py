"""Helpers shared by the policies: the loss as a number, the global gradient norm, agreement across ranks, and the
argument checks every policy makes."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_number
from ..distributed import all_sum, local, replicas, world_size
from ..errors import RewindTypeError, RewindValueError
from ..rewind import Rewind


def loss_value(loss: object, who: str) -> float:
    """The Python float of a scalar loss (one device sync), or a clear error."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise RewindValueError(
                f"{who}: the loss must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it (e.g. .mean())."
            )
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise RewindTypeError(f"{who}: the loss must be a scalar tensor or a float, got {type(loss).__name__}.")


def scales_each_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer scales each parameter's step itself (Adam, AdamW, RMSprop, Adagrad, ...: one with an
    ``eps`` setting), so its lr is a per-parameter step size already; SGD's is not. The searches' ``"auto"`` settings
    are resolved by it."""
    return "eps" in optimizer.defaults


def grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def grad_sq(optimizer: torch.optim.Optimizer, group: Any = None) -> float:
    """This rank's share of the global squared L2 norm of all gradients: summed over ``group`` it is the global
    squared norm (DTensor shards count once per replica set, plain tensors are taken as replicated across the
    group). inf or nan if any gradient is. One sync per device."""
    gs = grads(optimizer)
    if not gs:
        return 0.0
    locs = [local(g) for g in gs]
    locs = [g.coalesce().values() if g.is_sparse else g for g in locs]
    norms = torch._foreach_norm(locs, 2, dtype=torch.float32)  # fp16/bf16 grads would overflow in their dtype
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    weights: dict[torch.device, list[float]] = {}
    for g, n in zip(gs, norms):
        by_device.setdefault(n.device, []).append(n)
        weights.setdefault(n.device, []).append(1.0 / replicas(g, group) if group is not None else 1.0)
    total = 0.0
    for dev, v in by_device.items():
        # squares in float64: float32 squares of norms near 1e20 would overflow
        sq = torch.stack(v).double().square()
        w = weights[dev]
        if any(x != 1.0 for x in w):
            sq = sq * torch.tensor(w, dtype=torch.float64, device=dev)
        total += float(sq.sum())
    return total


def agreed_loss(rw: Rewind, loss: object, who: str, extra: tuple[float, ...] = ()) -> tuple[float, ...]:
    """The loss averaged over the Rewind's process group, and ``extra`` summed, in one collective (the local values
    without a group): every rank then takes the same decision."""
    v = loss_value(loss, who)
    group = rw.group
    if group is None:
        return (v, *extra)
    return tuple(all_sum(group, [v / world_size(group), *extra]))


def check_rewind(rw: object, who: str, need: int = 1) -> Rewind:
    if not isinstance(rw, Rewind):
        raise RewindTypeError(f"{who} needs a torchrewind.Rewind as its first argument, got {type(rw).__name__}.")
    if rw.capacity < need:
        raise RewindValueError(
            f"{who} needs a history of at least {need} step(s) but the Rewind has capacity={rw.capacity}; "
            f"build it with Rewind(..., capacity={need}) or more."
        )
    return rw


def check_factor(name: str, value: Any, who: str, *, one: bool = False) -> float:
    """A factor in (0, 1) — or in (0, 1] with ``one=True``, where 1 means "leave it as it is"."""
    return check_number(name, value, who, lo=0.0, hi=1.0, lo_open=True, hi_open=not one)
