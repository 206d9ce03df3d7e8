"""Guards that keep training alive: skip non-finite steps, and roll back loss spikes.

Both replace the ``optimizer.step()`` line of a plain loop::

    rw = Rewind(model, opt, schedulers=[sched], capacity=8)
    guard = SpikeGuard(rw)
    for x, y in guard.wrap(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        if guard.step(loss):          # False: the step was skipped or history was rolled back
            sched.step()
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from ..distributed import all_sum, local
from ..errors import RewindError
from ..rewind import Rewind
from ..skipping import SkippableIterator
from ..trajectory import Event, Trajectory
from ._common import agreed_loss, check_factor, check_rewind, grad_sq, loss_value, lrs, scale_lrs, set_lrs

T = TypeVar("T")


class NonFiniteGuard:
    """Never applies a step whose loss or gradients are NaN/Inf; logs it and carries on. After
    ``max_consecutive`` such iterations in a row it raises :class:`RewindError` with the recent history.

    With ``check_params=True`` it also checks the parameters after each step and undoes a step that made any of
    them non-finite (costs one reduction over the parameters per step).

    Example::

        guard = NonFiniteGuard(Rewind(model, opt))
        loss.backward()
        guard.step(loss)              # instead of opt.step()
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
        self.rw = check_rewind(rewind, type(self).__name__)
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise RewindError(f"{type(self).__name__}: max_consecutive must be an int >= 1, got {max_consecutive!r}.")
        self.optimizer = self.rw.optimizer
        self.check_grads = check_grads
        self.check_params = check_params
        self.max_consecutive = max_consecutive
        self.log = log if log is not None else Trajectory()
        self.iteration = 0
        self.steps = 0
        self.consecutive = 0
        self._loader: SkippableIterator | None = None
        self._skip_left = 0  # batches still to skip after a roll-back when no iterator was wrapped
        self._framework = False  # inside after_step(): the step was already taken by the framework
        self._mark: int | None = None  # rw.step at before_step()
        self._used_lrs: tuple[float, ...] | None = None
        self._restore_lrs: tuple[float, ...] | None = None
        self._applied_scale = 1.0
        self._post_hook: Any = None

    # -- pieces shared with SpikeGuard ---------------------------------------------------------------------
    def _begin(self, loss: Any) -> tuple[int, float, float | None]:
        # validated before counting the iteration; averaged over ranks (with the gradient norm, one collective)
        who = f"{type(self).__name__}.step(loss)"
        if self._need_grad_norm():
            v, sq = agreed_loss(self.rw, loss, who, (grad_sq(self.optimizer, self.rw.group),))
            gn: float | None = math.sqrt(sq) if math.isfinite(v) else None
        else:
            (v,) = agreed_loss(self.rw, loss, who)
            gn = None
        it = self.iteration
        self.iteration += 1
        return it, v, gn

    def _need_grad_norm(self) -> bool:
        return self.check_grads

    def _nonfinite_reason(self, v: float, gn: float | None) -> str:
        if not math.isfinite(v):
            return f"non-finite loss ({v})"
        if gn is not None and not math.isfinite(gn):
            return "non-finite gradient"
        return ""

    def _fail(self, it: int, v: float, gn: float | None, reason: str, undone: int = 0) -> bool:
        """A non-finite loss/gradient/parameter: skip (the step is not applied, or was just undone)."""
        undone += self._discard()
        return self._skip(it, v, reason, {"grad_norm": gn} if gn is not None else None, undone)

    def _skip(self, it: int, v: float, reason: str, extra: dict | None = None, undone: int = 0) -> bool:
        self.consecutive += 1
        self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer), reason, undone=undone,
                           extra=extra or {}))  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            recent = "\n".join(f"  iteration {e.iteration}: {e.kind} ({e.reason})" for e in self.log.events[-5:])
            raise RewindError(
                f"{type(self).__name__}: {self.consecutive} consecutive iterations were not applied "
                f"(max_consecutive={self.max_consecutive}). Training is not recovering: lower the learning rate, "
                f"check the data, or raise max_consecutive. Recent events:\n{recent}"
            )
        return False

    def _apply(self, it: int, v: float, closure: Callable[[], Any] | None, reason: str = "") -> bool:
        opt = self.optimizer
        used = self._used_lrs if self._framework else lrs(opt)
        if not self._framework:  # after_step(): the framework already took the step
            self.rw.ensure_recorded()  # the step must be undoable even with Rewind(auto=False)
            if closure is not None:
                opt.step(closure)
            else:
                opt.step()
        if self.check_params and not _params_finite(opt, self.rw):
            self.rw.undo()
            self._framework = False
            return self._fail(it, v, None, "step made parameters non-finite: undone", undone=1)
        self.consecutive = 0
        self.steps += 1
        self.log.add(Event(it, self.steps, "accepted", v, None, used, reason))
        return True

    def _discard(self) -> int:
        """In after_step(): undo the step the framework took (the decision is not to apply it). Returns the count."""
        if not self._framework:
            return 0
        self._framework = False
        self.rw.undo()
        return 1

    def _skip_queued(self, it: int, v: float) -> bool:
        """A batch skipped after a roll-back when no iterator was wrapped: its step is not applied (or undone)."""
        self._skip_left -= 1
        undone = self._discard()
        self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer), "batch skipped after a roll-back",
                           undone=undone))  # fmt: skip
        return False

    # -- framework hooks (Lightning, HF Trainer, any loop that calls optimizer.step() itself) --------------
    def _lr_scale_for_step(self) -> float:
        return 1.0

    def before_step(self) -> None:
        """For a loop that calls ``optimizer.step()`` itself: call after backward, before that step (inside or
        outside ``step(closure)``). Makes the step undoable and applies the guard's learning-rate factor to that one
        step. Pair it with :meth:`after_step`.

        Example::

            loss.backward(); guard.before_step()
            optimizer.step()                  # taken by the framework
            guard.after_step(loss)            # same decision as guard.step(loss); undoes the step if needed
        """
        rw = self.rw
        if not rw.in_step:  # inside step(closure) the pre-step hook already recorded, before the closure ran
            rw.ensure_recorded()
        self._mark = rw.step
        scale = self._lr_scale_for_step()
        if scale != 1.0:
            base = lrs(self.optimizer)
            scale_lrs(self.optimizer, scale)
            self._restore_lrs = base
            if self._post_hook is None:  # put the scheduler's lrs back right after the step, before anything else
                self._post_hook = self.optimizer.register_step_post_hook(self._unscale)
        self._used_lrs = lrs(self.optimizer)  # what the step is taken with, for the log
        self._applied_scale = scale

    def cancel(self) -> None:
        """Forget a :meth:`before_step` whose iteration will not be judged (e.g. the framework skipped the batch)."""
        self._mark = None
        self._unscale()

    def close(self) -> None:
        """Remove the optimizer hook :meth:`before_step` installed (the guard's log and statistics stay)."""
        self.cancel()
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None

    def _unscale(self, *_: Any) -> None:
        if self._restore_lrs is not None:
            set_lrs(self.optimizer, self._restore_lrs)
            self._restore_lrs = None

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
        if self._mark is None:
            raise RewindError(
                f"{type(self).__name__}.after_step(loss) needs before_step() to be called after backward and before "
                "optimizer.step() in the same iteration (use step(loss) if the guard should take the step itself)."
            )
        stepped = self.rw.step > self._mark
        self._mark = None
        self._unscale()  # the step raised or never ran: do not leave the scaled lrs behind
        if not stepped:  # e.g. GradScaler skipped optimizer.step() because of inf/NaN gradients
            # the point before_step() recorded belongs to no step: the next step records afresh (forward since
            # then changed buffers, RNG, the scaler)
            self.rw.drop_pending()
            v = loss_value(loss, f"{type(self).__name__}.after_step(loss)")
            it = self.iteration
            self.iteration += 1
            self.log.add(Event(it, self.steps, "skipped", v, None, lrs(self.optimizer),
                               "optimizer.step() was not called (e.g. GradScaler found inf/NaN)"))  # fmt: skip
            return False
        self._framework = True
        try:
            return self.step(loss)
        finally:
            self._framework = False
            self._used_lrs = None

    # -- public --------------------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float, closure: Callable[[], Any] | None = None) -> bool:
        """Apply ``optimizer.step(closure)`` unless the loss or the gradients are non-finite. Returns whether the
        step was applied."""
        it, v, gn = self._begin(loss)
        if self._skip_left:
            return self._skip_queued(it, v)
        reason = self._nonfinite_reason(v, gn)
        if reason:
            return self._fail(it, v, gn, reason)
        return self._apply(it, v, closure)

    def wrap(self, iterable: Iterable[T]) -> SkippableIterator[T]:
        """Wrap a data iterable so the guard can skip batches (SpikeGuard's ``skip_batches``; same loop for every guard).

        Example::

            for x, y in guard.wrap(loader): ...
        """
        it = iterable if isinstance(iterable, SkippableIterator) else SkippableIterator(iterable)
        self._loader = it
        return it


