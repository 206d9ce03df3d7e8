"""What every guard shares: the decision it takes for an iteration, the one driver that carries a decision out, the
framework-hook protocol, the decision log and the loss agreement across ranks.

A guard replaces the ``optimizer.step()`` line of a plain loop, or judges a step a framework took::

    guard = SpikeGuard(Rewind(model, opt, capacity=8))
    loss.backward()
    guard.step(loss)                                             # the guard steps, or not
    guard.before_step(); opt.step(); guard.after_step(loss)      # ... or judges the framework's step

A guard subclass says *what* to do with :meth:`Guard.decide`; the driver here does it, the same way for both
calls, so ``after_step`` leaves bit for bit the state ``step`` would (given the same undo point).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .._checks import check_bool, check_int, check_type
from ..distributed import all_sum, local
from ..errors import RewindError
from ..rewind import Rewind
from ..skipping import BatchSkips, SkippableIterator
from ..trajectory import Event, Trajectory
from ._common import agreed_loss, check_rewind, grad_sq, loss_value
from ._state import check_state, header, load_all
from .lr import OneStepLrScale, lrs, scale_lrs, set_lrs

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    """What a guard does with an iteration's step: ``"apply"`` it, ``"skip"`` it (not applied), or ``"roll_back"``
    (not applied, and ``steps`` earlier steps undone, the next ``skip_batches`` batches dropped).

    Example::

        def decide(self, loss, grad_norm):
            return Decision.skip("loss too high") if loss > 10 else Decision.apply()
    """

    action: str
    reason: str = ""
    steps: int = 0
    skip_batches: int = 0

    @classmethod
    def apply(cls, reason: str = "") -> Decision:
        return _APPLY if not reason and cls is Decision else cls("apply", reason)

    @classmethod
    def skip(cls, reason: str) -> Decision:
        return cls("skip", reason)

    @classmethod
    def roll_back(cls, reason: str, steps: int, skip_batches: int = 0) -> Decision:
        return cls("roll_back", reason, steps, skip_batches)


_APPLY = Decision("apply")  # the common case, allocated once



def nonfinite_reason(loss: float, grad_norm: float | None) -> str:
    """Why an iteration's loss and (global) gradient norm are not finite ("" if they are): the words every guard and
    the triage log."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "non-finite gradient"
    return ""

