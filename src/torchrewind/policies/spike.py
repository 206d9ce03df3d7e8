"""SpikeGuard: detect a loss spike, roll back, skip the data, cool the learning rate down, carry on."""

from __future__ import annotations

from typing import Any

from .._checks import check_bool, check_int, check_type
from ..errors import RewindError, RewindValueError
from ..rewind import Rewind
from ..trajectory import Trajectory
from ._common import check_rewind
from .budget import RollbackBudget
from .cooldown import LrCooldown
from .detector import SpikeDetector
from .guard import Decision, Guard


def _setting(piece: str, name: str) -> property:
    def get(self: SpikeGuard) -> Any:
        return getattr(getattr(self, piece), name)

    def set(self: SpikeGuard, value: Any) -> None:
        setattr(getattr(self, piece), name, value)

    return property(get, set, doc=f"``{piece}.{name}``")


class SpikeGuard(Guard):
    """Loss-spike recovery: detect a spike, roll back, skip the data, cool the learning rate down, carry on.

    On a spike in the loss (or, with ``grad_norm=True``, in the global gradient norm) the step is not applied and:

    1. the last ``rollback`` steps are undone (default: the whole history, ``rewind.capacity``) — parameters,
       optimizer state, schedulers, RNG and the detector's own statistics (which forget the losses measured after
       the restored point). With a host or disk tier, ``rollback`` may exceed the device history (PaLM-style
       roll-backs of ~100 steps): the guard then restores the newest point kept at or before that step;
    2. the next ``skip_batches`` batches of the iterator returned by :meth:`wrap` are skipped (the batches of the
       undone steps are not replayed either, as in PaLM's recipe);
    3. every lr is multiplied by ``lr_factor`` for ``cooldown`` steps, then brought back linearly over ``ramp``
       steps (on top of any LR scheduler: the factor is applied to the step only). A spike after a step was taken
       at the reduced lr multiplies the factor again (down to ``min_lr_factor``); spikes back to back, with no step
       between them (a burst of bad batches), do not, and undo nothing more: the state is already the restored one,
       so such a batch is only dropped (it still counts as a roll-back). ``lr_factor=1`` keeps the lr (see
       :class:`LrCooldown`);
    4. the decision is logged. More than ``max_rollbacks`` roll-backs within ``budget_window`` iterations raise
       :class:`~torchrewind.RewindError` (see :class:`RollbackBudget`).

    Non-finite losses/gradients skip the step; ``max_consecutive`` of them in a row are treated as a spike. With
    :meth:`wrap`, every iteration's undo point is recorded before its forward pass, so a skipped or rolled-back
    iteration also loses what its forward did to BatchNorm statistics and the RNG (a NaN batch cannot poison them).
    The default detector judges log-losses against the run's own noise (see :class:`SpikeDetector`): on the 14 tasks
    of ``benchmarks/suite`` it made no false roll-back on any clean run.
    The pieces are public attributes: ``detector`` / ``grad_detector`` (:class:`SpikeDetector`), ``lr_cooldown``
    (:class:`LrCooldown`), ``budget`` (:class:`RollbackBudget`); :meth:`state_dict` saves them all.

    Example::

        guard = SpikeGuard(Rewind(model, opt, capacity=8))
        for x, y in guard.wrap(loader):
            loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward()
            guard.step(loss)
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        detector: SpikeDetector | None = None,
        grad_norm: bool = False,
        grad_detector: SpikeDetector | None = None,
        rollback: int | None = None,
        skip_batches: int = 0,
        lr_factor: float = 0.5,
        min_lr_factor: float = 1e-3,
        cooldown: int = 10,
        ramp: int = 10,
        max_rollbacks: int = 20,
        budget_window: int = 200,
        max_consecutive: int = 3,
        check_params: bool = False,
        log: Trajectory | None = None,
    ) -> None:
        who = "SpikeGuard"
        check_rewind(rewind, who)
        k = rewind.capacity if rollback is None else rollback
        check_int("rollback", k, 1, who, " It is the number of steps to undo.")
        if k > rewind.capacity and rewind.tiers.host is None and rewind.tiers.disk is None:
            raise RewindValueError(
                f"SpikeGuard: rollback={k} needs a history of {k} steps, but the Rewind has capacity="
                f"{rewind.capacity}; build it with Rewind(..., capacity={k}), keep older points in a host or disk "
                "tier (Rewind(..., tiers=Tiers(host=HostArchive(keep=...)))), or lower rollback."
            )
        self.skip_batches = check_int("skip_batches", skip_batches, 0, who)
        for name, det in (("detector", detector), ("grad_detector", grad_detector)):
            if det is not None:
                check_type(name, det, SpikeDetector, who, "a SpikeDetector")
        self.use_grad_norm = check_bool("grad_norm", grad_norm, who)
        self.lr_cooldown = LrCooldown(lr_factor, min_lr_factor, cooldown, ramp, who)
        self.budget = RollbackBudget(max_rollbacks, budget_window, who)
        super().__init__(rewind, check_grads=True, check_params=check_params, max_consecutive=max_consecutive,
                         log=log)  # fmt: skip
        self.rollback = k
        self.stepped_since_rollback = True  # False right after a roll-back, until a step stands
        self.detector = detector or SpikeDetector()
        self.grad_detector = (grad_detector or SpikeDetector()) if grad_norm else None
        # the detectors' statistics are part of the training state: a roll-back also forgets the undone steps'
        # losses (last: a refused guard tracks nothing)
        self.rw.track(_TrackedDetectors(self))

    # -- the decision ---------------------------------------------------------------------------------------------
    def decide(self, loss: float, grad_norm: float | None) -> Decision:
        """Roll back on a spike in the loss (or the gradient norm) and after ``max_consecutive`` non-finite
        iterations in a row; skip a non-finite one; apply anything else.

        Example::

            d = guard.decide(1e4, None)      # after warm-up: Decision(action='roll_back', reason='loss spike ...')
        """
        reason = self.nonfinite_reason(loss, grad_norm)
        if reason:
            return self.nonfinite_decision(reason)
        if self.detector.is_spike(loss):
            return self._spike(f"loss spike (z={self.detector.score(loss):.1f})")
        g = self.grad_detector
        if g is not None and grad_norm is not None and g.is_spike(grad_norm):
            return self._spike(f"gradient-norm spike (z={g.score(grad_norm):.1f})")
        return Decision.apply()

    def nonfinite_decision(self, reason: str) -> Decision:
        # max_consecutive non-finite iterations in a row are treated as a spike: the parameters may be broken
        if self.consecutive + 1 >= self.max_consecutive:
            return self._spike(f"{reason}, {self.consecutive + 1} in a row")
        return Decision.skip(reason)

    def _spike(self, reason: str) -> Decision:
        if not self.stepped_since_rollback:
            # no step stands since the last roll-back (a burst of bad batches): the state is the restored one, there
            # is nothing new to undo; drop the batch (and its forward) and go on
            return Decision.roll_back(f"{reason}; no step since the last roll-back: batch dropped", 0,
                                      self.skip_batches)  # fmt: skip
        return Decision.roll_back(reason, self.rollback, self.skip_batches)

    @property
    def lr_scale(self) -> float:
        """The multiplier the next step's learning rates get (1.0 outside a cool-down)."""
        return self.lr_cooldown.scale

    # -- reactions ------------------------------------------------------------------------------------------------
    def _stepped(self, loss: float, grad_norm: float | None, scale: float) -> None:
        # after the undo point was recorded: a roll-back to it forgets this loss, whoever recorded it
        self.detector.update(loss)
        if self.grad_detector is not None and grad_norm is not None:
            self.grad_detector.update(grad_norm)
        self.lr_cooldown.stepped(scale)
        self.stepped_since_rollback = True

    def _rolling_back(self, iteration: int, reason: str) -> None:
        if not self.budget.charge(iteration):
            b = self.budget
            recent = "\n".join(f"  iteration {e.iteration}: {e.kind} ({e.reason})" for e in self.log.events[-6:])
            raise RewindError(
                f"SpikeGuard: {len(b.recent)} roll-backs within {b.budget_window} iterations "
                f"(max_rollbacks={b.max_rollbacks}); training keeps spiking. Lower the learning rate, check the "
                f"data, or raise max_rollbacks. This spike: {reason} at iteration {iteration}. Recent events:\n{recent}"
            )

    def _rolled_back(self) -> dict[str, Any]:
        self.stepped_since_rollback = False
        return {"lr_factor": self.lr_cooldown.spiked()}

    # -- the pieces' settings, as the guard's own (settable, e.g. guard.max_rollbacks = 40) ------------------
    lr_factor = _setting("lr_cooldown", "lr_factor")
    min_lr_factor = _setting("lr_cooldown", "min_lr_factor")
    cooldown = _setting("lr_cooldown", "cooldown")
    ramp = _setting("lr_cooldown", "ramp")
    max_rollbacks = _setting("budget", "max_rollbacks")
    budget_window = _setting("budget", "budget_window")

    # -- state ----------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "rollback": self.rollback, "skip_batches": self.skip_batches,
                "grad_norm": self.use_grad_norm}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stepped_since_rollback": self.stepped_since_rollback}

    state_dict.__doc__ = Guard.state_dict.__doc__

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        who = "SpikeGuard.load_state_dict"
        if isinstance(state_dict, dict) and "stepped_since_rollback" not in state_dict:
            raise RewindValueError(f"{who}: the state lacks ['stepped_since_rollback']; pass what "
                                   "SpikeGuard.state_dict() returned.")  # fmt: skip
        flag = check_bool("stepped_since_rollback", state_dict.get("stepped_since_rollback"), who) \
            if isinstance(state_dict, dict) else True
        super().load_state_dict(state_dict, strict)
        self.stepped_since_rollback = flag

    load_state_dict.__doc__ = Guard.load_state_dict.__doc__

    def _parts(self) -> dict[str, Any]:
        return {**super()._parts(), "detector": self.detector, "grad_detector": self.grad_detector,
                "cooldown": self.lr_cooldown, "budget": self.budget}  # fmt: skip


class _TrackedDetectors:
    """The detectors' statistics as the Rewind records them at every undo point (settings stay as they are)."""

    def __init__(self, guard: SpikeGuard) -> None:
        self.loss, self.grad = guard.detector, guard.grad_detector

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.stats(), "grad": self.grad.stats() if self.grad else None}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss.load_stats(sd["loss"])
        if self.grad is not None and sd["grad"] is not None:
            self.grad.load_stats(sd["grad"])
