"""Arenas: one contiguous byte buffer per device that the tracked tensors live in.

Why: a snapshot of N separate tensors costs N kernel launches / N Python calls, which dominates for models made
of many small tensors. Re-homing every tracked tensor into one flat buffer per device (through ``t.data``, which
keeps object identity, like FSDP's flat parameters) makes a snapshot or a restore a single memcpy per device,
whatever the number of tensors.

Each re-homed tensor gets a storage object of its own that aliases its bytes of the arena (made with DLPack: one
allocation, many non-overlapping storages). Serializers group tensors by storage, so ``torch.save``, ``pickle`` and
``copy.deepcopy`` see ordinary tensors: each writes only its own bytes, and mixed dtypes in one arena are fine. Every
such storage holds one reference to the arena's buffer, so the buffer lives as long as any of its tensors does, and
its use count still drops the moment a tensor stops living in it: the O(1) change detector.

Positions (:class:`Entry`) are append-only: an entry's bytes never move while any snapshot may refer to them, so
a snapshot taken before the arena grew is a byte-prefix of the current arena and restores with one copy.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

ALIGN = 64  # bytes; keeps every tensor cache-line aligned and valid for vectorised/fused kernels
_WORD = torch.int64  # arenas are copied as 8-byte words: byte-wise copy_ is measurably slower on CPU


def storage_use_count(storage: torch.UntypedStorage) -> int:
    """How many tensors (and storage objects) share ``storage``. O(1)."""
    return torch._C._storage_Use_Count(storage._cdata)


def owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is the only tensor using its storage, and uses all of it (so it can be moved safely)."""
    if t._base is not None or t.storage_offset() != 0:
        return False
    st = t.untyped_storage()
    if st.nbytes() != t.numel() * t.element_size():
        return False
    # 1 for t itself + 1 for the storage object `st` we are holding right now.
    return storage_use_count(st) == 2


