"""A Rewind's settings, validated together: each type and value checked, and settings that cannot be combined
rejected here, in one place, before anything is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_bool, check_choice, check_int, check_optional_int, check_type
from ..errors import RewindTypeError, RewindValueError


@dataclass(frozen=True)
class Config:
    """What the user asked for. The live ring size is :attr:`Rewind.capacity` (a memory budget can lower it)."""

    capacity: int
    rng: bool | str
    grads: bool
    redo: bool
    auto: bool
    max_bytes: int | None
    verify: bool
    overlap: bool
    storage: str
    shard: bool
    generators: tuple[torch.Generator, ...]

    @staticmethod
    def check(
        *,
        optimizer: Any,
        capacity: Any,
        rng: Any,
        grads: Any,
        redo: Any,
        auto: Any,
        max_bytes: Any,
        verify: Any,
        overlap: Any,
        storage: Any,
        shard: Any,
        generators: Sequence[Any],
        tiers: Any,
        group: Any,
    ) -> Config:
        """Validate every setting (``group`` already resolved); raise RewindTypeError / RewindValueError."""
        who = "Rewind"
        check_type("optimizer", optimizer, torch.optim.Optimizer, who, "a torch.optim.Optimizer")
        for name, v in (("shard", shard), ("overlap", overlap), ("grads", grads), ("redo", redo), ("auto", auto),
                        ("verify", verify)):  # fmt: skip
            check_bool(name, v, who)
        check_choice("storage", storage, ("device", "host"), who)
        check_choice("rng", rng, (True, False, "all"), who)
        for g in generators:
            if not isinstance(g, torch.Generator):
                raise RewindTypeError(f"Rewind: generators must be torch.Generator objects, got {type(g).__name__}.")
        if tiers is not None:
            from ..tiers import Tiers

            check_type("tiers", tiers, Tiers, who, "a torchrewind.Tiers")
            if capacity != 1 and capacity != tiers.device:
                raise RewindValueError(
                    f"capacity={capacity} and tiers.device={tiers.device} disagree; give the device tier's size once."
                )
            capacity = tiers.device
        check_int("capacity", capacity, 1, who, " It is the number of steps that can be undone.")
        check_optional_int("max_bytes", max_bytes, 0, who)
        if shard:
            if group is None:
                raise RewindValueError(
                    "shard=True splits snapshots across the ranks of a process group, but there is none: initialize "
                    "torch.distributed with more than one rank (or pass group=), or use shard=False."
                )
            if overlap:
                raise RewindValueError("shard=True cannot be combined with overlap=True; choose one.")
            if any(type(p).__name__ == "DTensor" for g in optimizer.param_groups for p in g["params"]):
                raise RewindValueError(
                    "shard=True is for replicated state (DDP); these parameters are DTensors (FSDP2), whose "
                    "snapshots are already per-rank shards. Use shard=False."
                )
        return Config(capacity, rng, grads, redo, auto, max_bytes, verify, overlap, storage, shard, tuple(generators))
