"""SpikeGuard: detect a loss spike, roll back, skip the data, cool the learning rate down, carry on."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._checks import check_bool, check_int, check_number, check_type
from ..errors import RewindError, RewindValueError
from ..rewind import Rewind
from ..trajectory import Trajectory
from ._common import check_rewind
from .budget import RollbackBudget
from .buffers import MAX_LOG, BufferWatch
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

    A spike is judged on the iteration's loss (or, with ``grad_norm=True``, the global gradient norm; with
    by default also the largest one-step change of any floating-point buffer's norm) *before* its step is
    applied, so the step that would have used the spiking batch is never taken. Then:

    0. with ``drop_first`` (default) a first spike only drops its batch (nothing undone, no cool-down): if the batch
       was bad, that is the whole repair. A spike on the next batch too (before any step stands) means the state is
       bad — e.g. steps at a too-high lr — and starts the roll-back below; so do ``max_consecutive`` non-finite
       iterations in a row. ``drop_first=False``: every spike rolls back at once;
    1. the last ``rollback`` steps are undone (default: the whole history, ``rewind.capacity``) — parameters,
       optimizer state, schedulers, RNG and the detectors' own statistics (which forget the values measured after
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
    4. the next ``recheck`` steps are on probation: the loss after each is judged against a lower bar (z above
       ``recheck_threshold`` and above (1 + ``recheck_min_rel``) x the median, instead of ``threshold`` and
       ``min_rel``), and a loss over it (or a spike) undoes the steps taken since the roll-back at once and deepens
       the cool-down (that roll-back starts no new probation: ``recheck`` judged steps per roll-back in all). The
       roll-back showed the state was bad; what made it bad may still be in force (the suite's lr x50 lasts 5 steps,
       and the cool-down's x0.5 leaves x25), and one such step raises a Transformer's loss ~1.5x, just under a
       spike. A healthy run never rolls back, so the lower bar never judges one. ``recheck=0``: no probation;
    5. the decision is logged (a dropped batch is a ``rolled_back`` event with ``undone=0``). More than
       ``max_rollbacks`` roll-backs within ``budget_window`` iterations raise :class:`~torchrewind.RewindError`
       (see :class:`RollbackBudget`).

    ``buffers`` (``"auto"``, the default: the floating-point buffers of the Rewind's modules, ``rewind.modules``; a
    module, modules, or tensors; None: none): BatchNorm normalises a batch of inputs x1e3 away in train mode, so the
    loss does not move, but its running variance jumps ~1e5-fold and takes ~100 steps (momentum 0.1) to wash out,
    leaving eval mode at chance. Watching buffers, the guard measures, after each forward,
    the largest factor by which a floating-point buffer's norm changed since the last accepted step
    (:class:`BufferWatch`: one fused norm per device) and judges it with ``buffer_detector`` like the loss; a
    non-finite buffer is treated like a non-finite loss. A model without floating-point buffers costs nothing.

    Non-finite losses/gradients skip the step; ``max_consecutive`` of them in a row are treated as a spike. With
    :meth:`wrap`, every iteration's undo point is recorded before its forward pass, so a skipped, dropped or
    rolled-back iteration also loses what its forward did to BatchNorm statistics and the RNG (a NaN batch or an
    x1e3 batch cannot poison them). The default detector judges log-losses against the run's own noise (see
    :class:`SpikeDetector`). On the 14 tasks of ``benchmarks/suite`` (``benchmarks/bench_policies.py``) the
    defaults (buffers watched) made no false roll-back on any clean run; ``drop_first`` and ``recheck`` were checked
    on its ``tune`` half (see the README: with the probation, faulted runs within noise of fault-free on 6 of its 7
    tasks at 10 seeds, against 5 without).
    The pieces are public attributes: ``detector`` / ``grad_detector`` / ``buffer_detector``
    (:class:`SpikeDetector`), ``buffer_watch`` (:class:`BufferWatch` or None), ``lr_cooldown``
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
        buffers: torch.nn.Module | Iterable[torch.nn.Module | torch.Tensor] | str | None = "auto",
        buffer_detector: SpikeDetector | None = None,
        rollback: int | None = None,
        drop_first: bool = True,
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
        recheck: int = 2,
        recheck_threshold: float = 2.0,
        recheck_min_rel: float = 0.2,
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
        self.recheck = check_int("recheck", recheck, 0, who, " It is the steps on probation after a roll-back.")
        self.recheck_threshold = check_number("recheck_threshold", recheck_threshold, who, lo=0.0, lo_open=True)
        self.recheck_min_rel = check_number("recheck_min_rel", recheck_min_rel, who, lo=0.0)
        for name, det in (("detector", detector), ("grad_detector", grad_detector),
                          ("buffer_detector", buffer_detector)):  # fmt: skip
            if det is not None:
                check_type(name, det, SpikeDetector, who, "a SpikeDetector")
        self.use_grad_norm = check_bool("grad_norm", grad_norm, who)
        self.drop_first = check_bool("drop_first", drop_first, who)
        if isinstance(buffers, str) and buffers != "auto":
            raise RewindValueError(f"{who}: buffers must be 'auto', a module, modules, tensors or None, got "
                                   f"{buffers!r}.")  # fmt: skip
        auto = isinstance(buffers, str)  # "auto": the Rewind's own modules
        watch = None if buffers is None else BufferWatch(rewind.modules if auto else buffers, who)
        self.lr_cooldown = LrCooldown(lr_factor, min_lr_factor, cooldown, ramp, who)
        self.budget = RollbackBudget(max_rollbacks, budget_window, who)
        super().__init__(rewind, check_grads=True, check_params=check_params, max_consecutive=max_consecutive,
                         log=log)  # fmt: skip
        self.rollback = k
        self.stepped_since_rollback = True  # False right after a roll-back, until a step stands
        self.suspect = False  # the last spike only dropped its batch: another before a step stands rolls back
        self.since_rollback = 0  # steps standing since the last roll-back that undid steps
        self.probation = 0  # steps still to take on probation (judged against the lower bar) after a roll-back
        self.on_probation = False  # this iteration's loss follows a step on probation
        self.detector = detector or SpikeDetector()
        self.grad_detector = (grad_detector or SpikeDetector()) if grad_norm else None
        # the watched buffers (None: none): their largest one-step change of norm, judged like the loss
        self.buffer_watch = watch if watch is not None and watch.count else None
        self.buffer_detector = (buffer_detector or SpikeDetector()) if self.buffer_watch is not None else None
        # the detectors' statistics are part of the training state: a roll-back also forgets the undone steps'
        # losses (last: a refused guard tracks nothing)
        self.rw.track(_TrackedDetectors(self))

    # -- the decision ---------------------------------------------------------------------------------------------
    def decide(self, loss: float, grad_norm: float | None) -> Decision:
        """Roll back on a spike in the loss (or the gradient norm, or a buffer's jump), on a smaller rise of the loss
        while on probation after a roll-back, and after ``max_consecutive`` non-finite iterations in a row; skip a
        non-finite one; apply anything else.

        Example::

            d = guard.decide(1e4, None)      # after warm-up: Decision(action='roll_back', reason='loss spike ...')
        """
        reason = self.nonfinite_reason(loss, grad_norm)
        change = self.buffer_change
        if not reason and change is not None and not math.isfinite(change):
            reason = "non-finite buffer"
        if reason:
            return self.nonfinite_decision(reason)
        det = self.detector
        if det.is_spike(loss):
            return self._spike(f"loss spike (z={det.score(loss):.1f})")
        if self.on_probation and det.is_spike(loss, self.recheck_threshold, self.recheck_min_rel):
            return self._spike(f"loss rise after a roll-back (z={det.score(loss):.1f}, above "
                               f"recheck_threshold={self.recheck_threshold:g})")  # fmt: skip
        g = self.grad_detector
        if g is not None and grad_norm is not None and g.is_spike(grad_norm):
            return self._spike(f"gradient-norm spike (z={g.score(grad_norm):.1f})")
        b = self.buffer_detector
        if b is not None and change is not None and b.is_spike(math.exp(change)):
            return self._spike(f"buffer jump (a buffer's norm changed x{math.exp(change):.3g}, "
                               f"z={b.score(math.exp(change)):.1f})")  # fmt: skip
        return Decision.apply()

    @property
    def buffer_change(self) -> float | None:
        """This iteration's largest change of a watched buffer's norm, as a log (None: no buffers watched, or not
        measured yet)."""
        if self.buffer_watch is None or not self.signals:
            return None
        return min(self.signals[0], MAX_LOG)

    def _signals(self) -> tuple[float, ...]:
        return (self.buffer_watch.change(),) if self.buffer_watch is not None else ()

    def nonfinite_decision(self, reason: str) -> Decision:
        # max_consecutive non-finite iterations in a row are treated as a spike: the parameters may be broken
        if self.consecutive + 1 >= self.max_consecutive:
            return self._spike(f"{reason}, {self.consecutive + 1} in a row", confirmed=True)
        return Decision.skip(reason)

    def _spike(self, reason: str, confirmed: bool = False) -> Decision:
        if not self.stepped_since_rollback:
            # no step stands since the last roll-back (a burst of bad batches): the state is the restored one, there
            # is nothing new to undo; drop the batch (and its forward) and go on
            return Decision.roll_back(f"{reason}; no step since the last roll-back: batch dropped", 0,
                                      self.skip_batches)  # fmt: skip
        if self.on_probation:
            # a step taken since the roll-back made things worse: back to the restored point
            return Decision.roll_back(f"{reason}; on probation: back to the roll-back's point", self.since_rollback,
                                      self.skip_batches)  # fmt: skip
        if self.drop_first and not (confirmed or self.suspect):
            # the spiking batch's step was never applied: if the batch is bad, dropping it is the whole repair; the
            # next batch tells whether the state is bad too (then it spikes again and the guard rolls back)
            return Decision.roll_back(f"{reason}; batch dropped (a spike on the next batch rolls back)", 0,
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
        change = self.buffer_change
        if self.buffer_detector is not None and self.buffer_watch is not None:
            if change is not None and self.buffer_watch.ref is not None:
                self.buffer_detector.update(math.exp(change))
            self.buffer_watch.accept()
        self.lr_cooldown.stepped(scale)
        self.stepped_since_rollback = True
        self.suspect = False
        self.since_rollback += 1
        self.on_probation = self.probation > 0
        self.probation = max(self.probation - 1, 0)

    def _rolling_back(self, iteration: int, reason: str) -> None:
        if not self.budget.charge(iteration):
            b = self.budget
            recent = "\n".join(f"  iteration {e.iteration}: {e.kind} ({e.reason})" for e in self.log.events[-6:])
            raise RewindError(
                f"SpikeGuard: {len(b.recent)} roll-backs within {b.budget_window} iterations "
                f"(max_rollbacks={b.max_rollbacks}); training keeps spiking. Lower the learning rate, check the "
                f"data, or raise max_rollbacks. This spike: {reason} at iteration {iteration}. Recent events:\n{recent}"
            )

    def _rolled_back(self, d: Decision, steps: int) -> dict[str, Any]:
        if steps:
            if self.buffer_watch is not None:
                self.buffer_watch.rebase()  # older buffers are back: changes count from them
            # a roll-back on probation does not extend it: ``recheck`` steps are judged per roll-back in all
            self.probation = self.probation if self.on_probation else self.recheck
            self.since_rollback = 0
        self.on_probation = False
        if d.steps == 0 and self.stepped_since_rollback:
            # the first spike's drop: the state stands as it was (no cool-down); a spike before a step stands is a
            # repeat and rolls back
            self.suspect = True
            return {"dropped": True, "lr_factor": self.lr_cooldown.scale}
        self.stepped_since_rollback = False
        self.suspect = False
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
                "grad_norm": self.use_grad_norm, "drop_first": self.drop_first, "recheck": self.recheck,
                "recheck_threshold": self.recheck_threshold, "recheck_min_rel": self.recheck_min_rel,
                "buffers": self.buffer_watch.count if self.buffer_watch is not None else 0}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stepped_since_rollback": self.stepped_since_rollback,
                "suspect": self.suspect, "since_rollback": self.since_rollback, "probation": self.probation,
                "on_probation": self.on_probation}  # fmt: skip

    state_dict.__doc__ = Guard.state_dict.__doc__

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        who = "SpikeGuard.load_state_dict"
        flags = {"stepped_since_rollback": True, "suspect": False}
        # states saved before the probation existed lack its counters: none pending
        counts, on_probation = {"since_rollback": 0, "probation": 0}, False
        if isinstance(state_dict, dict):
            missing = [k for k in flags if k not in state_dict]
            if missing:
                raise RewindValueError(f"{who}: the state lacks {missing}; pass what SpikeGuard.state_dict() "
                                       "returned.")  # fmt: skip
            flags = {k: check_bool(k, state_dict[k], who) for k in flags}
            counts = {k: check_int(k, state_dict.get(k, v), 0, who) for k, v in counts.items()}
            on_probation = check_bool("on_probation", state_dict.get("on_probation", False), who)
        super().load_state_dict(state_dict, strict)
        self.stepped_since_rollback, self.suspect = flags["stepped_since_rollback"], flags["suspect"]
        self.since_rollback, self.probation = counts["since_rollback"], min(counts["probation"], self.recheck)
        self.on_probation = on_probation

    load_state_dict.__doc__ = Guard.load_state_dict.__doc__

    def _parts(self) -> dict[str, Any]:
        return {**super()._parts(), "detector": self.detector, "grad_detector": self.grad_detector,
                "buffer_detector": self.buffer_detector, "buffer_watch": self.buffer_watch,
                "cooldown": self.lr_cooldown, "budget": self.budget}  # fmt: skip


class _TrackedDetectors:
    """The detectors' statistics as the Rewind records them at every undo point (settings stay as they are)."""

    def __init__(self, guard: SpikeGuard) -> None:
        self.loss, self.grad, self.buf = guard.detector, guard.grad_detector, guard.buffer_detector

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.stats(), "grad": self.grad.stats() if self.grad else None,
                "buffers": self.buf.stats() if self.buf else None}  # fmt: skip

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss.load_stats(sd["loss"])
        if self.grad is not None and sd["grad"] is not None:
            self.grad.load_stats(sd["grad"])
        if self.buf is not None and sd.get("buffers") is not None:
            self.buf.load_stats(sd["buffers"])
