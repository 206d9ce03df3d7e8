"""The learning-rate range test that leaves no trace: sweep the lr over real training steps, then put everything back.

``lr_find`` trains for up to ``num_steps`` steps while raising the lr from ``lr_min`` to ``lr_max`` (exponentially or
linearly), records the loss of each step (and an exponentially smoothed copy), stops when the smoothed loss diverges,
and suggests an lr (:mod:`torchrewind.tuners.suggest`). Before the first step it holds the training state in memory
(:class:`~torchrewind.tuners.hold.StateHold`); afterwards parameters, buffers, optimizer state and ``param_groups``,
schedulers, scaler, every RNG, the data loader's generators and the modules' ``training`` flags are bitwise what they
were, so training after ``lr_find`` is bit for bit training without it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._checks import check_bool, check_choice, check_int, check_number
from ..errors import RewindValueError
from ..rewind import Rewind
from ._common import check_step_fns, run_step, set_hparam
from .data import check_iterable, cycle, data_state
from .hold import StateHold
from .suggest import RULES, SUGGEST


@dataclass
class LRFindResult:
    """What an LR range test saw and suggests.

    Example::

        res = lr_find(model, opt, loss_fn, loader)
        print(res.suggestion, res.suggestions)       # the default rule's lr; every rule's
        res.plot("lr_find.png")

    Attributes: ``lrs`` (lr of each step), ``losses`` (raw loss of each step, nan if not finite), ``smoothed``
    (bias-corrected exponential moving average), ``suggestions`` (rule name -> lr or None), ``rule`` (the one
    :attr:`suggestion` uses), ``stopped`` (``"completed"``, ``"diverged"`` or ``"non-finite"``), ``seconds`` (whole
    call), ``hold_seconds`` (holding and restoring the state: the price of leaving no trace).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestions: dict[str, float | None]
    rule: str = "valley"
    stopped: str = "completed"
    mode: str = "exp"
    seconds: float = 0.0
    hold_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def suggestion(self) -> float | None:
        """The suggested lr by :attr:`rule` (``None`` if the curve had too few usable points)."""
        return self.suggestions.get(self.rule)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suggestion"] = self.suggestion
        return d

    def plot(self, path: str | Path | None = None, *, ax: Any = None, title: str = "") -> Any:
        """Loss against lr (raw and smoothed), every rule's suggestion marked. Needs matplotlib
        (``pip install torchrewind[plot]``). Returns the figure; saves it when ``path`` is given."""
        plt = _pyplot(path, ax)
        fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
        ax.plot(self.lrs, self.losses, lw=0.8, alpha=0.35, color="tab:blue", label="loss")
        ax.plot(self.lrs, self.smoothed, lw=1.6, color="tab:blue", label="smoothed loss")
        colors = {"valley": "tab:green", "steepest": "tab:red", "minimum": "tab:purple"}
        for name, lr in self.suggestions.items():
            if lr is not None:
                ls = "-" if name == self.rule else ":"
                ax.axvline(lr, color=colors.get(name, "gray"), ls=ls, lw=1.2, label=f"{name}: {lr:.3g}")
        if self.mode == "exp":
            ax.set_xscale("log")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # keep the diverging tail from flattening the interesting part
            lo, hi = min(finite), max(finite[: max(len(finite) // 10, 1)] + [min(finite)])
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-12), hi + 0.4 * (hi - lo + 1e-12))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title(title or f"LR range test ({len(self.lrs)} steps, {self.stopped})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


class LRSweep:
    """The schedule and the bookkeeping of a range test, independent of who runs the steps (a plain loop, Lightning,
    the Hugging Face ``Trainer``).

    Example::

        sweep = LRSweep(1e-7, 10.0, 100)
        for i in range(sweep.num_steps):
            lr = sweep.lr(i); ...one step at lr...
            if not sweep.record(lr, loss): break
    """

    def __init__(
        self,
        lr_min: float = 1e-7,
        lr_max: float = 10.0,
        num_steps: int = 100,
        mode: str = "exp",
        beta: float = 0.98,
        diverge: float | None = 4.0,
        who: str = "lr_find",
    ) -> None:
        self.lr_min = check_number("lr_min", lr_min, who, lo=0.0, lo_open=True)
        self.lr_max = check_number("lr_max", lr_max, who, lo=0.0, lo_open=True)
        if self.lr_max <= self.lr_min:
            raise RewindValueError(f"{who}: lr_max ({lr_max!r}) must be larger than lr_min ({lr_min!r}).")
        self.num_steps = check_int("num_steps", num_steps, 2, who)
        self.mode = check_choice("mode", mode, ("exp", "linear"), who)
        self.beta = check_number("beta", beta, who, lo=0.0, hi=1.0, hi_open=True)
        self.diverge = None if diverge is None else check_number("diverge", diverge, who, lo=1.0, lo_open=True)
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stopped = "completed"
        self._avg = 0.0
        self._best = math.inf

    def lr(self, i: int) -> float:
        """The lr of step ``i`` (0-based): ``lr_min`` at the first step, ``lr_max`` at the last."""
        r = i / (self.num_steps - 1)
        if self.mode == "exp":
            return self.lr_min * (self.lr_max / self.lr_min) ** r
        return self.lr_min + r * (self.lr_max - self.lr_min)

    def record(self, lr: float, loss: float) -> bool:
        """Log one step; False when the test should stop (non-finite loss, or the smoothed loss above ``diverge``
        times its best so far)."""
        self.lrs.append(float(lr))
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            self.stopped = "non-finite"
            return False
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        s = self._avg / (1 - self.beta ** (len(self.smoothed) + 1))  # bias-corrected: the average starts at 0
        self.smoothed.append(s)
        self._best = min(self._best, s)
        if self.diverge is not None and len(self.smoothed) > 1 and s > self.diverge * self._best:
            self.stopped = "diverged"
            return False
        return True

    def result(self, rule: str = "valley", skip_start: int = 10, skip_end: int = 1, **kw: Any) -> LRFindResult:
        suggestions = {name: SUGGEST[name](self.lrs, self.smoothed, skip_start, skip_end) for name in RULES}
        return LRFindResult(list(self.lrs), list(self.losses), list(self.smoothed), suggestions, rule=rule,
                            stopped=self.stopped, mode=self.mode, **kw)  # fmt: skip


def lr_find(
    model: torch.nn.Module | Iterable[torch.nn.Module] | None,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    data: Iterable[Any] | None = None,
    *,
    train_step: Callable[[Any], Any] | None = None,
    schedulers: Sequence[Any] | Any = (),
    scaler: torch.amp.GradScaler | None = None,
    generators: Sequence[torch.Generator] = (),
    rewind: Rewind | None = None,
    lr_min: float = 1e-7,
    lr_max: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    beta: float = 0.98,
    diverge: float | None = 4.0,
    rule: str = "valley",
    skip_start: int = 10,
    skip_end: int = 1,
    apply: bool = False,
) -> LRFindResult:
    """LR range test: train ``num_steps`` steps with the lr rising from ``lr_min`` to ``lr_max``, record the loss,
    suggest an lr, and leave the training state bitwise as it was.

    Example::

        res = lr_find(model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]), loader)
        print(res.suggestion); res.plot("lr.png")
        for x, y in loader: ...        # the same batches, weights, optimizer state and RNG as without lr_find

    Args:
        model: the module(s) being trained (parameters, buffers and ``training`` flags are held), or ``None``.
        optimizer: its optimizer; every param group gets the sweep's lr.
        loss_fn: ``batch -> scalar loss`` (forward only): ``lr_find`` runs ``zero_grad``, ``backward`` and
            ``optimizer.step()`` (through ``scaler`` if given).
        data: where batches come from: a ``DataLoader`` or any re-iterable (a list of batches), iterated afresh when
            it runs out. Its generators (``loader.generator``, the sampler's) are put back afterwards.
        train_step: instead of ``loss_fn``: ``batch -> loss`` running a whole iteration itself (gradient clipping,
            accumulation, AMP...), calling ``optimizer.step()`` once.
        schedulers, scaler, generators: more state to put back (LR schedulers and other objects with
            ``state_dict``, a ``GradScaler``, ``torch.Generator`` objects your code draws from).
        rewind: your :class:`~torchrewind.Rewind` on ``optimizer``, if you have one: the sweep goes through it as an
            undone branch (needs ``capacity >= num_steps``). Without it ``lr_find`` holds the state in a Rewind of
            its own; if another Rewind is attached to ``optimizer``, pass it here, or its history records the sweep.
        lr_min, lr_max, num_steps, mode: the sweep: ``"exp"`` (geometric) or ``"linear"``.
        beta: smoothing of the recorded loss (exponential moving average, bias-corrected).
        diverge: stop once the smoothed loss exceeds ``diverge`` times its best (``None``: never).
        rule: the suggestion :attr:`LRFindResult.suggestion` reports: ``"valley"``, ``"steepest"`` or ``"minimum"``
            (all three are in ``.suggestions``).
        skip_start, skip_end: points left out of the suggestions at either end (the average is still warming up at
            the start).
        apply: after restoring, set every param group's ``lr`` to the suggestion (if there is one).

    Returns: an :class:`LRFindResult`.
    """
    who = "lr_find"
    check_step_fns(loss_fn, train_step, who)
    check_iterable(data, who)
    sweep = LRSweep(lr_min, lr_max, num_steps, mode, beta, diverge, who)
    check_choice("rule", rule, RULES, who)
    check_int("skip_start", skip_start, 0, who)
    check_int("skip_end", skip_end, 0, who)
    check_bool("apply", apply, who)
    gens, objs = data_state(data)
    t0 = time.perf_counter()
    hold = StateHold(model, optimizer, schedulers=schedulers, scaler=scaler, generators=[*generators, *gens],
                     objects=objs, rewind=rewind, steps=num_steps, who=who)  # fmt: skip
    hold_s = time.perf_counter() - t0
    try:
        batches = cycle(data)
        for i in range(sweep.num_steps):
            lr = sweep.lr(i)
            set_hparam(optimizer, "lr", lr)
            loss = run_step(optimizer, next(batches), loss_fn, train_step, scaler)
            if not sweep.record(lr, loss):
                break
        del batches
    finally:
        t1 = time.perf_counter()
        try:
            hold.restore()
        finally:
            hold.close()
        hold_s += time.perf_counter() - t1
    res = sweep.result(rule, skip_start, skip_end, seconds=time.perf_counter() - t0, hold_seconds=hold_s)
    if apply and res.suggestion is not None:
        set_hparam(optimizer, "lr", res.suggestion)
    return res


def _pyplot(path: Any, ax: Any) -> Any:
    try:
        import matplotlib

        if path is not None and ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plotting needs matplotlib: pip install 'torchrewind[plot]'") from e
    return plt
