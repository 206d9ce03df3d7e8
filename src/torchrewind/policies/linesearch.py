"""Step-size search around *any* torch optimizer, built on exact undo: backtracking (Armijo) line search and the
bold-driver rule.

Both take the optimizer's proposed step, evaluate the loss at the new parameters on the same mini-batch, and if the
step is not good enough undo it exactly (parameters, moments, step counters, schedulers, RNG) and retry with a
smaller learning rate. The direction is whatever the optimizer proposes (SGD, Adam, RMSprop, ...). A search is three
pieces: the engine here (try, test, undo), an acceptance rule (:mod:`.acceptance`) and an lr schedule
(:class:`~torchrewind.policies.stepsize.StepSize`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._checks import check_bool, check_choice, check_int, check_type
from ..distributed import all_sum, local, replicas
from ..errors import RewindTypeError, RewindValueError
from ..rewind import Rewind
from ..trajectory import Event, Trajectory
from ._common import agreed_loss, check_rewind, grad_sq, scales_each_step
from ._state import check_state, header, load_all
from .acceptance import Armijo, NoIncrease
from .lr import lrs
from .stepsize import StepSize


class Backtracking:
    """The engine of a step-size search: take the optimizer's step, test it with ``accept`` on the same mini-batch,
    undo it and shrink the lrs (``step_size``) until it passes or ``max_tries`` trials failed. A failed step whose
    direction is not a descent direction (``∇f·Δ ≥ 0``, with a rule that needs the direction) cannot be helped by a
    smaller lr: ``uphill="skip"`` ends the iteration without a step, ``"take"`` applies the optimizer's step as it
    is (if the loss stays finite and changes), ``"restart"`` (optimizers with a ``momentum`` setting) restarts the
    momentum as soon as a trial's direction goes uphill, before its loss is evaluated: the step is undone, the
    momentum buffers are zeroed and the search goes on with the gradient's own direction; ``"auto"`` takes it around
    optimizers with an ``eps`` setting (Adam & co.), restarts around others with momentum (SGD) and skips it around
    the rest. A trial that leaves the loss exactly as it was ends the search: a smaller lr cannot change it either.

    Example::

        search = Backtracking(Rewind(model, opt), accept=Armijo(c=0.1), step_size=StepSize(shrink=0.5, grow=1.1))
        for x, y in loader:
            search.step(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        accept: Any,
        step_size: StepSize,
        max_tries: int = 10,
        same_rng: bool = True,
        log: Trajectory | None = None,
        uphill: str = "skip",
    ) -> None:
        who = type(self).__name__
        self.rw = check_rewind(rewind, who)
        self.uphill = check_choice("uphill", uphill, ("auto", "skip", "take", "restart"), who)
        if not callable(accept):
            raise RewindTypeError(f"{who}: accept must be a rule like Armijo(...) or NoIncrease(...), got {accept!r}.")
        self.accept = accept
        self.step_size = check_type("step_size", step_size, StepSize, who, "a StepSize")
        self.step_size.bind(self.rw.optimizer)
        self.max_tries = check_int("max_tries", max_tries, 1, who)
        self.same_rng = check_bool("same_rng", same_rng, who)
        if log is not None:
            check_type("log", log, Trajectory, who, "a torchrewind.Trajectory")
        self.optimizer = self.rw.optimizer
        # resolved: take a failed non-descent step (around Adam-like optimizers skipping it stalls training: near a
        # zero loss their mini-batch step is often uphill, and the search left 20-60% of iterations without a step)
        self.take_uphill = uphill == "take" or (uphill == "auto" and scales_each_step(self.optimizer))
        # resolved: restart the momentum of a trial whose direction goes uphill (around SGD skipping such a step
        # left the stale momentum buffer in place, so the next iterations went uphill too: 65% of
        # matrix_factorisation's iterations ended without a step)
        has_momentum = any(g.get("momentum", 0) for g in self.optimizer.param_groups)
        if uphill == "restart" and not has_momentum:
            raise RewindValueError(f"{who}: uphill='restart' restarts the optimizer's momentum, but "
                                   f"{type(self.optimizer).__name__} has none here (momentum=0 in every param "
                                   "group); use uphill='skip' or 'take', or give the optimizer momentum.")  # fmt: skip
        self.restart_uphill = uphill == "restart" or (uphill == "auto" and not self.take_uphill and has_momentum)
        self.log = log if log is not None else Trajectory()
        self.iteration = 0
        self.steps = 0
        self.forwards = 0  # loss evaluations (each one forward pass)
        self.backwards = 0
        self._theta0: list[torch.Tensor] | None = None

    # the schedule's settings, as the search's own
    shrink = property(lambda self: self.step_size.shrink)
    grow = property(lambda self: self.step_size.grow)
    lr_max = property(lambda self: self.step_size.lr_max)
    max_growth = property(lambda self: self.step_size.max_growth)

    # -- one iteration -------------------------------------------------------------------------------------
    def step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """Run one iteration: ``loss_fn()`` computes the mini-batch loss (forward only); this calls backward, steps,
        checks, and retries as needed. Returns the loss before the step.

        Example::

            ls = LineSearch(Rewind(model, opt))
            for x, y in loader:
                ls.step(lambda: F.cross_entropy(model(x), y))
        """
        who = type(self).__name__
        if not callable(loss_fn):
            raise RewindTypeError(f"{who}.step takes a callable that returns the loss, got {type(loss_fn).__name__}.")
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        rng_before = _rng_state() if self.same_rng else None
        loss = loss_fn()
        (f0,) = agreed_loss(self.rw, loss, f"{who}: loss_fn()")  # all ranks skip, or none
        self.forwards += 1
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise RewindTypeError(f"{who}: loss_fn() must return a tensor that requires grad "
                                  "(the loss of the current mini-batch).")  # fmt: skip
        it = self.iteration
        self.iteration += 1
        if not math.isfinite(f0):
            self.log.add(Event(it, self.steps, "skipped", f0, None, lrs(opt), "non-finite loss"))
            return f0
        loss.backward()
        self.backwards += 1
        del loss
        rng_after = _rng_state() if self.same_rng else None
        start_lrs = lrs(opt)
        if f0 == 0.0 or all_sum(self.rw.group, [grad_sq(opt, self.rw.group)])[0] == 0.0:
            # a zero loss or a zero gradient: no trial can show a decrease, every try would be wasted; the step is
            # taken as the optimizer proposes it (what plain training does), the lr left as it is
            self.rw.ensure_recorded()
            opt.step()
            self.steps += 1
            why = "zero loss: nothing to search" if f0 == 0.0 else "zero gradient: nothing to search"
            self.log.add(Event(it, self.steps, "accepted", f0, None, lrs(opt), why, extra={"tries": 0}))
            return f0
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        theta0 = self._copy_params(params) if self.accept.needs_direction else None
        restart = self.restart_uphill and theta0 is not None
        restarted = False
        for tries in range(1, self.max_tries + 1):
            self.rw.ensure_recorded()  # so this works with Rewind(auto=False) too
            if restarted:
                _zero_momentum(opt)  # the undo brought the buffers back
            opt.step()
            stepped = True
            try:
                gd = _directional(params, theta0, self.rw.group) if theta0 is not None else 0.0
                if restart and not restarted and all_sum(self.rw.group, [gd])[0] >= 0:
                    # the momentum points uphill for this batch: no lr can help, the gradient's own direction can
                    # (no forward spent on the trial; the undo point stays before the restart, so giving up
                    # restores the buffers)
                    self.rw.undo()
                    stepped, restarted = False, True
                    self.rw.ensure_recorded()
                    _zero_momentum(opt)
                    opt.step()
                    stepped = True
                    gd = _directional(params, theta0, self.rw.group)
                with torch.no_grad():
                    if rng_before is not None:
                        _set_rng_state(rng_before)  # same dropout masks as the first evaluation
                    f1, gd = agreed_loss(self.rw, loss_fn(), f"{who}: loss_fn()", (gd,))
            except BaseException:
                if stepped:
                    self.rw.undo()  # an error while judging the trial: leave the state as before the step
                raise
            finally:
                if rng_after is not None:
                    _set_rng_state(rng_after)
            self.forwards += 1
            if not math.isfinite(f1):
                ok, why = False, "non-finite loss after step"
            elif f1 == f0:  # the lr is below what the loss resolves: accepting it would be a no-op step
                ok, why = False, "the step did not change the loss"
            else:
                ok, why = self.accept(f0, f1, gd)
            used = lrs(opt)
            # a step that is not a descent direction (∇f·Δ ≥ 0: momentum, Adam) and failed: the direction does not
            # depend on the lr, so a smaller one cannot make it one; take it as the optimizer proposes it, or give up
            # now rather than shrink to nothing
            hopeless = not ok and self.accept.needs_direction and gd >= 0
            uphill = hopeless and self.take_uphill and math.isfinite(f1) and f1 != f0
            extra = {"tries": tries, "restarted": True} if restarted else {"tries": tries}
            if ok or uphill:
                self.steps += 1
                why = why if ok else "not a descent direction: the optimizer's step taken as it is"
                self.log.add(Event(it, self.steps, "accepted", f0, f1, used, why, extra=extra))
                if ok:
                    self.step_size.grow_lrs(opt)
                else:
                    self.step_size.reset(opt, start_lrs)  # the lr was not judged by this step
                return f0
            self.rw.undo()
            # the loss did not move: a smaller lr cannot move it either (near a float32-resolved minimum these
            # trials were 45% of wine_zero's forwards, none ever followed by an accepted step)
            unmoved = f1 == f0
            if tries == self.max_tries or hopeless or unmoved or not self.step_size.can_shrink(opt):
                self.step_size.reset(opt, start_lrs)
                if hopeless:
                    why = f"{why}; not a descent direction: a smaller lr cannot help"
                elif unmoved:
                    why = f"{why}; a smaller lr cannot change it either"
                elif tries < self.max_tries:
                    why = f"{why}; the lr is at its floor"
                self.log.add(Event(it, self.steps, "exhausted", f0, f1, used, why, undone=1, extra=extra))
                return f0
            self.log.add(Event(it, self.steps, "rejected", f0, f1, used, why, undone=1, extra=extra))
            self.step_size.shrink_lrs(opt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _copy_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """θ0, into buffers reused across iterations (undo restores θ0 exactly, so one copy serves every try)."""
        old = self._theta0
        if old is None or len(old) != len(params) or any(a.shape != p.shape for a, p in zip(old, params)):
            old = self._theta0 = [local(p.detach()).clone() for p in params]
        else:
            torch._foreach_copy_(old, [local(p.detach()) for p in params])
        return old

    @property
    def stats(self) -> dict[str, Any]:
        """Counts: iterations, kept steps, forward and backward passes, and passes per kept step."""
        return {
            "iterations": self.iteration,
            "steps": self.steps,
            "forwards": self.forwards,
            "backwards": self.backwards,
            "forwards_per_step": self.forwards / max(self.steps, 1),
            **self.log.counts(),
        }

    # -- state -----------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings a saved state must match (those of the rule and the schedule: see :meth:`load_state_dict`)."""
        rule = self.accept.settings() if hasattr(self.accept, "settings") else {"accept": type(self.accept).__name__}
        return {**rule, "max_tries": self.max_tries, "same_rng": self.same_rng, "uphill": self.uphill}

    def state_dict(self) -> dict[str, Any]:
        """Settings, counters (iterations, kept steps, forward and backward passes), the lr schedule's state (the
        lr cap in force) and the log, as plain data. The learning rates themselves are in
        ``optimizer.state_dict()``.

        Example::

            torch.save({"opt": opt.state_dict(), "search": ls.state_dict()}, path)
            ls.load_state_dict(torch.load(path)["search"])
        """
        return {**header(self, self.settings()), "iteration": self.iteration, "steps": self.steps,
                "forwards": self.forwards, "backwards": self.backwards, "step_size": self.step_size.state_dict(),
                "log": self.log.state_dict()}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`. ``strict``: same kind of search with the same settings (``lr_max="initial"``
        restores the original run's cap); ``strict=False`` keeps this search's settings. Refuses a malformed or
        mismatched state with a RewindError before changing anything."""
        who = f"{type(self).__name__}.load_state_dict"
        keys = ("iteration", "steps", "forwards", "backwards")
        sd = check_state(self, state_dict, self.settings(), (*keys, "step_size", "log"), strict, who)
        counters = {k: check_int(k, sd[k], 0, who) for k in keys}
        load_all([(self.step_size, sd["step_size"]), (self.log, sd["log"])], strict)
        for k, v in counters.items():
            setattr(self, k, v)


class LineSearch(Backtracking):
    """Backtracking line search with the Armijo condition, around any optimizer.

    Accepts the optimizer's step Δ when ``f(θ+Δ) ≤ f(θ) + c·∇f(θ)·Δ`` on the same mini-batch; otherwise undoes it
    and retries with every lr multiplied by ``shrink``. After an accepted step the lr grows by ``grow``, so the next
    iteration starts a little above the last accepted lr — the SLS "reset" of Vaswani et al. (2019) — up to
    ``max_growth`` times the initial lr (``"auto"``: 10x around SGD, so start it anywhere up to 10x too low; 1x around
    optimizers that scale each parameter's step, such as Adam, whose tuned lr the search then only lowers when a
    step fails) and ``lr_max`` if given. ``grow="auto"`` is 1.1 around SGD and 10 around Adam & co.: there the next
    iteration starts at the optimizer's own lr again, so a rejected step lowers that step only (with 1.1, 3-5
    rejections in a run kept Adam's lr low for ~20 iterations each and cost train loss). A trial that leaves the
    loss exactly as it was ends the search without a step (the lr is below what the loss resolves: accepting it
    would be a no-op step, and a smaller lr cannot move the loss either). If Δ is not a descent direction
    (∇f·Δ ≥ 0, possible with momentum or Adam), the test becomes "the loss decreased", and a failure cannot be
    helped by a smaller lr (Δ's direction does not depend on it): ``uphill="auto"`` then takes the optimizer's step
    as it is around Adam & co. (as plain training would: skipping such steps left 20-60% of the iterations near a
    zero loss without a step); around SGD with momentum it restarts the momentum as soon as the trial's direction
    is seen to go uphill, before evaluating it (buffers zeroed, the gradient's own step searched; skipping instead
    kept a stale buffer and left 65% of one task's iterations without a step); around others it ends the iteration
    without a step (``"take"`` / ``"restart"`` / ``"skip"`` force one). A zero loss or a zero gradient leaves nothing
    to search: the optimizer's step is taken as it is. After ``max_tries`` failures the state is left as before the
    step and the lr as the iteration started, so the lr never collapses.

    ``min_fraction`` (default None) puts a floor under the lr: shrinking stops at that fraction of the initial lr
    (a rejection there ends the search).

    Defaults (``c="auto"``: 0.3 around SGD & co., 0.1 around optimizers with an ``eps`` setting; ``shrink=0.5``,
    ``grow="auto"``, ``max_growth="auto"``, ``uphill="auto"``) were chosen on the ``tune`` half of
    ``benchmarks/suite`` (``benchmarks/bench_policies.py``).
    Trial evaluations call ``loss_fn`` again (with the first evaluation's RNG state, so dropout masks match); modules
    in training mode such as BatchNorm update their running statistics at each call, as for any extra forward. The
    pieces: ``accept``
    (:class:`~torchrewind.policies.acceptance.Armijo`) and ``step_size`` (:class:`~torchrewind.policies.stepsize.StepSize`).

    Example::

        ls = LineSearch(Rewind(model, torch.optim.SGD(model.parameters(), lr=1.0)))
        for x, y in loader:
            ls.step(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        c: float | str = "auto",
        shrink: float = 0.5,
        grow: float | str = "auto",
        max_tries: int = 10,
        lr_max: float | None | str = None,
        max_growth: float | str | None = "auto",
        min_fraction: float | None = None,
        same_rng: bool = True,
        log: Trajectory | None = None,
        uphill: str = "auto",
    ) -> None:
        who = "LineSearch"
        check_rewind(rewind, who)
        if isinstance(c, str):
            if c != "auto":
                raise RewindValueError(f"{who}: c must be a number in (0, 1) or 'auto', got {c!r}.")
            c = 0.1 if scales_each_step(rewind.optimizer) else 0.3
        super().__init__(rewind, accept=Armijo(c, who),
                         step_size=StepSize(shrink, grow, lr_max, who, max_growth, min_fraction),
                         max_tries=max_tries, same_rng=same_rng, log=log, uphill=uphill)  # fmt: skip

    c = property(lambda self: self.accept.c)


class BoldDriver(Backtracking):
    """The bold-driver rule: keep a step that did not increase the loss (on the same mini-batch, within
    ``tolerance``) and multiply the lr by ``grow``; otherwise undo it, multiply the lr by ``shrink`` and retry. The lr
    never grows above ``max_growth`` (10) times its initial value (nor ``lr_max`` if given): on a loss that keeps
    falling, each accepted step would otherwise grow it without end. It never falls below ``min_fraction`` (1e-3)
    times its initial value (None: no floor): a rejection at the floor ends the iteration's search (no step, the lr
    as the iteration started), where before the lr fell to 1e-10x its start on some tasks and each iteration then
    spent its tries on steps too small to matter. The floor was chosen on the ``tune`` half of ``benchmarks/suite``
    (1e-2, 1e-3, 1e-4: 1e-3 had the lowest or equal mean train loss of 1e-3 and 1e-4 on every task, and fewer passes).
    A step that leaves the loss exactly as it was ends the iteration's search (no step); a zero loss or gradient
    takes the optimizer's step as it is.

    Example::

        bd = BoldDriver(Rewind(model, opt), grow=1.05, shrink=0.5)
        for x, y in loader:
            bd.step(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        grow: float = 1.05,
        shrink: float = 0.5,
        tolerance: float = 0.0,
        max_tries: int = 10,
        lr_max: float | None | str = None,
        max_growth: float | None = 10.0,
        min_fraction: float | None = 1e-3,
        same_rng: bool = True,
        log: Trajectory | None = None,
    ) -> None:
        who = "BoldDriver"
        check_rewind(rewind, who)
        super().__init__(rewind, accept=NoIncrease(tolerance, who),
                         step_size=StepSize(shrink, grow, lr_max, who, max_growth, min_fraction),
                         max_tries=max_tries, same_rng=same_rng, log=log)  # fmt: skip

    tolerance = property(lambda self: self.accept.tolerance)


def _directional(params: list[torch.Tensor], theta0: list[torch.Tensor], group: Any = None) -> float:
    """This rank's share of ∇f·Δ with Δ = θ1 − θ0 (local shards, accumulated in float64): summed over ``group`` it
    is the global value."""
    with torch.no_grad():
        delta = torch._foreach_sub([local(p.detach()) for p in params], theta0)
        dots = []
        for d, p in zip(delta, params):
            g = local(p.grad)
            dot = torch.dot(d.reshape(-1).double(), (g.to_dense() if g.is_sparse else g).reshape(-1).double())
            dots.append((dot / replicas(p, group) if group is not None else dot).cpu())
        return float(torch.stack(dots).sum().item()) if dots else 0.0


def _zero_momentum(opt: torch.optim.Optimizer) -> None:
    """Restart heavy-ball momentum: zero every ``momentum_buffer`` in place (in place, so the Rewind's undo restores
    the same tensors; a zeroed buffer takes the gradient as it is at the next step, as a fresh one does, up to
    dampening)."""
    with torch.no_grad():
        for st in opt.state.values():
            b = st.get("momentum_buffer")
            if isinstance(b, torch.Tensor):
                b.zero_()


def _rng_state() -> tuple:
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(s: tuple) -> None:
    torch.set_rng_state(s[0])
    if s[1] is not None:
        torch.cuda.set_rng_state_all(s[1])
