"""Storage tiers below the device ring: the host archive (:mod:`.archive`, compressed with :mod:`.codec`) and disk
checkpoints (:mod:`.disk`, written from plain state_dicts: :mod:`.state`); :class:`Tiers` says how many undo points
live where, hands each recorded point down, and finds the newest point at or before a step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._checks import check_int, check_type
from ..distributed import all_min
from ..errors import RewindError, RewindTypeError
from .archive import HostArchive, arena_segments
from .disk import Checkpoint, DiskCheckpoints, copy_images, restore_plan


@dataclass(frozen=True)
class Found:
    """Where :meth:`Tiers.find` found the newest point: ``source`` is ``"live"`` (nothing to restore), ``"ring"``
    (``handle``: the ring point), ``"host"`` (``handle``: the archive record) or ``"disk"`` (``handle``: None)."""

    step: int
    source: str
    handle: Any = None


@dataclass(frozen=True)
class Tiers:
    """Where the history lives: the last ``device`` points as full copies next to the training state (undo/redo at
    memcpy speed), older points in host RAM (``host``: a :class:`HostArchive`, lossless compressed deltas by
    default), and periodic checkpoints on disk (``disk``: a :class:`DiskCheckpoints`). :meth:`Rewind.rollback_to`
    searches all of them.

    Example::

        tiers = Tiers(device=2, host=HostArchive(keep=32), disk=DiskCheckpoints("ckpt", every=50, keep_last=10))
        rw = Rewind(model, opt, tiers=tiers)
        rw.rollback_to(rw.step - 100)
    """

    device: int = 1
    host: HostArchive | None = None
    disk: Any = None  # a DiskCheckpoints (or anything with its interface)

    def __post_init__(self) -> None:
        check_int("device", self.device, 1, "Tiers", " It is the number of undo points kept on the device.")
        if self.host is not None:
            check_type("host", self.host, HostArchive, "Tiers", "a HostArchive or None")
        if self.disk is not None and not all(
            callable(getattr(self.disk, m, None)) for m in ("due", "save", "load", "latest_at_or_before", "wait")
        ):
            raise RewindTypeError(f"Tiers: disk must be a DiskCheckpoints or None, got {type(self.disk).__name__}.")

    # ------------------------------------------------------------------ writing
    def record(self, slot: Any, arenas: dict, wait_for_host: Callable[[Any], None], tree: Callable[[], Any]) -> None:
        """A point was recorded in the device ring (``slot``): copy it to the host and disk tiers when they want it.
        Records newer than it belong to an undone branch and are dropped first. ``arenas``: the tracker's arenas
        (their layout tells the codec which parts are bf16, fp32, ...); ``tree()``: the live state as state_dicts."""
        host, disk = self.host, self.disk
        if disk is not None and hasattr(disk, "check_recording"):
            disk.check_recording(slot.step)  # an earlier run's checkpoints, never restored: refuse before anything
        if host is not None:
            host.drop_after(slot.step)
            if host.due(slot.step) and (not host.records or host.records[-1].step != slot.step):
                wait_for_host(slot)
                host.add(slot, segments=arena_segments(arenas, slot))
        if disk is not None:
            disk.discard_after(slot.step)
            if disk.due(slot.step) and slot.step not in disk.steps():
                if isinstance(disk, DiskCheckpoints):  # arena images: one copy per arena, each way
                    disk.save(slot.step, tree(), arenas=[a.words() for a in arenas.values()])
                else:
                    disk.save(slot.step, tree())

    # ------------------------------------------------------------------ reading
    def find(self, step: int, ring: list[tuple[int, int]], live: int, group: Any, held: Callable[[], dict]) -> Found:
        """The newest point at or before ``step`` over the live state, the ring (``(step, point)`` pairs), the host
        archive and the disk; under a process group, the newest one every rank holds (one all-reduce per try).

        Below the live step that is the newest recorded point at or before ``step``. At or above it the live state
        is the answer (points above it belong to an undone branch), except for checkpoints an earlier run left in
        a ``DiskCheckpoints(resume=True)`` directory: a fresh process goes *forward* to them."""
        host, disk = self.host, self.disk
        if disk is not None:
            disk.wait()
        forward = disk.resumable_after(live) if disk is not None and hasattr(disk, "resumable_after") else []
        if step >= live and not forward and not (group is not None and getattr(disk, "resume", False)):
            return Found(live, "live")  # no collective: every rank returns here alike

        def newest(limit: int) -> Found | None:
            if limit >= live:
                ahead = [s for s in forward if s <= limit]
                return Found(max(ahead), "disk") if ahead else Found(live, "live")
            got = [Found(s, "ring", p) for s, p in ring if s <= limit]
            rec = host.latest_at_or_before(limit) if host is not None else None
            if rec is not None:
                got.append(Found(rec.step, "host", rec))
            on_disk = disk.latest_at_or_before(limit) if disk is not None else None
            if on_disk is not None:
                got.append(Found(on_disk, "disk"))
            order = {"ring": 0, "host": 1, "disk": 2}  # equal steps: the cheapest restore
            return min(got, key=lambda f: (-f.step, order[f.source], -(f.handle if f.source == "ring" else 0)),
                       default=None)  # fmt: skip

        best = newest(step)
        if group is not None:
            # Every rank must land on the same step (a save can have completed on one rank and not on another):
            # take the minimum of the ranks' newest steps and retry at or before it until all ranks hold the same.
            while True:
                mine = -1 if best is None else best.step
                lo, neg_hi = all_min(group, [mine, -mine])
                if lo == -neg_hi:
                    break
                best = newest(int(lo)) if lo >= 0 else None
        if best is None:
            raise RewindError(
                f"rollback_to({step}): no recorded state at or before step {step}; steps held: {held()}. Keep a "
                "deeper history (Tiers(host=HostArchive(keep=...), disk=DiskCheckpoints(...)))."
            )
        return best


__all__ = ["Checkpoint", "DiskCheckpoints", "Found", "HostArchive", "Tiers", "copy_images", "restore_plan"]
