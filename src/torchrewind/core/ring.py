"""The ring of recorded points: which slot holds which point, and where the live state is.

A *point* is a recorded state, numbered 0, 1, 2, ... in recording order; point ``i`` lives in slot
``i % nslots``. Point ``cur`` is the one the live state derives from. ``clean`` means no optimizer step has started
since the live state was recorded or restored (so a new recording overwrites point ``cur``); otherwise the live
state is "after" point ``cur`` and a new recording becomes point ``cur + 1``. Points ``lo..hi`` are stored.

The bookkeeping is plain integers (no tensors), so every undo/redo/snapshot sequence can be property-tested
cheaply (``tests/test_random_sequences.py`` checks it against a reference model written from this spec). The
slots' tensors are filled by :class:`~torchrewind.core.snapshot.Recorder`.
"""

from __future__ import annotations

from .._checks import check_int
from ..errors import RewindError, RewindValueError
from .snapshot import Slot


class Ring:
    """``capacity`` undo points (plus one slot for the live state when ``redo`` is kept), in reusable slots."""

    def __init__(self, capacity: int, redo: bool) -> None:
        self.capacity = capacity
        self.redo_enabled = redo
        # One extra slot lets undo keep the live state for redo without evicting an undo point.
        self.nslots = capacity + 1 if redo else capacity
        self.slots = [Slot() for _ in range(self.nslots)]
        self.lo = 0
        self.hi = -1
        self.cur = -1
        self.clean = False

    def slot(self, point: int) -> Slot:
        return self.slots[point % self.nslots]

    def swap(self, point: int, slot: Slot) -> Slot:
        """Put ``slot`` in ``point``'s place; returns the slot it replaces (its buffers can be reused)."""
        i = point % self.nslots
        old, self.slots[i] = self.slots[i], slot
        return old

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    # ------------------------------------------------------------------ queries
    def live_point(self) -> int:
        """The point number the live state has (or would get if recorded)."""
        return self.cur if self.clean else self.cur + 1

    def undo_depth(self) -> int:
        if self.cur < 0:
            return 0
        live = self.live_point()
        lo = self.lo
        if not self.clean and self.redo_enabled:
            lo = max(lo, live - self.nslots + 1)  # recording the live state evicts the oldest point if full
        return max(0, min(live - lo, self.capacity))

    def redo_depth(self) -> int:
        return self.hi - self.cur if self.clean and self.cur >= 0 else 0

    def held(self) -> list[tuple[int, int]]:
        """(step, point) of every point held."""
        return [(self.slot(p).step, p) for p in range(max(self.lo, 0), self.hi + 1)]

    # ------------------------------------------------------------------ transitions
    def record(self) -> int:
        """A snapshot of the live state was written into ``slot(live_point())``; returns its point number."""
        i = self.live_point()
        self.cur = self.hi = i
        self.lo = max(self.lo, i - self.nslots + 1)
        self.clean = True
        return i

    def step_started(self) -> None:
        """An optimizer step is about to change the live state: it leaves point cur, and redo is no longer
        possible."""
        self.clean = False
        if self.cur >= 0:
            self.hi = self.cur

    def forget(self, point: int) -> None:
        """A write into ``point``'s slot failed half-way: the point previously in that slot is gone."""
        self.lo = max(self.lo, point - self.nslots + 1)

    def plan_undo(self, n: int) -> tuple[int | None, int]:
        """(point to record the live state as, or None; point to restore). Raises if not possible."""
        check_int("n", n, 1, "undo(n)")
        depth = self.undo_depth()
        if n > depth:
            raise RewindError(
                f"cannot undo {n} step(s): only {depth} available (capacity={self.capacity}). "
                + ("Build the Rewind with a larger capacity to keep more history." if depth else
                   "Nothing has been recorded since the last undo/construction; take an optimizer step first.")
            )  # fmt: skip
        if self.clean:
            return None, self.cur - n
        live = self.cur + 1
        return (live if self.redo_enabled else None), live - n

    def plan_redo(self, n: int) -> int:
        check_int("n", n, 1, "redo(n)")
        depth = self.redo_depth()
        if n > depth:
            why = (
                "redo is only possible right after undo; an optimizer step (or snapshot) since then cleared it"
                if depth == 0
                else f"only {depth} available"
            )
            raise RewindError(f"cannot redo {n} step(s): {why}.")
        return self.cur + n

    def plan_goto(self, point: int) -> tuple[int | None, int]:
        """Like plan_undo, to an absolute point (transactions, revert, roll-backs within the ring)."""
        if point < self.lo or point > self.hi:
            raise RewindError(
                f"point {point} is no longer stored (history keeps points {self.lo}..{self.hi}); "
                "increase capacity so the transaction's start point is not evicted."
            )
        if self.clean or point > self.cur:
            return None, point
        live = self.cur + 1
        # Keep the live state for redo only if writing it does not evict the point we are going back to.
        keep = self.redo_enabled and live - self.nslots < point
        return (live if keep else None), point

    def moved(self, recorded: int | None, target: int) -> None:
        """Commit a restore planned by plan_undo/plan_redo/plan_goto."""
        if recorded is not None:
            self.hi = recorded
            self.lo = max(self.lo, recorded - self.nslots + 1)
        self.cur = target
        self.clean = True

    # ------------------------------------------------------------------ resizing
    def restarted(self) -> Ring:
        """A fresh, empty ring of the same size (after a restore from a lower tier)."""
        return Ring(self.capacity, self.redo_enabled)

    def shrunk(self, capacity: int) -> Ring:
        """A smaller ring that keeps only the live point, if it is recorded and clean (its slot is moved over, no
        copy); the other slots are dropped (their memory freed). Point numbers stay."""
        check_int("capacity", capacity, 1, "Ring.shrunk")
        if capacity >= self.capacity:
            raise RewindValueError(f"Ring.shrunk: {capacity} is not smaller than {self.capacity}.")
        ring = Ring(capacity, self.redo_enabled)
        if self.cur >= 0 and self.clean:
            ring.lo = ring.hi = ring.cur = self.cur
            ring.clean = True
            ring.swap(self.cur, self.slot(self.cur))
        return ring
