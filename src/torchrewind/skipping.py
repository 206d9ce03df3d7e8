"""A data iterator that can skip batches, so a policy can drop the data that led to a loss spike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from ._checks import check_int

T = TypeVar("T")


class SkippableIterator(Generic[T]):
    """Wraps any iterable; :meth:`skip` discards the next ``n`` items (counted in :attr:`skipped`).

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
