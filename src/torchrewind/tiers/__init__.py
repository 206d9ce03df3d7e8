"""Storage tiers below the device ring: the host archive (:mod:`.archive`, compressed with :mod:`.codec`) and disk
checkpoints (:mod:`.disk`); :class:`Tiers` says how many undo points live where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .archive import HostArchive
from .disk import DiskCheckpoints
from ..errors import RewindError


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
    disk: Any = None  # DiskCheckpoints (imported lazily: it pulls in torch.distributed.checkpoint)

    def __post_init__(self) -> None:
        if not isinstance(self.device, int) or isinstance(self.device, bool) or self.device < 1:
            raise RewindError(f"Tiers: device must be an int >= 1 (undo points kept on the device), got {self.device!r}.")
        if self.host is not None and not isinstance(self.host, HostArchive):
            raise RewindError(f"Tiers: host must be a HostArchive or None, got {type(self.host).__name__}.")
        if self.disk is not None and not all(
            callable(getattr(self.disk, m, None)) for m in ("due", "save", "load", "latest_at_or_before", "wait")
        ):
            raise RewindError(f"Tiers: disk must be a DiskCheckpoints or None, got {type(self.disk).__name__}.")
