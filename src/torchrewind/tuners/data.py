"""Data sources for the tuners: where a data loader keeps its position, and batches drawn without leaving a trace.

A ``DataLoader`` keeps no position of its own between epochs: each ``iter(loader)`` draws a fresh shuffle seed from
its ``generator`` (or, without one, from the global torch RNG) and a base seed for its workers. So "the loader's
position" after a tuner is the state of those generators (and of any stateful sampler), which the tuners hold and put
back: the next ``for batch in loader`` yields the batches it would have yielded without the tuner.

A one-shot iterator (a generator, ``iter(loader)``) cannot give batches back, so the tuners refuse it, unless it is
stateful (``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``), in which case its state is
held like the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import RewindTypeError, RewindValueError


def _stateful(o: Any) -> bool:
    return callable(getattr(o, "state_dict", None)) and callable(getattr(o, "load_state_dict", None))


def data_state(data: Any) -> tuple[list[torch.Generator], list[Any]]:
    """The ``torch.Generator`` objects and stateful objects (``state_dict``/``load_state_dict``) a data source draws
    from: a DataLoader's ``generator``, its sampler's and batch sampler's generators, and any of them that is
    stateful. Objects of other kinds contribute what they have at the top level.

    Example::

        gens, objs = data_state(loader)       # e.g. [loader.generator], []
    """
    gens: list[torch.Generator] = []
    objs: list[Any] = []
    seen: set[int] = set()

    def visit(o: Any, depth: int) -> None:
        if o is None or id(o) in seen or depth > 2:
            return
        seen.add(id(o))
        if isinstance(o, torch.Generator):
            gens.append(o)
            return
        if _stateful(o) and not isinstance(o, (torch.nn.Module, torch.optim.Optimizer)):
            objs.append(o)
        for name in ("generator", "sampler", "batch_sampler"):
            visit(getattr(o, name, None), depth + 1)

    visit(data, 0)
    return gens, objs


def check_iterable(data: Any, who: str) -> None:
    """Refuse a data source the tuner would consume for good (a one-shot iterator without state)."""
    if data is None:
        raise RewindTypeError(f"{who}: data is None; pass a DataLoader, a list of batches, or another re-iterable.")
    if isinstance(data, Iterator) and not _stateful(data):
        raise RewindValueError(
            f"{who}: data is a one-shot iterator ({type(data).__name__}); the tuner would consume batches from it and "
            "could not give them back. Pass the DataLoader itself (it is iterated afresh and its generators are put "
            "back afterwards), a list of batches, or another re-iterable."
        )
    if not isinstance(data, Iterable):
        raise RewindTypeError(
            f"{who}: data must be iterable (a DataLoader, a list of batches), got {type(data).__name__}."
        )


def cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Batches from ``data`` forever, iterating it afresh (a new epoch) whenever it runs out."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise RewindValueError("the data source yielded no batch.")


def batch_maker(data: Any, who: str) -> tuple[Callable[[int], Any], int | None]:
    """``(make, limit)``: ``make(b)`` returns one batch of ``b`` samples; ``limit`` is the most samples available.

    ``data`` is a callable ``b -> batch``, a ``Dataset`` with ``__len__`` (the first ``b`` samples, collated with
    the default collate function), or a ``DataLoader`` (its dataset and ``collate_fn``; never its sampler, so no RNG
    is drawn).
    """
    if isinstance(data, DataLoader):
        dataset, collate = data.dataset, data.collate_fn
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        dataset, collate = data, None
    elif callable(data):
        return data, None
    else:
        raise RewindTypeError(
            f"{who}: data must be a callable batch_size -> batch, a Dataset, or a DataLoader; got "
            f"{type(data).__name__}."
        )
    try:
        limit = len(dataset)
    except TypeError:
        raise RewindTypeError(
            f"{who}: the dataset has no len(); pass a callable batch_size -> batch instead."
        ) from None

    def make(b: int) -> Any:
        # a sequential loader over the first b samples: no sampler RNG, no workers
        extra = {"collate_fn": collate} if collate else {}
        loader = DataLoader(dataset, batch_size=b, shuffle=False, num_workers=0, **extra)
        return next(iter(loader))

    return make, limit
