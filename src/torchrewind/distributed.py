"""Agreement across ranks: every policy decision is taken from globally reduced numbers, so all ranks decide alike.

Under data parallelism each rank sees its own mini-batch and so its own loss. A guard that judged its local loss
could roll back on one rank and step on another, and the replicas would silently diverge. So the numbers a policy
decides on (the loss, the gradient norm, "are the parameters finite", a line search's trial loss and directional
derivative) are summed over the process group in one ``all_reduce`` per decision; every rank then holds the same
float64 values and makes the same decision. A NaN on one rank becomes a NaN on all of them.

Plain tensors are assumed replicated across the group (DDP); ``DTensor`` shards (FSDP2) are summed over the
group and divided by the number of replicas of each shard (its ``Replicate`` mesh dimensions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import RewindError, RewindTypeError, RewindValueError

AUTO = "auto"


def resolve_group(group: Any) -> Any:
    """``"auto"``: the default group when torch.distributed is initialized with more than one rank, else None.
    ``None``: no agreement (each rank decides alone). A ProcessGroup: that group."""
    if group is None:
        return None
    if isinstance(group, str):
        if group != AUTO:
            raise RewindValueError(f"group must be 'auto', None or a torch.distributed ProcessGroup, got {group!r}.")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise RewindError("group= was given but torch.distributed is not initialized; call init_process_group first.")
    if not isinstance(group, dist.ProcessGroup):
        raise RewindTypeError(
            f"group must be 'auto', None or a torch.distributed ProcessGroup, got {type(group).__name__}."
        )
    return group


def world_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_sum(group: Any, values: list[float]) -> list[float]:
    """Sum ``values`` over ``group`` in float64 (one collective); the identity without a group."""
    return _all_reduce(group, values, dist.ReduceOp.SUM) if group is not None else values


def all_min(group: Any, values: list[float]) -> list[float]:
    """Element-wise minimum of ``values`` over ``group`` (one collective); the identity without a group."""
    return _all_reduce(group, values, dist.ReduceOp.MIN) if group is not None else values


def _all_reduce(group: Any, values: list[float], op: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def broadcast_from(t: torch.Tensor, group_rank: int, group: Any) -> None:
    """Broadcast ``t`` in place from the rank that is ``group_rank`` within ``group``."""
    dist.broadcast(t, src=dist.get_global_rank(group, group_rank), group=group)


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size (0, 1 when torch.distributed is not initialized)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def like(template: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a plain tensor holding this rank's part) as a tensor like ``template``: a DTensor with its mesh,
    placements and global shape when ``template`` is one (FSDP2), else ``t`` itself."""
    if not _is_dtensor(template):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        t.to(template.device), template.device_mesh, template.placements, run_check=False, shape=template.shape,
        stride=template.stride(),
    )  # fmt: skip


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), without an autograd node: in-place copies into it
    write the DTensor's storage (for FSDP2, the sharded storage its all-gathers read)."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def replicas(t: torch.Tensor, group: Any) -> int:
    """How many ranks of ``group`` hold the same values as this rank's (local part of) ``t``."""
    if _is_dtensor(t):
        mesh = t.device_mesh
        n = 1
        for dim, placement in enumerate(t.placements):
            if placement.is_replicate():
                n *= mesh.size(dim)
        return n
    return world_size(group)  # a plain tensor: replicated across the group (DDP)


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)
