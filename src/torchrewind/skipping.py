"""Skipping batches, so a policy can drop the data that led to a loss spike: a data iterator that can skip, and the
record of which skips a guard still owes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from ._checks import check_int, check_type
from .errors import RewindValueError

T = TypeVar("T")


class SkippableIterator(Generic[T]):
    """Wraps any iterable; :meth:`skip` discards the next ``n`` items (counted in :attr:`skipped`).

    Its :meth:`state_dict` holds the counts (``seen``, ``skipped``) and the skips still pending, not the position of
    the wrapped iterable: to resume, wrap the remaining items (from position ``seen + skipped``) and load the state.

    Example::

        batches = SkippableIterator(loader)
        for x, y in batches:
            ...; batches.skip(10)       # the next 10 batches will not be seen
    """

    def __init__(self, iterable: Iterable[T]) -> None:
        self._it: Iterator[T] = iter(iterable)
        self._pending = 0
        self.skipped = 0
        self.seen = 0

    def skip(self, n: int) -> None:
        check_int("n", n, 0, "SkippableIterator.skip")
        self._pending += n

    @property
    def pending(self) -> int:
        """Items still to be skipped before the next one is returned."""
        return self._pending

    def __iter__(self) -> SkippableIterator[T]:
        return self

    def __next__(self) -> T:
        while self._pending:
            next(self._it)  # StopIteration here ends the iteration, as it should
            self._pending -= 1
            self.skipped += 1
        item = next(self._it)
        self.seen += 1
        return item

    def state_dict(self) -> dict[str, int]:
        """``{"seen", "skipped", "pending"}``: items returned, items skipped, skips still to come.

        Example::

            pos = it.seen + it.skipped                      # items consumed from the wrapped iterable
            it2 = SkippableIterator(data[pos:]); it2.load_state_dict(it.state_dict())
        """
        return {"seen": self.seen, "skipped": self.skipped, "pending": self._pending}

    def load_state_dict(self, state_dict: dict[str, int], strict: bool = True) -> None:
        """Restore the counts and the pending skips of :meth:`state_dict` (``strict`` is accepted for a uniform
        interface; there are no settings to compare)."""
        who = "SkippableIterator.load_state_dict"
        check_type("state_dict", state_dict, dict, who, "a dict returned by state_dict()")
        missing = [k for k in ("seen", "skipped", "pending") if k not in state_dict]
        if missing:
            raise RewindValueError(f"{who}: the state lacks {missing}.")
        seen, skipped, pending = (check_int(k, state_dict[k], 0, who) for k in ("seen", "skipped", "pending"))
        self.seen, self.skipped, self._pending = seen, skipped, pending


class BatchSkips:
    """Where a guard's batch skips go: into the iterator returned by :meth:`wrap` (the batches are never seen), or,
    with no wrapped iterator (a framework's loop), queued: the next ``n`` iterations' steps are not applied.

    Example::

        skips = BatchSkips()
        for x, y in skips.wrap(loader): ...       # skips.skip(4) drops the next 4 batches
        if skips.take_queued(): ...               # unwrapped: this iteration's step is one of the skipped ones
    """

    def __init__(self) -> None:
        self.loader: SkippableIterator[Any] | None = None
        self.queued = 0  # iterations whose steps are not applied (no wrapped iterator)
        self._loader_state: dict[str, int] | None = None  # loaded before wrap(): applied to the next wrapped iterator

    def wrap(self, iterable: Iterable[T]) -> SkippableIterator[T]:
        it = iterable if isinstance(iterable, SkippableIterator) else SkippableIterator(iterable)
        if self._loader_state is not None:  # resuming: the counts and pending skips of the saved iterator
            it.load_state_dict(self._loader_state)
            self._loader_state = None
        self.loader = it
        return it

    def skip(self, n: int) -> None:
        if self.loader is not None:
            self.loader.skip(n)
        else:
            self.queued = n

    def take_queued(self) -> bool:
        """Whether this iteration is one whose step must not be applied (counts it off)."""
        if not self.queued:
            return False
        self.queued -= 1
        return True

    def state_dict(self) -> dict[str, Any]:
        loader = self.loader.state_dict() if self.loader is not None else self._loader_state
        return {"queued": self.queued, "loader": dict(loader) if loader is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        who = "BatchSkips.load_state_dict"
        check_type("state_dict", state_dict, dict, who, "a dict returned by state_dict()")
        if "queued" not in state_dict or "loader" not in state_dict:
            raise RewindValueError(f"{who}: the state needs 'queued' and 'loader'.")
        queued = check_int("queued", state_dict["queued"], 0, who)
        loader = state_dict["loader"]
        if loader is not None:
            SkippableIterator(()).load_state_dict(loader)  # validates
            loader = dict(loader)
        if self.loader is not None and loader is not None:
            self.loader.load_state_dict(loader)
        else:
            self._loader_state = loader
        self.queued = queued