class SpikeDetector:
    """Robust online detection of upward spikes in a scalar series (a loss, a gradient norm).

    ``method="mad"``: z = (x − median) / (1.4826·MAD) over the last ``window`` accepted values;
    ``method="ema"``: z = (x − mean) / std with exponentially weighted mean and variance (``alpha``).
    A value is a spike when, after ``warmup`` values, z > ``threshold`` and x > (1 + ``min_rel``)·centre.

    Example::

        det = SpikeDetector(window=50, threshold=6)
        if det.is_spike(loss_value): ...
        else: det.update(loss_value)
    """

    def __init__(
        self,
        window: int = 50,
        threshold: float = 6.0,
        warmup: int = 20,
        min_rel: float = 0.2,
        method: str = "mad",
        alpha: float = 0.05,
    ) -> None:
        if method not in ("mad", "ema"):
            raise RewindError(f"SpikeDetector: method must be 'mad' or 'ema', got {method!r}.")
        if not isinstance(window, int) or window < 3:
            raise RewindError(f"SpikeDetector: window must be an int >= 3, got {window!r}.")
        if not isinstance(warmup, int) or warmup < 1:
            raise RewindError(f"SpikeDetector: warmup must be an int >= 1, got {warmup!r}.")
        if method == "mad" and warmup > window:
            raise RewindError(f"SpikeDetector: warmup ({warmup}) cannot exceed window ({window}) with method='mad'.")
        if not threshold > 0:
            raise RewindError(f"SpikeDetector: threshold must be > 0, got {threshold!r}.")
        check_factor("alpha", alpha, 0.0, 1.0, "SpikeDetector")
        self.window, self.threshold, self.warmup, self.min_rel = window, float(threshold), warmup, float(min_rel)
        self.method, self.alpha = method, float(alpha)
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self._cached: tuple[float, float] | None = None

    def centre_and_scale(self) -> tuple[float, float]:
        if self._cached is None:  # cached until the next update/load: a guard asks several times per step
            if self.method == "ema":
                self._cached = self.mean, math.sqrt(self.var)
            else:
                xs = sorted(self.values)
                med = _median(xs)
                self._cached = med, 1.4826 * _median(sorted(abs(x - med) for x in xs))
        return self._cached

    def score(self, x: float) -> float:
        """The z-score of ``x`` (0 during warm-up)."""
        if self.count < self.warmup:
            return 0.0
        centre, scale = self.centre_and_scale()
        if scale <= 0:
            scale = 1e-12 * max(abs(centre), 1.0)
        return (x - centre) / scale

    def is_spike(self, x: float) -> bool:
        if not math.isfinite(x):
            return True
        if self.count < self.warmup:
            return False
        centre, _ = self.centre_and_scale()
        return self.score(x) > self.threshold and x > centre + self.min_rel * abs(centre)

    def update(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self._cached = None
        self.values.append(x)
        if self.count == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.values = deque(sd["values"], maxlen=self.window)
        self.count, self.mean, self.var = sd["count"], sd["mean"], sd["var"]
        self._cached = None


class _Detectors:
    """The detectors' statistics, tracked by the Rewind so a roll-back also forgets the undone steps' losses."""

    def __init__(self, loss: SpikeDetector, grad: SpikeDetector | None) -> None:
        self.loss, self.grad = loss, grad

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grad": self.grad.state_dict() if self.grad else None}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss.load_state_dict(sd["loss"])
        if self.grad is not None and sd["grad"] is not None:
            self.grad.load_state_dict(sd["grad"])


class SpikeGuard(NonFiniteGuard):
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
       between them (a burst of bad batches), do not;
    4. the decision is logged. More than ``max_rollbacks`` roll-backs within ``budget_window`` iterations raise
       :class:`RewindError`.

    Non-finite losses/gradients skip the step; ``max_consecutive`` of them in a row are treated as a spike.

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
        check_rewind(rewind, "SpikeGuard")
        k = rewind.capacity if rollback is None else rollback
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RewindError(f"SpikeGuard: rollback must be an int >= 1 (steps to undo), got {rollback!r}.")
        super().__init__(rewind, check_grads=True, check_params=check_params, max_consecutive=max_consecutive,
                         log=log)  # fmt: skip
        deep = rewind.tiers.host is not None or rewind.tiers.disk is not None
        if k > self.rw.capacity and not deep:
            raise RewindError(
                f"SpikeGuard: rollback={k} needs a history of {k} steps, but the Rewind has capacity="
                f"{self.rw.capacity}; build it with Rewind(..., capacity={k}), keep older points in a host or disk "
                "tier (Rewind(..., tiers=Tiers(host=HostArchive(keep=...)))), or lower rollback."
            )
        self.rollback = k
        self.lr_factor = check_factor("lr_factor", lr_factor, 0.0, 1.0 + 1e-12, "SpikeGuard")
        self.min_lr_factor = check_factor("min_lr_factor", min_lr_factor, 0.0, 1.0 + 1e-12, "SpikeGuard")
        for name, v, lo in (("skip_batches", skip_batches, 0), ("cooldown", cooldown, 0), ("ramp", ramp, 0),
                            ("budget_window", budget_window, 1)):  # fmt: skip
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise RewindError(f"SpikeGuard: {name} must be an int >= {lo}, got {v!r}.")
        if not isinstance(max_rollbacks, int) or max_rollbacks < 1:
            raise RewindError(f"SpikeGuard: max_rollbacks must be an int >= 1, got {max_rollbacks!r}.")
        self.skip_batches, self.cooldown, self.ramp = skip_batches, cooldown, ramp
        self.max_rollbacks, self.budget_window = max_rollbacks, budget_window
        self.detector = detector or SpikeDetector()
        self.use_grad_norm = grad_norm
        self.grad_detector = (grad_detector or SpikeDetector()) if grad_norm else None
        self._factor = 1.0  # lr multiplier set by the last spike
        self._cool_left = 0
        self._ramp_left = 0
        self._tried = False  # whether a step was applied at the reduced lr since the last roll-back
        self._rollbacks: deque[int] = deque()
        self.rollbacks = 0
        self.rw.track(_Detectors(self.detector, self.grad_detector))

    def _need_grad_norm(self) -> bool:
        return True

    def _fail(self, it: int, v: float, gn: float | None, reason: str, undone: int = 0) -> bool:
        # max_consecutive non-finite iterations in a row are treated as a spike: the parameters may be broken.
        undone += self._discard()
        if self.consecutive + 1 >= self.max_consecutive:
            return self._roll_back(it, v, gn, f"{reason}, {self.consecutive + 1} in a row", already_undone=undone)
        return super()._fail(it, v, gn, reason, undone)

    @property
    def lr_scale(self) -> float:
        """The multiplier the next step's learning rates get (1.0 outside a cool-down)."""
        if self._cool_left > 0:
            return self._factor
        if self._ramp_left > 0:
            # ramp steps r = 1..ramp use factor + (1 - factor) * r / ramp: the last ramp step is at full lr
            done = self.ramp - self._ramp_left + 1
            return self._factor + (1.0 - self._factor) * done / self.ramp
        return 1.0

    def step(self, loss: torch.Tensor | float, closure: Callable[[], Any] | None = None) -> bool:
        """Decide for this iteration: apply the step (at the cool-down lr), skip it, or roll back. Returns whether
        a step was applied."""
        it, v, gn = self._begin(loss)
        if self._skip_left:
            return self._skip_queued(it, v)
        reason = self._nonfinite_reason(v, gn)
        if reason:
            return self._fail(it, v, gn, reason)
        z = self.detector.score(v)
        if self.detector.is_spike(v):
            return self._roll_back(it, v, gn, f"loss spike (z={z:.1f})")
        if self.grad_detector is not None and gn is not None and self.grad_detector.is_spike(gn):
            return self._roll_back(it, v, gn, f"gradient-norm spike (z={self.grad_detector.score(gn):.1f})")
        # Record before the detectors learn this loss (and before any lr scaling): a roll-back to this point
        # forgets the losses from here on, the same whether the guard or a framework (before_step) records it.
        if not self._framework:
            self.rw.ensure_recorded()
        self.detector.update(v)
        if self.grad_detector is not None and gn is not None:
            self.grad_detector.update(gn)
        scale = self._applied_scale if self._framework else self.lr_scale
        if scale == 1.0:
            return self._apply(it, v, closure)
        if self._framework:  # before_step() scaled the lrs of the step already taken
            applied = self._apply(it, v, closure, f"cool-down lr x{scale:.3g}")
        else:  # recorded above, before scaling: an undo brings back the unscaled (scheduler's) learning rates
            base = lrs(self.optimizer)
            scale_lrs(self.optimizer, scale)
            try:
                applied = self._apply(it, v, closure, f"cool-down lr x{scale:.3g}")
            finally:
                set_lrs(self.optimizer, base)
        if applied:
            self._tried = True
            if self._cool_left > 0:
                self._cool_left -= 1
            elif self._ramp_left > 0:
                self._ramp_left -= 1
            if self._cool_left == 0 and self._ramp_left == 0:
                self._factor = 1.0
        return applied

    def _lr_scale_for_step(self) -> float:
        return self.lr_scale

    def _roll_back(self, it: int, v: float, gn: float | None, reason: str, already_undone: int = 0) -> bool:
        already_undone += self._discard()
        self._rollbacks.append(it)
        while self._rollbacks and self._rollbacks[0] <= it - self.budget_window:
            self._rollbacks.popleft()
        if len(self._rollbacks) > self.max_rollbacks:
            recent = "\n".join(f"  iteration {e.iteration}: {e.kind} ({e.reason})" for e in self.log.events[-6:])
            raise RewindError(
                f"SpikeGuard: {len(self._rollbacks)} roll-backs within {self.budget_window} iterations "
                f"(max_rollbacks={self.max_rollbacks}); training keeps spiking. Lower the learning rate, check the "
                f"data, or raise max_rollbacks. This spike: {reason} at iteration {it}. Recent events:\n{recent}"
            )
        n = self._undo_steps(self.rollback)
        skipped = self.skip_batches
        if self._loader is not None:
            self._loader.skip(skipped)
        else:  # no wrapped iterator (e.g. a framework's loop): the next batches' steps are not applied
            self._skip_left = skipped
        # Compound the factor only when a step at the reduced lr was taken and training spiked again (the lr is
        # still too high); back-to-back spikes with no step between them (a burst of bad batches) say nothing new.
        if self._tried or self.lr_scale == 1.0:
            self._factor = max(self.lr_scale * self.lr_factor, self.min_lr_factor)
        self._tried = False
        self._cool_left, self._ramp_left = self.cooldown, self.ramp
        self.consecutive = 0
        self.rollbacks += 1
        self.steps = max(self.steps - n, 0)
        # undone counts every undo this decision made: the failed step itself (already_undone) and the roll-back
        self.log.add(Event(it, self.steps, "rolled_back", v, None, lrs(self.optimizer), reason,
                           undone=n + already_undone,
                           skipped_batches=skipped, extra={"grad_norm": gn, "lr_factor": self._factor}))  # fmt: skip
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


def _params_finite(opt: torch.optim.Optimizer, rw: Rewind) -> bool:
    """Whether every parameter element is finite, on every rank of the Rewind's group."""
    ps = [local(p.detach()) for g in opt.param_groups for p in g["params"]]
    ok = True
    if ps:
        norms = torch._foreach_norm(ps, float("inf"))  # max |x|: inf/nan only if an element is
        ok = bool(torch.stack([n.float().cpu() for n in norms]).isfinite().all())
    return all_sum(rw.group, [0.0 if ok else 1.0])[0] == 0.0


def _median(xs: list[float]) -> float:
    n = len(xs)
    if n == 0:
        return 0.0
    m = n // 2
    return xs[m] if n % 2 else 0.5 * (xs[m - 1] + xs[m])
