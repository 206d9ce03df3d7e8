"""The training state at one moment, held in memory and put back bit for bit: what every tuner starts from.

A tuner (LR range test, batch-size search, branch-and-pick) takes real optimizer steps on the live model and must
leave no trace. :class:`StateHold` records the start once and :meth:`StateHold.restore` writes it back as often as
needed. Two ways to hold it, both through Rewind's public interface:

* a dedicated :class:`~torchrewind.Rewind` (``auto=False``: the tuner's steps are not recorded, so one recorded point
  outlives a sweep of any length) — one memcpy per arena to snapshot and to restore;
* the user's own Rewind (``rewind=``): ``snapshot()`` at the start and ``rollback_to(start_step)`` at the end, so its
  step counter and tiers see the tuner's steps as an undone branch. Its history must hold the start point for the
  steps taken between restores (``capacity >= steps``), which is checked before anything changes.

On top of that, whatever a Rewind does not hold or may not have been told about: every RNG (torch CPU/CUDA, Python's
``random``, NumPy's global generator once NumPy is imported), the data source's ``torch.Generator`` objects and
stateful samplers (:mod:`torchrewind.tuners.data`), the modules' ``training`` flags, and — with the user's Rewind —
``.grad`` and the given schedulers and scaler.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from .._checks import check_choice, check_type
from ..errors import RewindError, RewindTypeError, RewindValueError
from ..rewind import Rewind


class StateHold:
    """Hold the whole training state now; :meth:`restore` puts it back bit for bit, :meth:`close` lets it go.

    Example::

        with StateHold(model, opt, schedulers=[sched], generators=[loader.generator]) as hold:
            for x, y in trial_batches: ...; opt.step()      # anything
            hold.restore()                                   # as if it never ran (also on exit)

    Args:
        model: the module(s) whose parameters, buffers and ``training`` flags are held (``None``: only the
            optimizer's parameters).
        optimizer: the optimizer whose state and ``param_groups`` are held.
        schedulers: LR schedulers and any object with ``state_dict``/``load_state_dict``.
        scaler: a ``torch.amp.GradScaler``.
        generators: ``torch.Generator`` objects to put back (e.g. a DataLoader's).
        objects: more objects with ``state_dict``/``load_state_dict`` held by value (e.g. a stateful sampler).
        rewind: hold through this (the user's) Rewind instead of a dedicated one; it must be attached to
            ``optimizer`` and keep ``capacity >= steps``.
        steps: the most optimizer steps taken between two restores (only checked against ``rewind``).
        storage: the dedicated Rewind's ``storage`` (``"host"`` keeps the copy of a CUDA state in pinned CPU memory,
            e.g. while probing how much GPU memory a step needs).
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module] | None,
        optimizer: torch.optim.Optimizer,
        *,
        schedulers: Sequence[Any] | Any = (),
        scaler: torch.amp.GradScaler | None = None,
        generators: Sequence[torch.Generator] = (),
        objects: Sequence[Any] = (),
        rewind: Rewind | None = None,
        steps: int = 1,
        storage: str = "device",
        who: str = "StateHold",
    ) -> None:
        check_type("optimizer", optimizer, torch.optim.Optimizer, who, "a torch.optim.Optimizer")
        check_choice("storage", storage, ("device", "host"), who)
        modules = _modules(model, who)
        schedulers = _as_list(schedulers)
        for i, g in enumerate(generators):
            check_type(f"generators[{i}]", g, torch.Generator, who, "a torch.Generator")
        for o in [*schedulers, *objects] + ([scaler] if scaler is not None else []):
            if not (callable(getattr(o, "state_dict", None)) and callable(getattr(o, "load_state_dict", None))):
                raise RewindTypeError(f"{who}: {type(o).__name__} has no state_dict()/load_state_dict() to hold.")
        if rewind is not None:
            check_type("rewind", rewind, Rewind, who, "a torchrewind.Rewind")
            if rewind.optimizer is not optimizer:
                raise RewindValueError(f"{who}: rewind= is attached to a different optimizer than the one given.")
            if rewind.capacity < steps:
                raise RewindValueError(
                    f"{who} takes up to {steps} optimizer step(s) before it restores, but the Rewind passed as "
                    f"rewind= keeps {rewind.capacity} (its capacity), so the start point would be evicted. "
                    f"Build it with capacity >= {steps}, take fewer steps, or call {who} without rewind= "
                    "before you build your Rewind (it then holds the start in a Rewind of its own)."
                )
        self.who = who
        self.optimizer = optimizer
        self._modules = modules
        self._own = rewind is None
        self._generators = list(dict.fromkeys(generators))  # unique, in order
        self._objects = list(objects)
        if rewind is not None:
            # the user's Rewind restores what it tracks; the rest (schedulers, scaler, grads) by value here, which is
            # exact and harmless if it tracks them too
            self._objects += [*schedulers] + ([scaler] if scaler is not None else [])
        if rewind is None:
            self.rewind = Rewind(
                modules or None, optimizer, schedulers=schedulers, scaler=scaler, capacity=1, rng=False, grads=True,
                redo=False, auto=False, storage=storage, group=None,
            )  # fmt: skip
        else:
            self.rewind = rewind
        self.closed = False
        self.retake()

    def retake(self) -> None:
        """Hold the state as it is now instead (e.g. the next round of a tuner): one snapshot, no new Rewind.

        Example::

            hold = StateHold(model, opt)
            ...; hold.retake()       # training went on: hold the state of now
        """
        if self.closed:
            raise RewindError(f"{self.who}: the held state was already released (close()).")
        self._flags = [(m, m.training) for top in self._modules for m in top.modules()]
        self._params = list(dict.fromkeys(p for g in self.optimizer.param_groups for p in g["params"]))
        self._grads = None if self._own else [None if p.grad is None else p.grad.detach().clone() for p in self._params]
        self._rng = _capture_rng()
        self._gen_states = [g.get_state() for g in self._generators]
        self._states = [copy.deepcopy(o.state_dict()) for o in self._objects]
        self.rewind.snapshot()  # own Rewind (auto=False, capacity 1): replaces its one point
        self.start_step = self.rewind.step

    @property
    def nbytes(self) -> int:
        """Bytes this hold keeps on top of the live state (the dedicated Rewind's snapshot; 0 with ``rewind=``)."""
        return self.rewind.nbytes if self._own and not self.closed else 0

    def restore(self) -> None:
        """Put the held state back, bit for bit. Can be called any number of times before :meth:`close`."""
        if self.closed:
            raise RewindError(f"{self.who}: the held state was already released (close()).")
        if self._own:
            self.rewind.revert()  # the one recorded point: auto=False recorded nothing since
        elif self.rewind.step == self.start_step:
            # no step since the hold (e.g. a forward pass raised): rollback_to would see nothing to do, but a forward
            # may have changed buffers; the point recorded at the hold is still the current one
            self.rewind.revert()
            self.rewind.snapshot()
        else:
            got = self.rewind.rollback_to(self.start_step)
            if got != self.start_step:  # cannot happen with capacity >= steps; never continue from a wrong state
                raise RewindError(
                    f"{self.who}: the Rewind no longer holds step {self.start_step} (restored {got}); its history "
                    "was changed while the tuner ran."
                )
            # Record the restored point again, as the boundary of the next step: otherwise that step's pre-hook would
            # record the live state over it *after* the next trial's hyperparameter edits and forward pass (a clean
            # state's record replaces the current point), and the start would be lost for the following restore.
            self.rewind.snapshot()
        if not self._own:
            with torch.no_grad():
                for p, g in zip(self._params, self._grads):
                    p.grad = None if g is None else g.clone()
        for o, sd in zip(self._objects, self._states):
            o.load_state_dict(copy.deepcopy(sd))  # a copy: load_state_dict may keep references to its argument
        for g, s in zip(self._generators, self._gen_states):
            g.set_state(s)
        _restore_rng(self._rng)
        for m, flag in self._flags:
            m.training = flag

    def close(self) -> None:
        """Release the held copy (a dedicated Rewind is closed and dropped; the user's is left as it is)."""
        if self.closed:
            return
        self.closed = True
        if self._own:
            self.rewind.close()
        else:
            self.rewind.drop_pending()  # the next step records its own point, as after any restore
        self.rewind = None  # type: ignore[assignment]
        self._grads = self._states = None  # type: ignore[assignment]

    def __enter__(self) -> StateHold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if not self.closed:
                self.restore()
        finally:
            self.close()


def _modules(model: Any, who: str) -> list[torch.nn.Module]:
    if model is None:
        return []
    mods = [model] if isinstance(model, torch.nn.Module) else list(model) if isinstance(model, Iterable) else None
    if mods is None or not all(isinstance(m, torch.nn.Module) for m in mods):
        raise RewindTypeError(
            f"{who}: model must be an nn.Module, an iterable of them, or None; got {type(model).__name__}."
        )
    return mods


def _as_list(schedulers: Any) -> list[Any]:
    if schedulers is None:
        return []
    if hasattr(schedulers, "state_dict") and hasattr(schedulers, "load_state_dict"):
        return [schedulers]
    return list(schedulers)


def _capture_rng() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")  # only if something imported it: numpy is not a dependency
    if np is not None:
        out["numpy"] = np.random.get_state()
    return out


def _restore_rng(saved: dict[str, Any]) -> None:
    torch.set_rng_state(saved["cpu"])
    random.setstate(saved["python"])
    if "cuda" in saved:
        torch.cuda.set_rng_state_all(saved["cuda"])
    if "numpy" in saved:
        sys.modules["numpy"].random.set_state(saved["numpy"])
