"""The largest batch size whose training step fits: powers of two, then a binary search, every trial undone.

Each trial runs ``steps_per_trial`` real training steps at one batch size, measures their peak memory
(:mod:`torchrewind.tuners.memory`), and puts the training state back (:class:`~torchrewind.tuners.hold.StateHold`),
also after an out-of-memory error in the middle of a step (an optimizer that ran out of memory half-way through
``step()`` leaves half-updated state behind: it is restored like the rest). A size fits if its steps raised no
out-of-memory error and, with ``max_bytes``, their peak stayed within it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._checks import check_choice, check_int, check_optional_int
from ..errors import RewindValueError
from ..rewind import Rewind
from ._common import check_step_fns, run_step
from .data import batch_maker
from .hold import StateHold
from .lr_find import _pyplot
from .memory import free_cached, is_oom, peak_bytes


@dataclass
class BatchTrial:
    """One tried batch size: whether it fits, its measured peak bytes (None after an out-of-memory error), the
    seconds its steps took, and why it does not fit."""

    batch_size: int
    fits: bool
    peak_bytes: int | None
    seconds: float
    reason: str = ""


@dataclass
class BatchSizeResult:
    """The largest batch size that fits (``None`` if not even ``start`` does) and every trial.

    Example::

        res = find_batch_size(model, opt, loss_fn, dataset, max_bytes=2 * 2**30)
        print(res.batch_size, [(t.batch_size, t.fits) for t in res.trials]); res.plot("bs.png")
    """

    batch_size: int | None
    trials: list[BatchTrial]
    max_bytes: int | None
    limit: int | None
    device: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, path: str | Path | None = None, *, ax: Any = None) -> Any:
        """Measured peak memory against batch size, the budget as a line. Needs matplotlib."""
        plt = _pyplot(path, ax)
        fig, ax = plt.subplots(figsize=(6.5, 4)) if ax is None else (ax.figure, ax)
        for fits, marker, color, label in ((True, "o", "tab:green", "fits"), (False, "x", "tab:red", "does not fit")):
            pts = [(t.batch_size, t.peak_bytes / 2**20) for t in self.trials if t.fits == fits and t.peak_bytes]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=label, zorder=3)
        for t in self.trials:
            if t.peak_bytes is None:
                ax.axvline(t.batch_size, color="tab:red", ls=":", lw=1)
        if self.max_bytes is not None:
            ax.axhline(self.max_bytes / 2**20, color="black", ls="--", lw=1, label="budget")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak memory of a step (MiB)")
        ax.set_title(f"batch-size search on {self.device}: {self.batch_size}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def find_batch_size(
    model: torch.nn.Module | Iterable[torch.nn.Module] | None,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    data: Any = None,
    *,
    train_step: Callable[[Any], Any] | None = None,
    max_bytes: int | None = None,
    max_batch_size: int | None = None,
    start: int = 2,
    search: str = "binary",
    steps_per_trial: int = 1,
    schedulers: Sequence[Any] | Any = (),
    scaler: torch.amp.GradScaler | None = None,
    generators: Sequence[torch.Generator] = (),
    rewind: Rewind | None = None,
    device: torch.device | str | None = None,
) -> BatchSizeResult:
    """The largest batch size whose training step fits in memory (or in ``max_bytes``), found by real steps that
    leave the training state bitwise as it was.

    Example::

        res = find_batch_size(model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]), train_set,
                              max_bytes=512 * 2**20)
        loader = DataLoader(train_set, batch_size=res.batch_size, shuffle=True)

    Args:
        model, optimizer, loss_fn, train_step, schedulers, scaler, generators, rewind: as for
            :func:`~torchrewind.lr_find` (the state to hold, and one training iteration).
        data: ``batch_size -> batch`` (a callable), or a ``Dataset``/``DataLoader`` (its first ``b`` samples,
            collated; the loader's sampler is never used, so no RNG is drawn).
        max_bytes: the budget for a step's peak memory on the model's device. Required on CPU unless
            ``max_batch_size`` bounds the search (there, running out of memory means the operating system's OOM
            killer, not an exception).
        max_batch_size: the largest size to try (default: the dataset's length, if known).
        start: the first size tried (2: BatchNorm refuses batches of 1 in training); it doubles while it fits.
        search: ``"binary"`` (after the first failure, bisect between the last size that fit and it, to the exact
            largest size) or ``"power"`` (the largest power-of-two multiple of ``start``).
        steps_per_trial: training steps per trial (the first step of a fresh optimizer allocates its state, so 1 is
            enough for memory; more also measures steady-state time per step).
        device: where to measure (default: the device of the optimizer's first parameter).
    """
    who = "find_batch_size"
    check_step_fns(loss_fn, train_step, who)
    make, limit = batch_maker(data, who)
    check_int("start", start, 1, who)
    check_optional_int("max_batch_size", max_batch_size, 1, who)
    check_optional_int("max_bytes", max_bytes, 1, who)
    check_int("steps_per_trial", steps_per_trial, 1, who)
    check_choice("search", search, ("binary", "power"), who)
    if max_batch_size is not None:
        limit = max_batch_size if limit is None else min(limit, max_batch_size)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    if dev.type == "cpu" and max_bytes is None and limit is None:
        raise RewindValueError(
            f"{who}: on CPU give max_bytes= (a budget for a step's peak memory) or max_batch_size=; running out of CPU "
            "memory ends the process instead of raising an error the search could catch."
        )
    if limit is not None and start > limit:
        raise RewindValueError(f"{who}: start={start} is above the largest batch size available ({limit}).")
    track = tuple(x for x in ((model if isinstance(model, torch.nn.Module) else None), optimizer) if x is not None)
    t_all = time.perf_counter()
    trials: list[BatchTrial] = []
    # on CUDA the held copy goes to pinned host memory, so it does not take the memory being measured
    hold = StateHold(model, optimizer, schedulers=schedulers, scaler=scaler, generators=generators, rewind=rewind,
                     steps=steps_per_trial, storage="host" if dev.type == "cuda" else "device", who=who)  # fmt: skip

    def trial(b: int) -> bool:
        t0 = time.perf_counter()
        peak, reason, batches = None, "", None

        def steps(batches: list[Any]) -> None:
            for batch in batches:
                run_step(optimizer, batch, loss_fn, train_step, scaler)

        try:
            try:
                # batches are made outside the measurement (a dataset's storage is not a step's cost) and counted
                batches = [make(b) for _ in range(steps_per_trial)]
                _, peak = peak_bytes(lambda: steps(batches), dev, (*track, *_tensors(batches)))
            except Exception as e:
                if not is_oom(e):
                    raise
                reason = f"out of memory: {str(e).splitlines()[0][:160]}"
            batches = None
            if reason:
                free_cached(dev)  # after the except block: its traceback held the failed step's tensors
        finally:
            hold.restore()
        fits = peak is not None and (max_bytes is None or peak <= max_bytes)
        if peak is not None and not fits:
            reason = f"peak {peak:,} bytes > max_bytes={max_bytes:,}"
        trials.append(BatchTrial(b, fits, peak, time.perf_counter() - t0, reason))
        return fits

    try:
        good, bad = None, None
        b = start
        while True:  # powers of two
            if trial(b):
                good = b
                if limit is not None and b >= limit:
                    break
                b = b * 2 if limit is None else min(b * 2, limit)
            else:
                bad = b
                break
        if search == "binary" and good is not None and bad is not None:
            while bad - good > 1:
                mid = (good + bad) // 2
                if trial(mid):
                    good = mid
                else:
                    bad = mid
    finally:
        hold.close()
    return BatchSizeResult(good, trials, max_bytes, limit, str(dev), seconds=time.perf_counter() - t_all)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts (a batch)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    return []