class Guard:
    """Base of the guards (:class:`~torchrewind.NonFiniteGuard`, :class:`~torchrewind.SpikeGuard`): a guard judges
    each iteration's step from its loss (and global gradient norm) with :meth:`decide`, and this class carries the
    decision out for :meth:`step` (the guard takes the step) and :meth:`after_step` (a framework took it).

    Shared by every guard: the non-finite checks (``check_grads``: gradient norm; ``check_params``: parameters after
    the step, undone if any is non-finite), the count of iterations in a row whose step was not applied
    (``max_consecutive`` of them raise), batch skipping (:meth:`wrap`), the framework hooks, the log, and
    :meth:`state_dict`.

    Example (a custom guard)::

        class LossCap(Guard):
            def decide(self, loss, grad_norm):
                why = self.nonfinite_reason(loss, grad_norm) or ("loss above 10" if loss > 10 else "")
                return Decision.skip(why) if why else Decision.apply()
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        check_grads: bool = True,
        check_params: bool = False,
        max_consecutive: int = 10,
        log: Trajectory | None = None,
    ) -> None:
        who = type(self).__name__
        self.rw = check_rewind(rewind, who)
        self.check_grads = check_bool("check_grads", check_grads, who)
        self.check_params = check_bool("check_params", check_params, who)
        self.max_consecutive = check_int("max_consecutive", max_consecutive, 1, who)
        if log is not None:
            check_type("log", log, Trajectory, who, "a torchrewind.Trajectory")
        self.optimizer = self.rw.optimizer
        self.log = log if log is not None else Trajectory()
        self.iteration = 0  # iterations judged (one per step()/after_step() call)
        self.steps = 0  # steps applied and standing
        self.consecutive = 0  # iterations in a row whose step was not applied
        self.rollbacks = 0
        self._skips = BatchSkips()
        self._top = False  # the wrapped iterator recorded a point at the top of this iteration, before forward
        self._mark: int | None = None  # rw.step at before_step(): after_step() sees whether the step ran
        self._scaled = OneStepLrScale(self.optimizer)  # lr_scale for a framework's step
        self.signals: tuple[float, ...] = ()  # this iteration's _signals(), agreed across ranks

    # -- what a guard decides (subclasses) ----------------------------------------------------------------------
    def decide(self, loss: float, grad_norm: float | None) -> Decision:
        """What to do with this iteration's step, given the loss (agreed across ranks) and the global gradient
        norm (None when not measured, or when the loss is not finite). Must not change anything."""
        raise NotImplementedError

    @property
    def lr_scale(self) -> float:
        """The multiplier the next step's learning rates get (1.0: none)."""
        return 1.0

    def nonfinite_reason(self, loss: float, grad_norm: float | None) -> str:
        """Why this iteration's numbers are not finite ("" if they are)."""
        return nonfinite_reason(loss, grad_norm)

    def nonfinite_decision(self, reason: str) -> Decision:
        """What to do about a non-finite loss, gradient, or a step that made parameters non-finite: skip it."""
        return Decision.skip(reason)

    def _signals(self) -> tuple[float, ...]:
        """Numbers this guard measures for its decision besides the loss and gradient norm, before :meth:`decide`;
        they are summed over the Rewind's ranks (in the loss's collective; a sum, not a mean, so one rank's jump is
        not diluted by the others on a large world) and :meth:`decide` reads them from ``self.signals``."""
        return ()

    def _stepped(self, loss: float, grad_norm: float | None, scale: float) -> None:
        """A step taken at lr ``scale`` stands (learn from it). The Rewind recorded the undo point before."""

    def _rolling_back(self, iteration: int, reason: str) -> None:
        """Before a roll-back's undo (e.g. charge a budget; may raise)."""

    def _rolled_back(self, d: Decision, steps: int) -> dict[str, Any]:
        """After a roll-back's undo (``steps``: how many earlier steps it undid); returns what to add to the event's
        ``extra``."""
        return {}

    # -- the plain loop ---------------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float, closure: Callable[[], Any] | None = None) -> bool:
        """Decide for this iteration, after backward: apply ``optimizer.step(closure)`` (at :attr:`lr_scale`), skip
        it, or roll back. Returns whether a step was applied.

        Example::

            loss.backward()
            if guard.step(loss): sched.step()
        """
        return self._judge(loss, _GuardSteps(self, closure), f"{type(self).__name__}.step(loss)")

    def wrap(self, iterable: Iterable[T]) -> SkippableIterator[T]:
        """Wrap a data iterable so the guard can skip batches (SpikeGuard's ``skip_batches``) and undo a whole
        iteration. Each batch it hands out is preceded by a recorded point (``rw.snapshot()``, the one the step will
        be undone to), taken before the forward pass: a skipped or rolled-back iteration then also takes back what
        its forward did — BatchNorm running statistics (a NaN batch would poison them for good), RNG draws.
        Without it, a skip means "the next batches' steps are not applied", and only the steps are undone.

        Example::

            for x, y in guard.wrap(loader): ...
        """
        if isinstance(iterable, _RecordingIterator) and iterable._guard is self:
            return self._skips.wrap(iterable)
        return self._skips.wrap(_RecordingIterator(iterable, self))

    def _iteration_starts(self) -> None:
        """The wrapped iterator handed out a batch: record the point this iteration is undone to, before forward
        (a framework's own step hooks find it recorded and keep it)."""
        if self.rw.in_step:  # pragma: no cover - a loader advanced from inside optimizer.step()
            return
        self.rw.snapshot()
        self._top = True

    # -- framework hooks (Lightning, HF Trainer, any loop that calls optimizer.step() itself) ------------------
    def before_step(self) -> None:
        """For a loop that calls ``optimizer.step()`` itself: call after backward, before that step (inside or
        outside ``step(closure)``). Makes the step undoable and applies :attr:`lr_scale` to that one step (the lrs
        are put back right after it). Pair it with :meth:`after_step`.

        Example::

            loss.backward(); guard.before_step()
            optimizer.step()                  # taken by the framework
            guard.after_step(loss)            # same decision as guard.step(loss); undoes the step if needed
        """
        rw = self.rw
        if not rw.in_step:  # inside step(closure) the pre-step hook already recorded, before the closure ran
            rw.ensure_recorded()
        self._mark = rw.step
        self._scaled.apply(self.lr_scale)

    def after_step(self, loss: torch.Tensor | float) -> bool:
        """Decide, after a framework's ``optimizer.step()``, for that step: ``loss`` is the iteration's loss
        (computed before the step) and the gradients must still be in ``.grad``. Takes the same decision as
        :meth:`step` and leaves the same state, bit for bit, given the same undo point: a step that should not
        have been applied is undone (to where the step was recorded: if that was before forward, e.g. Lightning's
        pre-step hook, a skipped batch's RNG draws and BatchNorm statistics are undone too).
        Returns whether the step stands. Needs :meth:`before_step` before the step.

        Example::

            guard.before_step(); optimizer.step()
            if not guard.after_step(loss): print("step undone")
        """
        who = f"{type(self).__name__}.after_step(loss)"
        if self._mark is None:
            raise RewindError(
                f"{who} needs before_step() to be called after backward and before optimizer.step() in the same "
                "iteration (use step(loss) if the guard should take the step itself)."
            )
        stepped = self.rw.step > self._mark
        self._mark = None
        self._scaled.restore()  # the step raised or never ran: do not leave the scaled lrs behind
        if not stepped:  # e.g. GradScaler skipped optimizer.step() because of inf/NaN gradients
            # the point before_step() recorded belongs to no step: the next step records afresh (forward since
            # then changed buffers, RNG, the scaler)
            self.rw.drop_pending()
            v = loss_value(loss, who)
            it = self._next_iteration()
            self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer),
                               "optimizer.step() was not called (e.g. GradScaler found inf/NaN)"))  # fmt: skip
            return False
        try:
            return self._judge(loss, _FrameworkStepped(self), who)
        finally:
            self._scaled.used = None

    def cancel(self) -> None:
        """Forget a :meth:`before_step` whose iteration will not be judged (e.g. the framework skipped the batch)."""
        self._mark = None
        self._scaled.restore()

    def close(self) -> None:
        """Remove the optimizer hook :meth:`before_step` installed (the guard's log and statistics stay)."""
        self.cancel()
        self._scaled.close()

    # -- the driver: one iteration, one decision, carried out ----------------------------------------------------
    def _next_iteration(self) -> int:
        it = self.iteration
        self.iteration += 1
        return it

    def _judge(self, loss: Any, how: _Stepping, who: str) -> bool:
        # the loss (and the squared gradient norm) agreed over the ranks in one collective, validated before the
        # iteration counts
        # a subclass's own signals (e.g. SpikeGuard's buffer change) ride along, summed over the ranks
        own = self._signals()
        if self.check_grads:
            v, sq, *sig = agreed_loss(self.rw, loss, who, (grad_sq(self.optimizer, self.rw.group), *own))
            gn: float | None = math.sqrt(sq) if math.isfinite(v) else None
        else:
            v, *sig = agreed_loss(self.rw, loss, who, own)
            gn = None
        self.signals = tuple(sig)
        it = self._next_iteration()
        if self._skips.take_queued():  # a batch skipped after a roll-back, with no wrapped iterator
            undone = how.discard()
            self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer),
                               "batch skipped after a roll-back", undone=undone))  # fmt: skip
            self._top = False
            return False
        return self._carry_out(self.decide(v, gn), it, v, gn, how)

    def _carry_out(self, d: Decision, it: int, v: float, gn: float | None, how: _Stepping) -> bool:
        top, self._top = self._top, False
        if d.action == "apply":
            return self._apply(d, it, v, gn, how)
        if d.action == "skip":
            return self._skip(d, it, v, gn, self._discard(how, top))
        if d.action == "roll_back":
            return self._roll_back(d, it, v, gn, how.discard(), top)
        raise RewindError(f"{type(self).__name__}.decide returned an unknown action {d.action!r}.")

    def _discard(self, how: _Stepping, top: bool) -> int:
        """Make sure this iteration's step is not applied; with a point recorded before its forward (:meth:`wrap`),
        also take back what the forward did (BatchNorm statistics, RNG). Returns the steps undone."""
        undone = how.discard()
        if top and not undone:
            self.rw.revert()  # back to the top of the iteration (undoing a step taken already went there too)
        return undone

    def _apply(self, d: Decision, it: int, v: float, gn: float | None, how: _Stepping) -> bool:
        scale = how.scale
        used = how.take()
        if self.check_params and not _params_finite(self.optimizer, self.rw):
            undone = how.undo()
            d2 = self.nonfinite_decision("step made parameters non-finite: undone")
            if d2.action == "roll_back":
                return self._roll_back(d2, it, v, None, undone)
            return self._skip(d2, it, v, None, undone)
        self.consecutive = 0
        self.steps += 1
        reason = d.reason or (f"cool-down lr x{scale:.3g}" if scale != 1.0 else "")
        self.log.add(Event(it, self.steps, "accepted", v, None, used, reason))
        self._stepped(v, gn, scale)
        return True

    def _skip(self, d: Decision, it: int, v: float, gn: float | None, undone: int) -> bool:
        self.consecutive += 1
        self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer), d.reason, undone=undone,
                           extra={"grad_norm": gn} if gn is not None else {}))  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            recent = "\n".join(f"  iteration {e.iteration}: {e.kind} ({e.reason})" for e in self.log.events[-5:])
            raise RewindError(
                f"{type(self).__name__}: {self.consecutive} consecutive iterations were not applied "
                f"(max_consecutive={self.max_consecutive}). Training is not recovering: lower the learning rate, "
                f"check the data, or raise max_consecutive. Recent events:\n{recent}"
            )
        return False

    def _roll_back(self, d: Decision, it: int, v: float, gn: float | None, undone: int, top: bool = False) -> bool:
        self._rolling_back(it, d.reason)
        n = self._undo_steps(d.steps)
        if top and not n and not undone:
            self.rw.revert()  # nothing to undo (no history yet): still take back this iteration's forward
        self._skips.skip(d.skip_batches)
        extra = self._rolled_back(d, n)
        self.consecutive = 0
        self.rollbacks += 1
        self.steps = max(self.steps - n, 0)
        # undone counts every undo this decision made: the failed step itself (undone) and the roll-back
        self.log.add(Event(it, self.steps, "rolled_back", v, None, lrs(self.optimizer), d.reason, undone=n + undone,
                           skipped_batches=d.skip_batches, extra={"grad_norm": gn, **extra}))  # fmt: skip
        return False

    def _undo_steps(self, k: int) -> int:
        """Go back ``k`` steps (fewer if the history is shorter); returns how many were undone. Beyond the device
        ring, from the host or disk tier (``rollback_to``: the newest point at or before, agreed across ranks)."""
        rw = self.rw
        near = len(rw)
        if k > near and (rw.tiers.host is not None or rw.tiers.disk is not None):
            start = rw.step
            held = [s for v in rw.held_steps().values() for s in v if s < start]
            if held:  # as far back as asked, or to the oldest point kept
                return start - rw.rollback_to(max(start - k, min(held)))
        n = min(k, near)
        if n:
            rw.undo(n)
        return n

    # -- state -----------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings a saved state must match (see :meth:`load_state_dict`)."""
        return {"check_grads": self.check_grads, "check_params": self.check_params,
                "max_consecutive": self.max_consecutive}  # fmt: skip

    def _parts(self) -> dict[str, Any]:
        """The guard's stateful pieces, by state key (None: this guard has none)."""
        return {"batches": self._skips, "log": self.log}

    def state_dict(self) -> dict[str, Any]:
        """The guard's state as plain data (``torch.save``-able, JSON-able): its settings, counters
        (iterations, steps, consecutive non-applied, roll-backs), pending batch skips, the pieces' state (detector
        statistics, cool-down, roll-back budget) and the decision log. Save it with the model and optimizer; a
        resumed run then takes the decisions the uninterrupted run would have. The undo history itself is not in
        it: after a resume, a roll-back reaches back at most to the resume point.

        Example::

            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, path)
            guard.load_state_dict(torch.load(path)["guard"])          # in the resumed run, before the first step
        """
        if self._mark is not None:
            raise RewindError(
                f"{type(self).__name__}.state_dict() between before_step() and after_step(): the step taken is not "
                "judged yet. Save after after_step()."
            )
        parts = {k: (p.state_dict() if p is not None else None) for k, p in self._parts().items()}
        return {**header(self, self.settings()), "iteration": self.iteration, "steps": self.steps,
                "consecutive": self.consecutive, "rollbacks": self.rollbacks, **parts}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`. It must come from the same kind of guard; with ``strict`` (the default) also
        with the same settings (those of the guard and of its detectors, cool-down and budget). ``strict=False``
        keeps this guard's settings and loads the counters and statistics. A malformed or mismatched state is
        refused with a RewindError that says what differs, before anything changes.

        Example::

            guard = SpikeGuard(Rewind(model, opt, capacity=4), rollback=3)
            guard.load_state_dict(torch.load("ckpt.pt")["guard"])
        """
        who = f"{type(self).__name__}.load_state_dict"
        if self._mark is not None:
            raise RewindError(f"{who} between before_step() and after_step(); load before the iteration starts.")
        parts = self._parts()
        sd = check_state(self, state_dict, self.settings(),
                         ("iteration", "steps", "consecutive", "rollbacks", *parts), strict, who)  # fmt: skip
        counters = {k: check_int(k, sd[k], 0, who) for k in ("iteration", "steps", "consecutive", "rollbacks")}
        load_all([(p, sd[k]) for k, p in parts.items() if p is not None and sd[k] is not None], strict)
        for k, v in counters.items():
            setattr(self, k, v)


class _RecordingIterator(SkippableIterator[T]):
    """A guard's wrapped data iterator: records the undo point before each batch it hands out (see Guard.wrap)."""

    def __init__(self, iterable: Iterable[T], guard: Guard) -> None:
        super().__init__(iterable)
        self._guard = guard

    def __next__(self) -> T:
        item = super().__next__()
        self._guard._iteration_starts()
        return item


# -- how this iteration's step is taken: by the guard (step) or already by a framework (after_step) --------------
class _Stepping:
    scale: float

    def take(self) -> tuple[float, ...]:
        """Take the step if it is not taken yet; returns the lrs it is taken with."""
        raise NotImplementedError

    def discard(self) -> int:
        """The decision is not to apply the step: make sure it is not applied. Returns the steps undone."""
        raise NotImplementedError

    def undo(self) -> int:
        """Undo the step just taken (its parameters are non-finite). Returns 1."""
        raise NotImplementedError


class _GuardSteps(_Stepping):
    """guard.step(loss): nothing is applied before the decision; the guard takes the step if it decides to."""

    def __init__(self, guard: Guard, closure: Callable[[], Any] | None) -> None:
        self.rw, self.optimizer, self.closure = guard.rw, guard.optimizer, closure
        self.scale = guard.lr_scale

    def take(self) -> tuple[float, ...]:
        opt = self.optimizer
        self.rw.ensure_recorded()  # before any lr scaling: an undo brings back the unscaled (scheduler's) lrs
        base = lrs(opt) if self.scale != 1.0 else None
        if base is not None:
            scale_lrs(opt, self.scale)
        used = lrs(opt)
        try:
            if self.closure is not None:
                opt.step(self.closure)
            else:
                opt.step()
        finally:
            if base is not None:
                set_lrs(opt, base)  # the lr factor is for this step only
        return used

    def discard(self) -> int:
        return 0

    def undo(self) -> int:
        self.rw.undo()
        return 1


class _FrameworkStepped(_Stepping):
    """guard.after_step(loss): the framework already took the step (before_step() made it undoable)."""

    def __init__(self, guard: Guard) -> None:
        self.rw = guard.rw
        self.scale = guard._scaled.scale
        self.used = guard._scaled.used
        self.undone = False

    def take(self) -> tuple[float, ...]:
        return self.used

    def discard(self) -> int:
        if self.undone:
            return 0
        self.undone = True
        self.rw.undo()
        return 1

    def undo(self) -> int:
        return self.discard()


def _params_finite(opt: torch.optim.Optimizer, rw: Rewind) -> bool:
    """Whether every parameter element is finite, on every rank of the Rewind's group."""
    ps = [local(p.detach()) for g in opt.param_groups for p in g["params"]]
    ok = True
    if ps:
        norms = torch._foreach_norm(ps, float("inf"))  # max |x|: inf/nan only if an element is
        ok = bool(torch.stack([n.float().cpu() for n in norms]).isfinite().all())
    return all_sum(rw.group, [0.0 if ok else 1.0])[0] == 0.0
