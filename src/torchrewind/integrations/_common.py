"""What the framework callbacks (Lightning, Hugging Face) share, framework-agnostic: argument checks at construction,
the Rewind and guard built when training starts, the loss of an optimizer step summed over its micro-batches, and
the callback's state for the framework's checkpoint (a resumed run takes the guard decisions the uninterrupted one
would). Each adapter maps its framework's events onto these."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, Union

import torch

from .._checks import check_bool, check_choice, check_int, check_optional_int, check_type
from ..errors import RewindTypeError, RewindValueError
from ..policies import Guard, NonFiniteGuard, SpikeGuard
from ..policies._state import VERSION
from ..rewind import Rewind
from ..trajectory import Trajectory

DEFAULT_ROLLBACK = 1  # each history slot is a full copy of parameters + optimizer state: keep large runs affordable
GUARDS: dict[str, type[Guard]] = {"spike": SpikeGuard, "nonfinite": NonFiniteGuard}
OWN_REWIND_ARGS = ("model", "optimizer", "schedulers", "scaler", "capacity", "rng")
GuardFactory = Callable[[Rewind], Guard]
GuardSpec = Union[str, GuardFactory, None]


class GuardedTraining:
    """The core of a framework callback: mix it in before the framework's callback class, call
    :meth:`_configure` from ``__init__``, :meth:`_start` when training starts, :meth:`_add_loss` per micro-batch,
    ``self.guard.before_step()`` / :meth:`_judge` around each optimizer step, :meth:`close` at the end.

    Attributes: ``log`` (the decision :class:`~torchrewind.Trajectory`, from the start), ``rewind`` and ``guard``
    (built by :meth:`_start`), ``last_step_stood``, ``capacity``, ``rng``, ``guard_kwargs``, ``rewind_kwargs``.

    Example (an adapter)::

        class MyCallback(GuardedTraining, FrameworkCallback):
            def __init__(self, guard="spike", **kw): self._configure("MyCallback", "MyFramework", guard, **kw)
            def on_train_start(self, model, opt, sched): self._start(model, opt, [sched], None)
    """

    rewind: Rewind | None
    guard: Guard | None

    def _configure(
        self,
        framework: str,
        guard: GuardSpec,
        capacity: int | None,
        rng: bool | str,
        log: Trajectory | None,
        rewind_kwargs: Any,
        guard_kwargs: dict[str, Any],
        *,
        factories: bool,
    ) -> None:
        """Validate everything at construction (a typo fails before a long setup) and set the attributes."""
        name = type(self).__name__
        if not factories:
            check_choice("guard", guard, tuple(GUARDS), name)
        elif not (guard is None or (guard in GUARDS if isinstance(guard, str) else callable(guard))):
            raise (RewindValueError if isinstance(guard, str) else RewindTypeError)(
                f"{name}: guard must be one of {', '.join(map(repr, GUARDS))}, None, or a factory taking the Rewind "
                f"and returning a guard; got {guard!r}."
            )
        check_optional_int("capacity", capacity, 1, name)
        check_type("rewind_kwargs", rewind_kwargs, (dict, type(None)), name, "a dict")
        for key in OWN_REWIND_ARGS:
            if key in (rewind_kwargs or {}):
                raise RewindValueError(f"{name}: rewind_kwargs cannot set {key!r}; the callback sets it.")
        if log is not None:
            check_type("log", log, Trajectory, name, "a torchrewind.Trajectory")
        if not isinstance(guard, str) and guard_kwargs:
            raise RewindValueError(
                f"{name}: options {sorted(guard_kwargs)} need guard='spike' or 'nonfinite' (a factory builds its "
                "guard itself; guard=None has none)."
            )
        capacity = _history_capacity(name, framework, guard, capacity, guard_kwargs)
        check_choice("rng", rng, (True, False, "all"), name)
        if isinstance(guard, str):
            _check_guard_kwargs(name, GUARDS[guard], capacity, guard_kwargs)
        self.guard_spec: GuardSpec = guard
        self.capacity, self.rng = capacity, rng
        self.rewind_kwargs = dict(rewind_kwargs or {})
        self.guard_kwargs = guard_kwargs
        self.log = log if log is not None else Trajectory()
        self.rewind = None  # Rewind, built when training starts
        self.guard = None  # the guard, built when training starts
        self.last_step_stood: bool | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss: torch.Tensor | float | None = None  # this optimizer step's loss, summed over micro-batches
        self._resume: dict[str, Any] | None = None  # a loaded state, applied when the guard is built
        self._running = False  # between _start and close: a loaded state goes straight into the guard

    # -- training starts: a Rewind and a guard on the framework's objects -------------------------------------------
    def _start(self, model: Any, optimizer: torch.optim.Optimizer, schedulers: list[Any], scaler: Any) -> None:
        self.close()  # a second fit()/train(): the optimizer and schedulers may be new objects
        self.rewind = self.guard = None  # drop the old Rewind first: the new one adopts the tensors it held
        self.rewind = Rewind(
            model,
            optimizer,
            schedulers=schedulers,
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            capacity=self.capacity,
            rng=self.rng,
            **self.rewind_kwargs,
        )
        try:
            spec = self.guard_spec
            if isinstance(spec, str):
                self.guard = GUARDS[spec](self.rewind, log=self.log, **self.guard_kwargs)
            elif spec is not None:
                self.guard = _from_factory(spec, self.rewind, type(self).__name__)
                self.log = self.guard.log
            if self._resume is not None:
                self._apply_state(self._resume)
            else:
                self.last_step_stood = None
        except BaseException:
            self.close()  # leave the optimizer without our hooks
            self.rewind = self.guard = None
            raise
        self._resume = None
        self._optimizer = optimizer
        self._loss = None
        self._running = True

    # -- the loss of an optimizer step ------------------------------------------------------------------------------
    def _add_loss(self, loss: torch.Tensor | float) -> None:
        """Add one micro-batch's loss (as the framework reports it: already divided for gradient accumulation), on
        the device: no sync per micro-batch."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def _take_loss(self) -> torch.Tensor | float | None:
        loss, self._loss = self._loss, None
        return loss

    def _judge(self, loss: torch.Tensor | float) -> bool:
        """``guard.after_step(loss)`` for the step the framework just took; remembers whether it stands."""
        assert self.guard is not None
        self.last_step_stood = self.guard.after_step(loss)
        return self.last_step_stood

    def close(self) -> None:
        """Remove the hooks this callback put on the optimizer (``.rewind`` and ``.guard`` stay for inspection; an
        ``undo()`` still works). Training's end and the next training start call it."""
        self._running = False
        if self.rewind is not None:
            self.rewind.close()
        if self.guard is not None:
            self.guard.close()

    # -- state, for the framework's checkpoint ---------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The callback's state, as plain data: the guard's (:meth:`~torchrewind.policies.Guard.state_dict`: detector
        statistics, cool-down, roll-back budget, counters, the decision log) and whether the last step stood. The
        undo history is not in it: after a resume, a roll-back reaches back at most to the resume point.

        Example::

            cb.state_dict()["guard"]["detector"]["count"]      # losses the spike detector has seen
        """
        if self._resume is not None:  # loaded, training not started yet: keep it as loaded
            return self._resume
        guard = self.guard.state_dict() if self.guard is not None else None
        return {"type": type(self).__name__, "version": VERSION,
                "guard_type": type(self.guard).__name__ if self.guard is not None else None, "guard": guard,
                "log": None if guard is not None else self.log.state_dict(), "last_step_stood": self.last_step_stood,
                **self._extra_state()}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the guard built when training starts (or now, during training). Refuses a
        state of another guard type or with other settings (RewindError, nothing changed).

        Example::

            cb.load_state_dict(torch.load("ckpt.pt")["callbacks"]["RewindCallback"])
        """
        sd = self._check_state(state_dict)
        if self._running:
            self._apply_state(sd)
        else:
            self._resume = sd  # the guard is built when training starts

    def _check_state(self, sd: Any) -> dict[str, Any]:
        name = type(self).__name__
        who = f"{name}.load_state_dict"
        check_type("state_dict", sd, dict, who, f"a dict returned by {name}.state_dict()")
        if sd.get("type") != name or sd.get("version") != VERSION:
            raise RewindValueError(
                f"{who}: not a {name} state of format version {VERSION} (type {sd.get('type')!r}, version "
                f"{sd.get('version')!r})."
            )
        missing = [k for k in ("guard_type", "guard", "log", "last_step_stood") if k not in sd]
        if missing:
            raise RewindValueError(f"{who}: the state lacks {missing}; pass what {name}.state_dict() returned.")
        saved, spec = sd["guard_type"], self.guard_spec
        want = GUARDS[spec].__name__ if isinstance(spec, str) else None if spec is None else saved  # factory: later
        if saved != want:
            raise RewindValueError(
                f"{who}: the checkpoint's state was saved by a callback guarding with {saved or 'no guard'}, this one "
                f"guards with {want or 'no guard'}; build the callback as for the checkpoint's run."
            )
        if sd["last_step_stood"] is not None:
            check_bool("last_step_stood", sd["last_step_stood"], who)
        return sd

    def _apply_state(self, sd: dict[str, Any]) -> None:
        if self.guard is not None:
            if sd["guard"] is None:
                raise RewindValueError(f"{type(self).__name__}.load_state_dict: the state has no guard state.")
            self.guard.load_state_dict(sd["guard"])  # all or nothing; refuses other settings
        elif sd["log"] is not None:
            self.log.load_state_dict(sd["log"])
        self._load_extra_state(sd)
        self.last_step_stood = sd["last_step_stood"]


