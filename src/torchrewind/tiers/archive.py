"""The host-RAM tier: older undo points kept in CPU memory, as lossless compressed deltas or plain copies.

The device ring (:class:`~torchrewind.core.ring.Ring`) keeps the last few points at memcpy speed; the
archive keeps a deeper history of every ``every``-th recorded point for :meth:`Rewind.rollback_to`.

Storage is *reverse-delta*: the newest record holds its bytes raw; when a newer one arrives, the previous newest is
re-encoded as the difference against it (:mod:`torchrewind.tiers.codec`), except every ``keyframe``-th record, which
is compressed on its own. Decoding a record walks down from the nearest keyframe (or the newest record), so a
restore decodes at most ``keyframe`` records, and dropping the oldest record never breaks a chain.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_bool, check_int, check_optional_int
from ..errors import RewindError, RewindValueError
from ..core.snapshot import Slot


@dataclass
class _Record:
    step: int
    seq: int  # running number: keyframes are the records with seq % keyframe == 0
    used: dict[tuple, int]
    raw: dict[tuple, torch.Tensor] | None  # CPU int64 words (newest record, or compress=False)
    enc: dict[tuple, Any] = field(default_factory=dict)  # codec.Encoded per arena key (older records)
    rest: Slot = field(default_factory=Slot)  # everything but the arena words, copied
    segments: dict = field(default_factory=dict)  # per arena key: element-size runs, for the codec

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * 8 for t in self.raw.values()) if self.raw is not None else 0
        n += sum(e.nbytes for e in self.enc.values())
        n += sum(t.numel() * t.element_size() for t in self.rest.pinned.values())
        if self.rest.grads:
            n += sum(g.numel() * g.element_size() for g in self.rest.grads if g is not None)
        return n


Segments = tuple[tuple[int, int], ...]  # (nbytes, itemsize) runs covering an arena's used bytes

_SMALL = 4096  # runs shorter than this (Adam's scalar `step` tensors, padding) join their neighbour


def arena_segments(arenas: dict, slot: Any) -> dict[tuple, Segments]:
    """Per arena key, which byte runs hold elements of which width (bf16 weights: 2, fp32 moments: 4, ...), so the
    codec differences and shuffles each part with its own element size. Arenas a slot keeps only part of
    (``shard=True``) are left out: the codec's default element size applies there."""
    out = {}
    for k, a in arenas.items():
        v = slot.views.get(k)
        if v is None or v.numel() * 8 != a.used:
            continue
        out[k] = _segments(a)
    return out


def _segments(arena: Any) -> Segments:
    runs: list[list[int]] = []  # [start, itemsize]
    for e in sorted(arena.entries, key=lambda e: e.offset):
        k = e.dtype.itemsize if e.dtype.itemsize in (1, 2, 4, 8) else 1
        if e.nbytes < _SMALL or (runs and runs[-1][1] == k):
            continue  # stays in the run before it
        runs.append([e.offset, k])
    if not runs:
        return ((arena.used, 4),)
    runs[0][0] = 0
    ends = [r[0] for r in runs[1:]] + [arena.used]
    return tuple((end - start, k) for (start, k), end in zip(runs, ends) if end > start)