def home_tensor(storage: torch.UntypedStorage, offset: int, dtype: torch.dtype, shape: Any, stride: Any) -> torch.Tensor:
    """A tensor with a storage of its own aliasing ``storage`` from byte ``offset`` (see the module docstring).

    The DLPack capsule's owner is a view of ``storage``: the new storage keeps the arena's buffer alive, and counts
    once in its use count for as long as it exists."""
    view = torch.empty(0, dtype=dtype, device=storage.device)
    view.set_(storage, offset // view.element_size(), shape, stride)
    return from_dlpack(to_dlpack(view))


_LIVE: weakref.WeakSet[Arena] = weakref.WeakSet()  # arenas of live Rewinds


class LiveArenas:
    """The memory ranges of every live arena, looked up once per scan: a tensor living in one of them belongs to a
    (possibly other, live) Rewind and must not be moved — two Rewinds would keep moving it back and forth. Tensors of
    a dropped Rewind's arena are free to move: a new Rewind adopts them."""

    def __init__(self) -> None:
        self._ranges = [(a.device, a.data_ptr, a.data_ptr + a.used) for a in list(_LIVE) if a.used]

    def holds(self, t: torch.Tensor) -> bool:
        if not self._ranges:
            return False
        ptr, dev = t.untyped_storage().data_ptr(), t.device
        return any(d == dev and lo <= ptr < hi for d, lo, hi in self._ranges)


class Entry:
    """A fixed position in an arena, and the tensor currently living there (if any)."""

    __slots__ = ("key", "arena", "offset", "nbytes", "dtype", "shape", "stride", "_obj", "_weak")

    def __init__(self, key: Any, arena: Arena, offset: int, t: torch.Tensor) -> None:
        self.key = key
        # weak: Arena.entries holds the entries, and a cycle would keep a dropped Rewind's arena storage (the whole
        # training state) alive until the next garbage collection
        self.arena = weakref.proxy(arena)
        self.offset = offset
        self.nbytes = t.numel() * t.element_size()
        self.dtype = t.dtype
        self.shape = t.shape
        self.stride = t.stride()
        self._obj: torch.Tensor | None = None
        self._weak: weakref.ref | None = None

    def fits(self, t: torch.Tensor) -> bool:
        return (
            t.dtype == self.dtype
            and t.shape == self.shape
            and t.stride() == self.stride
            and t.device == self.arena.device
        )

    def obj(self) -> torch.Tensor | None:
        if self._obj is not None:
            return self._obj
        return self._weak() if self._weak is not None else None

    def hold(self, t: torch.Tensor | None, strong: bool) -> None:
        """Remember the tensor living here. Container-held tensors are held weakly, so that replacing one in its
        container frees it and shows up as a drop in the arena's use count (our O(1) change detector)."""
        if t is None:
            self._obj, self._weak = None, None
        elif strong:
            self._obj, self._weak = t, None
        else:
            self._obj, self._weak = None, weakref.ref(t)

    def make_strong(self) -> None:
        t = self.obj()
        if t is not None:
            self._obj, self._weak = t, None

    def is_home(self, t: torch.Tensor) -> bool:
        """True when ``t`` currently lives at this position."""
        return (
            t.device == self.arena.device
            and t.storage_offset() == 0
            and t.untyped_storage().data_ptr() == self.arena.data_ptr + self.offset
            and self.fits(t)
        )

    def view(self) -> torch.Tensor:
        """A new tensor object living at this position (with a storage of its own)."""
        return home_tensor(self.arena.storage, self.offset, self.dtype, self.shape, self.stride)


def rehome(t: torch.Tensor, home: torch.Tensor) -> None:
    """Make ``t`` (the same Python object) live in ``home``'s memory.

    Through ``.data`` rather than ``Tensor.set_``: ``set_`` on a leaf that requires grad drops its AccumulateGrad
    node, and with it every hook registered there, e.g. DDP's reducer hooks (gradients would silently stop being
    all-reduced). ``.data`` keeps the node, like ``set_data`` does for FSDP's flat parameters."""
    t.data = home


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of storage a dense tensor with these strides needs (handles channels_last etc.)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return extent * t.element_size()


class Arena:
    """A growable byte buffer on one device holding the live values of tracked tensors."""

    _uids = itertools.count()

    def __init__(self, device: torch.device) -> None:
        self.uid = next(Arena._uids)  # identity that survives Entry's weak proxy
        self.device = device
        self.used = 0  # bytes handed out (a multiple of ALIGN)
        self.storage = torch.empty(0, dtype=torch.uint8, device=device).untyped_storage()
        self.data_ptr = self.storage.data_ptr()
        self.entries: list[Entry] = []
        self._words: torch.Tensor | None = None
        self.baseline = storage_use_count(self.storage)
        _LIVE.add(self)

    @property
    def nbytes(self) -> int:
        return self.used

    def words(self) -> torch.Tensor:
        """The used bytes as an int64 tensor (for copying); cached, and counted in the baseline."""
        w = self._words
        if w is None or w.numel() * 8 != self.used:
            w = self._words = torch.empty(0, dtype=_WORD, device=self.device)
            w.set_(self.storage, 0, (self.used // 8,), (1,))
        return w

    @staticmethod
    def plan(t: torch.Tensor, extra: int) -> int:
        """Bytes needed by ``t`` on top of ``extra`` already planned, rounded to ALIGN."""
        return extra + (span_bytes(t) + ALIGN - 1) // ALIGN * ALIGN

    def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` more bytes, moving every live tensor to a new buffer if needed."""
        need = self.used + nbytes
        if need <= self.storage.nbytes():
            return
        new = torch.empty(need, dtype=torch.uint8, device=self.device).untyped_storage()
        if self.used:
            dst = torch.empty(0, dtype=torch.uint8, device=self.device)
            dst.set_(new, 0, (self.used,), (1,))
            src = torch.empty(0, dtype=torch.uint8, device=self.device)
            src.set_(self.storage, 0, (self.used,), (1,))
            dst.copy_(src)
            del dst, src
        with torch.no_grad():
            for e in self.entries:
                obj = e.obj()
                if obj is not None:
                    rehome(obj, home_tensor(new, e.offset, e.dtype, e.shape, e.stride))
        self.storage = new
        self.data_ptr = new.data_ptr()
        self._words = None

    def add(self, key: Any, t: torch.Tensor) -> Entry:
        """Allocate a new position for a tensor shaped like ``t`` (call :meth:`reserve` first)."""
        e = Entry(key, self, self.used, t)
        self.used = self.plan(t, self.used)
        self._words = None
        self.entries.append(e)
        return e

    def has_foreign_views(self) -> bool:
        """True when something other than our own tensors references this memory (e.g. a view someone made of a
        tracked tensor, or a tensor that left its container but is still held): then the buffer must never be
        reallocated, or that view would silently detach. O(entries): called only before growing a chunk."""
        live = [e.obj() for e in self.entries]
        live = [t for t in live if t is not None]
        if storage_use_count(self.storage) != 1 + (self._words is not None) + len(live):
            return True  # a storage of ours outlives its tensor (held elsewhere), or a raw view of the buffer
        # each tensor's own storage: itself, plus the storage object asked for here
        return any(storage_use_count(t.untyped_storage()) != 2 for t in live)

    def changed(self) -> bool:
        """O(1): did any tensor stop living here (or a foreign view appear) since :meth:`rebaseline`?"""
        return storage_use_count(self.storage) != self.baseline

    def rebaseline(self) -> None:
        self.words()  # the cached copy view is part of the baseline
        self.baseline = storage_use_count(self.storage)