# -- construction checks ---------------------------------------------------------------------------------------------
def _history_capacity(name: str, framework: str, guard: Any, capacity: int | None, guard_kwargs: dict) -> int:
    """The Rewind's capacity; for ``"spike"`` also sets ``guard_kwargs["rollback"]``. The step the framework just
    took occupies one history slot, so a roll-back of ``rollback`` steps needs ``capacity >= rollback + 1``."""
    if guard != "spike":
        return 1 if capacity is None else capacity
    rollback = guard_kwargs.get("rollback")
    if rollback is None:
        rollback = DEFAULT_ROLLBACK if capacity is None else capacity - 1
    check_int("rollback", rollback, 1, f"{name}('spike')",
              f" With {framework} the just-taken step occupies one history slot, so capacity must be >= rollback + 1"
              f" >= 2 (capacity={capacity}).")  # fmt: skip
    if capacity is None:
        capacity = rollback + 1
    elif capacity < rollback + 1:
        raise RewindValueError(
            f"{name}('spike'): capacity={capacity} is too small for rollback={rollback}: the step {framework} just "
            f"took occupies one history slot; use capacity >= {rollback + 1}."
        )
    guard_kwargs["rollback"] = rollback
    return capacity


def _check_guard_kwargs(name: str, cls: type[Guard], capacity: int, guard_kwargs: dict[str, Any]) -> None:
    """Build the guard once on a throwaway Rewind: unknown names and bad values fail now, not after a long setup."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "rewind", "log"}
    unknown = sorted(set(guard_kwargs) - accepted)
    if unknown:
        raise RewindTypeError(f"{name}: {cls.__name__} has no option(s) {unknown}; valid: {sorted(accepted)}.")
    p = torch.zeros(1, requires_grad=True)
    rw = Rewind(None, torch.optim.SGD([p], lr=0.1), capacity=capacity, rng=False)
    try:
        cls(rw, **guard_kwargs).close()
    finally:
        rw.close()


def _from_factory(factory: GuardFactory, rewind: Rewind, name: str) -> Guard:
    guard = factory(rewind)
    if not isinstance(guard, Guard) or guard.rw is not rewind:
        raise RewindTypeError(
            f"{name}: the guard factory must return a guard (NonFiniteGuard, SpikeGuard, ...) built on the Rewind it "
            f"is given, got {type(guard).__name__}."
        )
    rollback = getattr(guard, "rollback", None)
    if isinstance(rollback, int) and rewind.capacity < rollback + 1:
        raise RewindValueError(
            f"{name}: {type(guard).__name__}(rollback={rollback}) needs capacity >= {rollback + 1} here (the step "
            f"just taken occupies one history slot); pass capacity={rollback + 1} to {name}, or build the guard "
            f"with rollback={rewind.capacity - 1}."
        )
    return guard


def json_args(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that survive JSON (for a framework that rebuilds a callback from them)."""
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out