class HostArchive:
    """Keep every ``every``-th undo point of the last ``keep`` in host RAM (compressed with ``compress=True``).

    Compression runs in a background thread, its chunks on ``threads`` threads (default: half the cores, at most
    8); ``itemsize`` is the element size assumed where the arena's layout is unknown.

    Example::

        rw = Rewind(model, opt, tiers=Tiers(device=2, host=HostArchive(keep=64, every=4)))
        ...
        rw.rollback_to(step=120)        # newest point at or before step 120 in any tier
    """

    def __init__(
        self,
        keep: int = 32,
        *,
        every: int = 1,
        compress: bool = True,
        keyframe: int = 8,
        max_bytes: int | None = None,
        itemsize: int = 4,
        threads: int | None = None,
    ) -> None:
        who = "HostArchive"
        self.keep = check_int("keep", keep, 1, who)
        self.every = check_int("every", every, 1, who)
        self.keyframe = check_int("keyframe", keyframe, 1, who)
        self.max_bytes = check_optional_int("max_bytes", max_bytes, 0, who)
        self.compress = check_bool("compress", compress, who)
        check_int("itemsize", itemsize, 1, who)
        if itemsize not in (1, 2, 4, 8):
            raise RewindValueError(f"HostArchive: itemsize must be 1, 2, 4 or 8, got {itemsize}.")
        self.itemsize = itemsize  # element size where the arena layout is unknown
        check_optional_int("threads", threads, 1, who)
        self.threads = threads
        if self.compress:
            from . import codec

            codec._blosc2()  # fail now, with the install hint, not at the first step
            if self.threads is None:
                self.threads = codec.default_threads()
        self.threads = self.threads or 1
        self.records: list[_Record] = []
        self._seq = 0
        # Compression runs in one worker thread (the codec releases the GIL), off the training loop's path.
        self._worker: ThreadPoolExecutor | None = None
        self._jobs: list[tuple[_Record, Future]] = []
        self._free: dict[tuple, list[torch.Tensor]] = {}  # raw buffers of records already compressed, for reuse

    # ------------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    def latest_at_or_before(self, step: int) -> _Record | None:
        best = None
        for r in self.records:
            if r.step <= step:
                best = r
        return best

    # ------------------------------------------------------------------ writing
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def wait(self) -> None:
        """Finish pending compressions."""
        jobs, self._jobs = self._jobs, []
        for rec, fut in jobs:
            enc = fut.result()
            for k, t in rec.raw.items():
                self._free.setdefault((k, t.numel()), []).append(t)
            rec.enc, rec.raw = enc, None

    def _buffer(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        free = self._free.get((key, like.numel()))
        return free.pop() if free else torch.empty(like.numel(), dtype=like.dtype, pin_memory=like.is_cuda)

    def close(self) -> None:
        self.wait()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def drop_after(self, step: int) -> None:
        """Forget records newer than ``step`` (a branch that was undone and replaced)."""
        if self.records and self.records[-1].step > step:
            self.wait()
        while self.records and self.records[-1].step > step:
            gone = self.records.pop()
            if self.records and self.records[-1].raw is None and gone.raw is not None:
                self.records[-1].raw = self._decode(len(self.records) - 1, newer=gone.raw)
                self.records[-1].enc = {}
            self._recycle(gone)

    def add(self, slot: Slot, segments: dict[tuple, Segments] | None = None) -> None:
        """Archive the recorded point in ``slot`` (call right after it was captured). ``segments``: per arena, its
        element-size runs (:func:`arena_segments`), for a better compression ratio."""
        self.drop_after(slot.step - 1)
        if len(self._jobs) > 1:
            self.wait()  # compression falls behind: wait rather than pile up raw copies
        raw = {k: self._buffer(k, v).copy_(v) for k, v in slot.views.items() if k in slot.used}
        rec = _Record(slot.step, self._seq, dict(slot.used), raw, rest=slot.copy_rest(to_cpu=True), segments=segments or {})
        self._seq += 1
        if self.compress and self.records and self.records[-1].raw is not None:
            prev = self.records[-1]
            ref = None if prev.seq % self.keyframe == 0 else raw
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrewind-archive")
            job = self._worker.submit(_encode_all, prev.raw, ref, self.itemsize, prev.segments, self.threads)
            self._jobs.append((prev, job))
        self.records.append(rec)
        while len(self.records) > self.keep or (
            self.max_bytes is not None and len(self.records) > 1 and self.nbytes > self.max_bytes
        ):
            self._recycle(self.records.pop(0))

    def _recycle(self, rec: _Record) -> None:
        if rec.raw is not None and all(r is not rec for r, _ in self._jobs):
            for k, t in rec.raw.items():
                self._free.setdefault((k, t.numel()), []).append(t)
            rec.raw = None

    # ------------------------------------------------------------------ reading
    def _decode(self, i: int, newer: dict[tuple, torch.Tensor] | None = None) -> dict[tuple, torch.Tensor]:
        """Raw words of record ``i`` (``newer``: raw words of record i+1, if the caller has them)."""
        rec = self.records[i]
        if rec.raw is not None:
            return rec.raw
        from .codec import decode

        if rec.seq % self.keyframe == 0:
            return {k: decode(e, threads=self.threads) for k, e in rec.enc.items()}
        if newer is None:
            newer = self._decode(i + 1)
        return {k: decode(e, newer.get(k), threads=self.threads) for k, e in rec.enc.items()}

    def materialize(self, rec: _Record, devices: dict[tuple, torch.device]) -> Slot:
        """A slot holding ``rec``'s state, its words on the arenas' devices, ready for ``Recorder.restore``."""
        self.wait()
        i = self.records.index(rec)
        # walk down from the nearest record that decodes on its own (keyframe or raw): at most `keyframe` decodes
        j = i
        while j + 1 < len(self.records) and self.records[j].raw is None and self.records[j].seq % self.keyframe:
            j += 1
        words = self._decode(j)
        for k in range(j - 1, i - 1, -1):
            words = self._decode(k, newer=words)
        slot = rec.rest.copy_rest()
        for k, w in words.items():
            dev = devices.get(k)
            if dev is None:
                raise RewindError("internal error: archived arena no longer exists")
            slot.words[k] = slot.views[k] = w.to(dev)
        slot.used = dict(rec.used)
        slot.step = rec.step
        return slot


def _encode_all(
    raw: dict[tuple, torch.Tensor], ref: dict[tuple, torch.Tensor] | None, itemsize: int, segments: dict, threads: int
) -> dict:
    from .codec import encode

    return {
        k: encode(w, None if ref is None else ref.get(k), itemsize=itemsize, segments=segments.get(k), threads=threads)
        for k, w in raw.items()
    }
