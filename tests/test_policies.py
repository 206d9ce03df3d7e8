"""The policy layer: NonFiniteGuard, SpikeGuard (+SpikeDetector, batch skipping), LineSearch, BoldDriver, Trajectory.

The key property (``test_*_replay_*``): after any sequence of policy decisions the training state equals, bit for
bit, what the same decisions give when replayed by hand with a plain :class:`Rewind` -- ``optimizer.step()``,
``rw.undo(n)``, ``rw.snapshot()`` and learning-rate edits -- driven only by the policy's :class:`Trajectory` log.
Each replay run starts from an identically seeded model/optimizer/scheduler/RNG, sees the same batches (faults are
part of the data: NaN/inf losses, infinite gradients, inputs scaled by 1e3, an absurd learning rate), and compares
``full_state`` (parameters, optimizer state, param_groups, schedulers, torch RNG) with ``assert_same`` -- never
allclose. The replays also check what the log claims (losses bitwise, learning rates as the documented rules
predict them, trial losses evaluated with the first evaluation's dropout mask, the Armijo test).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from statecheck import assert_same, full_state

from torchrewind import (
    BoldDriver,
    Event,
    LineSearch,
    NonFiniteGuard,
    Rewind,
    RewindError,
    SkippableIterator,
    SpikeDetector,
    SpikeGuard,
    Trajectory,
)
from torchrewind.errors import RewindTypeError, RewindValueError
from torchrewind.policies import BufferWatch
from torchrewind.trajectory import KINDS
from torchrewind.core.values import values_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


# =============================================================================================== the training setup


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 samples, 64 features in [0, 1], 10 classes), in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    return X[perm].contiguous(), y[perm].contiguous()


def make_data(n: int, faults: dict[int, str] | None = None, bs: int = 32) -> list[tuple]:
    """``n`` batches ``(index, x, y, fault)``. Faults belong to the data, so a skipped batch takes its fault along.

    ``poison``: inputs x1e3 (a loss spike); ``nan_loss`` / ``inf_loss``: the loss is NaN / +inf; ``inf_grad``: one
    gradient entry is +inf after backward (finite loss); ``grad_spike``: every gradient x1e3 (finite loss unchanged);
    ``lr_boom``: the step is taken with every lr set to +inf (parameters become non-finite), the lrs are put back
    afterwards."""
    X, y = _digits()
    faults = faults or {}
    out = []
    for i in range(n):
        j = (i * bs) % (len(y) - bs)
        x, t = X[j : j + bs], y[j : j + bs]
        f = faults.get(i)
        if f == "poison":
            x = x * 1e3
        out.append((i, x, t, f))
    return out


def make_model(seed: int = 0, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(64, 32), torch.nn.ReLU()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(32, 10))
    return torch.nn.Sequential(*layers).train()


def make_opt(model: torch.nn.Module, kind: str, lr: float, groups: bool = False) -> torch.optim.Optimizer:
    """Two param groups with a 1:4 lr ratio when ``groups``."""
    first, last = model[0], model[len(model) - 1]
    params = (
        [{"params": first.parameters()}, {"params": last.parameters(), "lr": lr / 4}]
        if groups
        else model.parameters()
    )
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    if kind == "sgd_plain":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    raise ValueError(kind)


def forward_loss(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, fault: str | None) -> torch.Tensor:
    loss = F.cross_entropy(model(x), t)
    if fault == "nan_loss":
        loss = loss + float("nan")
    elif fault == "inf_loss":
        loss = loss * float("inf")
    return loss


def inject_grad(model: torch.nn.Module, fault: str | None) -> None:
    if fault == "inf_grad":
        model[0].weight.grad[0, 0] = float("inf")
    elif fault == "grad_spike":
        for p in model.parameters():
            p.grad.mul_(1e3)


def get_lrs(opt: torch.optim.Optimizer) -> tuple[float, ...]:
    return tuple(float(g["lr"]) for g in opt.param_groups)


def put_lrs(opt: torch.optim.Optimizer, values) -> None:
    for g, v in zip(opt.param_groups, values):
        g["lr"] = v


def boost(opt: torch.optim.Optimizer, fault: str | None):
    """For an ``lr_boom`` batch: set every lr to +inf and return the lrs to put back after the step."""
    if fault != "lr_boom":
        return None
    saved = get_lrs(opt)
    put_lrs(opt, [math.inf for _ in saved])
    return saved


def same_float(a: float | None, b: float | None) -> bool:
    """Bitwise-level float equality (NaN equals NaN)."""
    return values_equal(a, b)


def kinds(log: Trajectory) -> list[str]:
    return [e.kind for e in log.events]


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(p.isfinite().all()) for p in model.parameters())


# =============================================================================================== guard harness


class GuardRun:
    """A model/optimizer/scheduler/Rewind built from a seed; the policy run and the replay each build one."""

    def __init__(self, *, opt="sgd", lr=0.05, capacity=4, sched=True, seed=0, groups=False) -> None:
        self.model = make_model(seed)
        self.opt = make_opt(self.model, opt, lr, groups)
        # ExponentialLR is chainable: it multiplies the group's *current* lr, so any cool-down scaling the guard
        # left behind would compound into the scheduler's lr and show up in the final state.
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.99) if sched else None
        self.rw = Rewind(self.model, self.opt, schedulers=[self.sched] if sched else [], capacity=capacity)

    def state(self) -> dict:
        return full_state(self.model, self.opt, *([self.sched] if self.sched else []))

    def train(self, guard, data) -> list[int]:
        """The README loop. Returns the indices of the batches seen."""
        seen = []
        self.loader = guard.wrap(data)
        for i, x, t, fault in self.loader:
            seen.append(i)
            loss = forward_loss(self.model, x, t, fault)
            self.opt.zero_grad()
            loss.backward()
            inject_grad(self.model, fault)
            saved = boost(self.opt, fault)
            before = get_lrs(self.opt)
            try:
                ok = guard.step(loss)
            finally:
                if saved is not None:
                    put_lrs(self.opt, saved)
            if ok and saved is None:
                # the guard never leaves its cool-down factor in param_groups
                assert get_lrs(self.opt) == before
            if ok and self.sched is not None:
                self.sched.step()
        return seen

    def replay(self, log: Trajectory, data) -> int:
        """Replay the guard's decisions by hand. Returns how many batches were consumed.

        The guard's wrapped loader records a point at the top of every iteration, before forward
        (``rw.snapshot()``): an iteration whose step is not applied is taken back to it (``rw.revert()``), forward
        effects (dropout RNG draws) included, and roll-backs undo from it."""
        pos = 0
        for e in log.events:
            i, x, t, fault = data[pos]
            pos += 1
            self.rw.snapshot()  # what the wrapped loader does before handing out the batch
            loss = forward_loss(self.model, x, t, fault)
            self.opt.zero_grad()
            loss.backward()
            inject_grad(self.model, fault)
            assert same_float(loss.item(), e.loss), (e, loss.item())
            saved = boost(self.opt, fault)
            if e.kind == "accepted":
                if e.reason.startswith("cool-down"):
                    # Recorded before the lrs are scaled (so an undo brings back the scheduler's lrs), stepped at
                    # the logged (scaled) lrs, lrs put back exactly afterwards.
                    base = get_lrs(self.opt)
                    assert e.lrs != base
                    put_lrs(self.opt, e.lrs)
                    self.opt.step()
                    put_lrs(self.opt, base)
                else:
                    assert e.lrs == get_lrs(self.opt), (e, get_lrs(self.opt))
                    self.opt.step()
            elif e.kind == "skipped":
                # check_params: the step was taken and undone (back to the top of the iteration); otherwise no
                # step was taken and the iteration is reverted to its top
                undone = e.undone
                assert undone in (0, 1)
                if undone:
                    self.opt.step()
                    assert not params_finite(self.model)
                    self.rw.undo(undone)
                else:
                    self.rw.revert()
            elif e.kind == "rolled_back":
                if e.undone:
                    self.rw.undo(e.undone)
                else:
                    self.rw.revert()
                pos += e.skipped_batches
            else:  # pragma: no cover
                raise AssertionError(f"a guard logged {e.kind!r}")
            if saved is not None:
                put_lrs(self.opt, saved)
            if e.kind == "accepted" and self.sched is not None:
                self.sched.step()
        return pos


# =============================================================================================== search harness


def directional(params: list[torch.Tensor], theta0: list[torch.Tensor]) -> float:
    """grad . (theta1 - theta0) in float64, one dot per parameter, summed in parameter order."""
    with torch.no_grad():
        dots = [torch.dot((p - t0).reshape(-1).double(), p.grad.reshape(-1).double()) for p, t0 in zip(params, theta0)]
        return float(torch.stack(dots).sum().item()) if dots else 0.0


def armijo(c: float):
    """LineSearch's documented test: f1 <= f0 + c*g.d, or "no increase" when the step is not a descent direction;
    a step that leaves the loss as it was is never accepted. ``descent``: a failed non-descent step ends the search."""

    def accept(f0: float, f1: float, gd: float) -> bool:
        if not math.isfinite(f1) or f1 == f0:
            return False
        return f1 <= f0 + c * gd if gd < 0 else f1 <= f0

    accept.descent = True
    return accept


def bold(tolerance: float):
    def accept(f0: float, f1: float, gd: float) -> bool:
        return math.isfinite(f1) and f1 != f0 and f1 <= f0 + tolerance * abs(f0)

    accept.descent = False
    return accept


def group_by_iteration(log: Trajectory) -> list[list[Event]]:
    out: list[list[Event]] = []
    for e in log.events:
        if out and out[-1][0].iteration == e.iteration:
            out[-1].append(e)
        else:
            assert e.iteration == len(out), "iterations are logged in order, none missing"
            out.append([e])
    return out


class SearchRun:
    def __init__(self, *, opt="sgd", lr=1.0, seed=0, groups=False, dropout=0.2, sched=False) -> None:
        self.model = make_model(seed, dropout)
        self.opt = make_opt(self.model, opt, lr, groups)
        # StepLR is chainable too: it halves whatever lr the search left in param_groups
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=5, gamma=0.5) if sched else None
        self.rw = Rewind(self.model, self.opt, schedulers=[self.sched] if sched else [])

    def state(self) -> dict:
        return full_state(self.model, self.opt, *([self.sched] if self.sched else []))

    def train(self, policy, data) -> list[float]:
        out = []
        for i, x, t, fault in data:
            out.append(policy.step(lambda: forward_loss(self.model, x, t, fault)))
            if self.sched is not None:
                self.sched.step()
        return out

    def replay(self, log: Trajectory, data, *, accept, shrink, grow, lr_max, max_tries, lr_min=None,
               take_uphill=False, restart=False) -> None:
        """Replay a LineSearch/BoldDriver log by hand: step, evaluate the trial loss on the same batch with the
        first evaluation's RNG state (then put the RNG back), undo + shrink on rejection, reset the lr on
        exhaustion (also when the loss did not move), grow (capped) on acceptance; with ``restart``, a trial whose
        direction goes uphill is undone before its evaluation and the momentum buffers zeroed for this and every
        later trial of the iteration. Asserts the log's losses, lrs and decisions on the way."""
        model, opt, rw = self.model, self.opt, self.rw
        for evs in group_by_iteration(log):
            i, x, t, fault = data[evs[0].iteration]

            def loss_fn():
                return forward_loss(model, x, t, fault)

            opt.zero_grad(set_to_none=True)
            rng_before = torch.get_rng_state()
            loss = loss_fn()
            f0 = loss.item()
            assert all(same_float(e.loss, f0) for e in evs)
            if not math.isfinite(f0):
                assert [e.kind for e in evs] == ["skipped"] and evs[0].lrs == get_lrs(opt)
                if self.sched is not None:
                    self.sched.step()
                continue
            loss.backward()
            del loss
            rng_after = torch.get_rng_state()
            start = get_lrs(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if f0 == 0.0 or sum(float(p.grad.double().square().sum()) for p in params) == 0.0:
                # nothing to search: the optimizer's step as it is, the lr unchanged
                assert [(e.kind, e.extra, e.loss_after) for e in evs] == [("accepted", {"tries": 0}, None)]
                opt.step()
                if self.sched is not None:
                    self.sched.step()
                continue
            theta0 = [p.detach().clone() for p in params]
            restarted = False
            for tries, e in enumerate(evs, 1):
                assert e.lrs == get_lrs(opt), (e, get_lrs(opt))
                if restarted:
                    rw.ensure_recorded()  # the undo point keeps the buffers as they were
                    zero_momentum(opt)
                opt.step()
                gd = directional(params, theta0)
                if restart and not restarted and gd >= 0:
                    rw.undo()
                    restarted = True
                    rw.ensure_recorded()
                    zero_momentum(opt)
                    opt.step()
                    gd = directional(params, theta0)
                assert e.extra == ({"tries": tries, "restarted": True} if restarted else {"tries": tries}), e
                torch.set_rng_state(rng_before)  # same dropout mask as the first evaluation
                with torch.no_grad():
                    f1 = loss_fn().item()
                torch.set_rng_state(rng_after)
                assert same_float(f1, e.loss_after), (e, f1)
                if e.kind == "accepted" and not accept(f0, f1, gd):  # a failed non-descent step, taken as it is
                    assert take_uphill and accept.descent and gd >= 0 and math.isfinite(f1) and f1 != f0, (e, gd)
                    assert tries == len(evs) and e.undone == 0
                    put_lrs(opt, start)
                    continue
                assert accept(f0, f1, gd) == (e.kind == "accepted"), (e, f0, f1, gd)
                if e.kind == "accepted":
                    assert tries == len(evs) and e.undone == 0
                    factor = grow
                    if lr_max is not None:
                        top = max(get_lrs(opt))
                        factor = min(factor, lr_max / top) if top > 0 else factor
                    if factor > 1.0:
                        put_lrs(opt, [lr * factor for lr in get_lrs(opt)])
                    if lr_max is not None and max(get_lrs(opt)) > lr_max:  # lr * (cap / lr) an ulp over: clamped
                        put_lrs(opt, [min(lr, lr_max) for lr in get_lrs(opt)])
                    continue
                assert e.undone == 1
                rw.undo()
                assert get_lrs(opt) == e.lrs  # the Rewind brought back the lrs this trial used
                hopeless = accept.descent and gd >= 0  # a smaller lr cannot turn it into a descent direction
                floor = lr_min is not None and max(get_lrs(opt)) <= lr_min  # the lr cannot fall any lower
                unmoved = f1 == f0  # a smaller lr cannot move the loss either
                if e.kind == "exhausted":
                    assert tries == len(evs) and (tries == max_tries or hopeless or floor or unmoved), (e, tries, gd)
                    put_lrs(opt, start)
                else:
                    assert e.kind == "rejected" and tries < max_tries and not (hopeless or floor or unmoved)
                    factor = shrink if lr_min is None else max(shrink, lr_min / max(get_lrs(opt)))
                    put_lrs(opt, [lr * factor for lr in get_lrs(opt)])
                    if lr_min is not None and max(get_lrs(opt)) < lr_min:  # an ulp under the floor: clamped
                        top = max(get_lrs(opt))
                        put_lrs(opt, [lr * (lr_min / top) for lr in get_lrs(opt)])
            if self.sched is not None:
                self.sched.step()


def zero_momentum(opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for state in opt.state.values():
            if isinstance(state.get("momentum_buffer"), torch.Tensor):
                state["momentum_buffer"].zero_()


def nonfinite_reason(e: Event) -> bool:
    return "non-finite" in e.reason


# =============================================================================================== replay exactness


NF_FAULTS = {2: "nan_loss", 5: "inf_grad", 6: "inf_loss", 9: "lr_boom", 12: "nan_loss", 13: "nan_loss", 17: "lr_boom"}


@pytest.mark.parametrize("check_params", [True, False])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_nonfinite_guard_replay_is_exact(opt, check_params):
    faults = dict(NF_FAULTS) if check_params else {k: v for k, v in NF_FAULTS.items() if v != "lr_boom"}
    data = make_data(22, faults)
    run = GuardRun(opt=opt, lr=0.05 if opt == "sgd" else 0.01, capacity=2)
    guard = NonFiniteGuard(run.rw, check_params=check_params, max_consecutive=3)
    seen = run.train(guard, data)
    assert seen == list(range(22))
    reasons = [e.reason for e in guard.log if e.kind == "skipped"]
    assert "non-finite loss (nan)" in reasons and "non-finite loss (inf)" in reasons
    assert "non-finite gradient" in reasons
    if check_params:
        assert reasons.count("step made parameters non-finite: undone") == 2
    assert guard.log.counts()["accepted"] == guard.steps == 22 - len(faults)
    assert params_finite(run.model)

    rep = GuardRun(opt=opt, lr=0.05 if opt == "sgd" else 0.01, capacity=2)
    assert rep.replay(guard.log, data) == 22
    assert_same(run.state(), rep.state())


SPIKE_FAULTS = {3: "nan_loss", 5: "inf_grad", 12: "poison", 17: "nan_loss", 21: "lr_boom", 24: "nan_loss",
                25: "inf_loss", 30: "poison", 33: "grad_spike", 40: "poison"}  # fmt: skip


def spike_guard(rw, **kw):
    opts = dict(detector=SpikeDetector(window=16, threshold=6, warmup=8), rollback=3, skip_batches=2, cooldown=3,
                ramp=4, max_consecutive=2, check_params=True, max_rollbacks=20, drop_first=False)  # fmt: skip
    opts.update(kw)
    return SpikeGuard(rw, **opts)


@pytest.mark.parametrize(
    "opt,lr,groups", [("sgd", 0.05, False), ("adam", 0.01, True)], ids=["sgd-momentum", "adam-2groups"]
)
def test_spike_guard_replay_is_exact(opt, lr, groups):
    data = make_data(48, SPIKE_FAULTS)
    run = GuardRun(opt=opt, lr=lr, capacity=4, groups=groups)
    guard = spike_guard(run.rw)
    seen = run.train(guard, data)
    log = guard.log
    rolled = [e for e in log if e.kind == "rolled_back"]
    # every decision kind a guard takes, including the corner cases, happened
    assert any("loss spike" in e.reason for e in rolled)
    assert any(nonfinite_reason(e) and "in a row" in e.reason for e in rolled)
    assert any(e.undone == 3 for e in rolled)
    assert all(e.skipped_batches == 2 for e in rolled)
    assert any(e.kind == "skipped" and "parameters non-finite" in e.reason for e in log)  # check_params undid one
    assert any(e.kind == "skipped" and nonfinite_reason(e) for e in log)
    assert any(e.kind == "accepted" and e.reason.startswith("cool-down") for e in log)
    assert any(e.kind == "accepted" and not e.reason for e in log)
    # batches: the loader skipped exactly skip_batches after each roll-back, and nothing else
    assert run.loader.skipped == 2 * len(rolled)
    assert len(seen) == len(log) and len(seen) + run.loader.skipped == 48
    for e in rolled:
        k = e.iteration  # one iteration per batch seen
        if k + 1 < len(seen):
            assert seen[k + 1] == seen[k] + 3

    rep = GuardRun(opt=opt, lr=lr, capacity=4, groups=groups)
    assert rep.replay(log, data) == 48
    assert_same(run.state(), rep.state())


def _guarded_train(run: GuardRun, guard, data, *, framework: bool, wrap: bool = False) -> None:
    """``framework``: the loop of a framework that calls optimizer.step() itself, with the guard's
    before_step/after_step hooks; else guard.step(loss). ``wrap=False``: no wrapped iterator (skip_batches then
    means: the next batches' steps are not applied)."""
    for i, x, t, fault in guard.wrap(data) if wrap else data:
        loss = forward_loss(run.model, x, t, fault)
        run.opt.zero_grad()
        loss.backward()
        inject_grad(run.model, fault)
        saved = boost(run.opt, fault)
        try:
            if framework:
                guard.before_step()
                run.opt.step()  # the framework's step
                ok = guard.after_step(loss)
            else:
                ok = guard.step(loss)
        finally:
            if saved is not None:
                put_lrs(run.opt, saved)
        if ok and run.sched is not None:
            run.sched.step()


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped-loader", "framework-loader"])
@pytest.mark.parametrize("guard_kind", ["spike", "nonfinite"])
def test_after_step_takes_the_same_decisions_and_state_as_step(guard_kind, wrap):
    """before_step(); <framework's optimizer.step()>; after_step(loss) == step(loss), bit for bit: the decisions, the
    logged losses and lrs, and the final parameters, optimizer state and scheduler."""
    data = make_data(48, SPIKE_FAULTS)

    def build(capacity):
        run = GuardRun(opt="adam", lr=0.01, capacity=capacity, groups=True)
        if guard_kind == "spike":
            return run, spike_guard(run.rw)
        return run, NonFiniteGuard(run.rw, check_params=True, max_consecutive=5)

    ref, g_ref = build(4)
    if wrap:
        ref.train(g_ref, data)
    else:
        _guarded_train(ref, g_ref, data, framework=False)
    fw, g_fw = build(5)  # the framework's step takes one history slot before the decision: capacity rollback + 1
    _guarded_train(fw, g_fw, data, framework=True, wrap=wrap)
    assert kinds(g_fw.log) == kinds(g_ref.log)
    assert "rolled_back" in kinds(g_ref.log) or guard_kind == "nonfinite"
    assert "skipped" in kinds(g_ref.log)
    for a, b in zip(g_fw.log, g_ref.log):
        assert (a.iteration, a.step, a.reason, a.lrs, a.skipped_batches) == (b.iteration, b.step, b.reason, b.lrs,
                                                                            b.skipped_batches)  # fmt: skip
        assert same_float(a.loss, b.loss)
        # after_step also undid the framework's step whenever the decision was not to apply it
        assert a.undone == b.undone + (a.kind != "accepted" and "parameters non-finite" not in a.reason)
    assert any(e.reason.startswith("cool-down") for e in g_ref.log) or guard_kind == "nonfinite"
    assert_same(ref.state(), fw.state())


def test_after_step_inside_step_closure_and_without_a_step():
    """before_step() inside optimizer.step(closure) (Lightning's order: the pre-step hook recorded before the
    closure ran) undoes to the state before the closure; a step the framework did not take is logged, not undone."""
    m, o, rw = tiny(capacity=3)
    guard = NonFiniteGuard(rw)
    backprop(m, o)
    guard.before_step()
    o.step()
    assert guard.after_step(m(_X).pow(2).mean().detach()) is True
    before = full_state(m, o)

    def closure():
        loss = backprop(m, o, "nan_grad")
        guard.before_step()  # inside the step: must not record a second point
        closure.loss = loss
        return loss

    o.step(closure)
    assert guard.after_step(closure.loss) is False and guard.log[-1].undone == 1
    assert_same(before, full_state(m, o))
    backprop(m, o)
    guard.before_step()  # e.g. GradScaler found inf and skipped optimizer.step()
    assert guard.after_step(1.0) is False and "not called" in guard.log[-1].reason
    assert_same(before, full_state(m, o))
    with pytest.raises(RewindError, match="before_step"):
        guard.after_step(1.0)


def test_spike_guard_replay_rollback_limited_by_history():
    """rollback=3 but the history holds fewer steps right after a roll-back: min(rollback, len(rw)) are undone."""
    data = make_data(48, SPIKE_FAULTS)
    run = GuardRun(opt="sgd", lr=0.05, capacity=4)
    guard = spike_guard(run.rw)
    depth = []  # len(rw) before each decision: what a roll-back can undo

    class Probe:  # the guard, seen from the loop
        wrap = staticmethod(guard.wrap)

        @staticmethod
        def step(loss):
            depth.append(len(run.rw))
            return guard.step(loss)

    run.train(Probe, data)
    rolled = [e for e in guard.log if e.kind == "rolled_back"]
    # + 1: a step check_params undid before the roll-back (it left the history as deep as before); on probation
    # after a roll-back, only the steps taken since it are undone
    since = {e.iteration: sum(1 for a in guard.log if a.kind == "accepted" and p.iteration < a.iteration < e.iteration)
             for p, e in zip(rolled, rolled[1:])}  # fmt: skip
    assert [e.undone for e in rolled] == [
        (since[e.iteration] if "on probation" in e.reason else min(3, depth[e.iteration]))
        + ("parameters non-finite" in e.reason) for e in rolled]  # fmt: skip
    assert any("on probation" in e.reason for e in rolled)
    assert any(e.undone < 3 for e in rolled), [e.undone for e in rolled]
    rep = GuardRun(opt="sgd", lr=0.05, capacity=4)
    rep.replay(guard.log, data)
    assert_same(run.state(), rep.state())


SEARCH_FAULTS = {4: "nan_loss", 9: "poison", 14: "poison", 18: "inf_loss"}

SEARCHES = {
    # name: (optimizer, lr, policy class, kwargs, accept, lr_max used by the replay)
    "linesearch-sgd": ("sgd", 1.0, LineSearch, dict(max_tries=4, c=1e-4, lr_max="initial"), armijo(1e-4), 1.0),
    # max_growth="auto": 10x the initial lr around SGD (no eps setting), 1x around Adam
    # c="auto": 0.3 around SGD, 0.1 around Adam & co.
    "linesearch-sgd-defaults": ("sgd", 1.0, LineSearch, dict(max_tries=4), armijo(0.3), 10.0),
    "linesearch-sgd-growth": ("sgd_plain", 3.0, LineSearch, dict(max_tries=4, max_growth=2.0), armijo(0.3), 6.0),
    "linesearch-adam": ("adam", 0.05, LineSearch, dict(max_tries=4, c=0.3, shrink=0.3, lr_max="initial"),
                        armijo(0.3), 0.05),
    # uphill="skip": a failed non-descent step ends the iteration without a step (the default around SGD)
    "linesearch-adam-skip": ("adam", 0.05, LineSearch, dict(max_tries=4, c=0.3, shrink=0.3, lr_max="initial",
                                                            uphill="skip"), armijo(0.3), 0.05),
    "bolddriver-sgd": ("sgd", 0.5, BoldDriver, dict(max_tries=4), bold(0.0), 5.0),  # max_growth=10 by default
    "bolddriver-adam-tol": ("adam", 0.02, BoldDriver, dict(max_tries=3, tolerance=1e-4, grow=1.2, lr_max=None,
                                                           max_growth=None), bold(1e-4), None),
    # a floor high enough to be reached in 24 iterations (BoldDriver's default is 1e-3 of the initial lr)
    "bolddriver-sgd-floor": ("sgd", 0.5, BoldDriver, dict(max_tries=4, min_fraction=0.5), bold(0.0), 5.0),
}


@pytest.mark.parametrize("sched", [False, True], ids=["", "steplr"])
@pytest.mark.parametrize("name", list(SEARCHES))
def test_search_replay_is_exact(name, sched):
    opt, lr, cls, kw, accept, lr_max = SEARCHES[name]
    data = make_data(24, SEARCH_FAULTS)
    run = SearchRun(opt=opt, lr=lr, groups=True, sched=sched)
    pol = cls(run.rw, **kw)
    returned = run.train(pol, data)
    log = pol.log
    c = log.counts()
    take_uphill = cls is LineSearch and opt == "adam" and kw.get("uphill", "auto") != "skip"
    uphill = [e for e in log if e.kind == "accepted" and e.reason.startswith("not a descent direction")]
    if take_uphill:  # uphill="auto" around Adam: a failed non-descent step is taken as Adam proposes it
        assert c["accepted"] and uphill and not c["exhausted"] and c["skipped"] == 2, c
    else:  # around Adam every failure here is a non-descent step, which ends the search at once (no "rejected")
        assert c["accepted"] and (c["rejected"] or opt == "adam") and c["exhausted"] and c["skipped"] == 2, c
        assert not uphill
    # step() returns the loss before the step
    assert all(same_float(r, evs[0].loss) for r, evs in zip(returned, group_by_iteration(log)))
    # per-group lrs are scaled together: the 4:1 ratio holds in every decision
    for e in log:
        assert e.lrs[1] / e.lrs[0] == pytest.approx(0.25, rel=1e-12)

    if "floor" in name:  # the floor was reached and ended a search
        assert any("floor" in e.reason for e in log if e.kind == "exhausted")
    default_grow = (10.0 if opt == "adam" else 1.1) if cls is LineSearch else 1.05  # LineSearch: grow="auto"
    rep = SearchRun(opt=opt, lr=lr, groups=True, sched=sched)
    floor = kw.get("min_fraction", 1e-3 if cls is BoldDriver else None)
    rep.replay(log, data, accept=accept, shrink=kw.get("shrink", 0.5), grow=kw.get("grow", default_grow),
               lr_max=lr_max, max_tries=kw["max_tries"], lr_min=None if floor is None else floor * lr,
               take_uphill=take_uphill, restart=cls is LineSearch and opt == "sgd")  # fmt: skip
    assert_same(run.state(), rep.state())


# ----------------------------------------------------------------------------------- randomized replays (Hypothesis)

FAULT_KINDS = ["nan_loss", "inf_loss", "inf_grad", "poison", "grad_spike", "lr_boom"]


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    faults=st.dictionaries(st.integers(0, 27), st.sampled_from(FAULT_KINDS), max_size=8),
    capacity=st.integers(1, 4),
    rollback_frac=st.floats(0, 1),
    skip=st.integers(0, 2),
    cooldown=st.integers(0, 3),
    ramp=st.integers(0, 3),
    max_consecutive=st.integers(1, 3),
    check_params=st.booleans(),
    opt=st.sampled_from(["sgd", "adam"]),
    drop_first=st.booleans(),
)
def test_spike_guard_random_faults_replay(faults, capacity, rollback_frac, skip, cooldown, ramp, max_consecutive,
                                          check_params, opt, drop_first):  # fmt: skip
    if not check_params:
        faults = {k: v for k, v in faults.items() if v != "lr_boom"}
    data = make_data(28, faults)
    rollback = 1 + int(rollback_frac * (capacity - 1))
    kw = dict(detector=SpikeDetector(window=8, threshold=5, warmup=4), rollback=rollback, skip_batches=skip,
              cooldown=cooldown, ramp=ramp, max_consecutive=max_consecutive, check_params=check_params,
              max_rollbacks=100, lr_factor=0.5, drop_first=drop_first)  # fmt: skip
    lr = 0.05 if opt == "sgd" else 0.01
    run = GuardRun(opt=opt, lr=lr, capacity=capacity)
    guard = SpikeGuard(run.rw, **kw)
    try:
        run.train(guard, data)
    except RewindError as e:
        # only way out: non-finite parameters max_consecutive times in a row (see the report on SpikeGuard)
        assert "consecutive iterations were not applied" in str(e)
    assert all(e.undone <= rollback for e in guard.log)
    rep = GuardRun(opt=opt, lr=lr, capacity=capacity)
    rep.replay(guard.log, data)
    assert_same(run.state(), rep.state())


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    faults=st.dictionaries(st.integers(0, 11), st.sampled_from(["nan_loss", "inf_loss", "poison"]), max_size=4),
    bolddriver=st.booleans(),
    opt=st.sampled_from(["sgd", "sgd_plain", "adam"]),
    log_lr=st.floats(-3, 1),
    shrink=st.sampled_from([0.3, 0.5, 0.9]),
    grow=st.sampled_from([1.0, 1.1, 2.0]),
    max_tries=st.integers(1, 4),
    groups=st.booleans(),
    cap=st.sampled_from([None, "initial", 2.0]),
)
def test_search_random_replay(faults, bolddriver, opt, log_lr, shrink, grow, max_tries, groups, cap):
    lr = 10.0**log_lr
    data = make_data(12, faults)
    if bolddriver:
        kw = dict(shrink=shrink, grow=grow, max_tries=max_tries, lr_max=None if cap is None else 2.0 * lr)
        cls, accept, lr_max = BoldDriver, bold(0.0), 10.0 * lr if cap is None else 2.0 * lr  # max_growth=10
    else:
        kw = dict(shrink=shrink, grow=grow, max_tries=max_tries, c=0.2,
                  lr_max={None: None, "initial": "initial", 2.0: 2.0 * lr}[cap])  # fmt: skip
        cls, accept = LineSearch, armijo(0.2)
        auto = lr if opt == "adam" else 10.0 * lr  # max_growth="auto": 1x around Adam (it has eps), 10x around SGD
        lr_max = min(lr if cap == "initial" else kw["lr_max"] or math.inf, auto)
    run = SearchRun(opt=opt, lr=lr, groups=groups)
    pol = cls(run.rw, **kw)
    run.train(pol, data)
    rep = SearchRun(opt=opt, lr=lr, groups=groups)
    rep.replay(pol.log, data, accept=accept, shrink=shrink, grow=grow, lr_max=lr_max, max_tries=max_tries,
               lr_min=1e-3 * lr if bolddriver else None,  # BoldDriver's default floor
               take_uphill=not bolddriver and opt == "adam",  # LineSearch's uphill="auto": Adam's step taken,
               restart=not bolddriver and opt == "sgd")  # SGD's momentum restarted
    assert_same(run.state(), rep.state())


# =============================================================================================== NonFiniteGuard


def tiny(capacity: int = 4, lr: float = 0.1, opt: str = "sgd"):
    """A 3->2 linear model (no RNG use) for controlled unit tests; ``feed`` backprops a real loss."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    o = torch.optim.SGD(m.parameters(), lr=lr) if opt == "sgd" else torch.optim.Adam(m.parameters(), lr=lr)
    return m, o, Rewind(m, o, capacity=capacity)


_X = torch.linspace(-1, 1, 12).reshape(4, 3)


def backprop(m, o, fault=None) -> torch.Tensor:
    o.zero_grad()
    loss = m(_X).pow(2).mean()
    if fault == "nan_loss":
        loss = loss + float("nan")
    elif fault == "inf_loss":
        loss = loss * float("inf")
    loss.backward()
    if fault == "inf_grad":
        m.weight.grad[0, 1] = float("inf")
    elif fault == "nan_grad":
        m.bias.grad[1] = float("nan")
    return loss


@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "inf_grad", "nan_grad"])
def test_nonfinite_guard_never_applies_nonfinite_step(fault):
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw)
    backprop(m, o)
    assert guard.step(m(_X).pow(2).mean().detach()) is True  # a normal step first (momentum-free SGD)
    before = full_state(m, o)
    loss = backprop(m, o, fault)
    assert guard.step(loss) is False
    assert_same(before, full_state(m, o))
    e = guard.log[-1]
    assert (e.kind, e.step, e.iteration) == ("skipped", 1, 1)
    assert e.reason == ("non-finite gradient" if "grad" in fault else f"non-finite loss ({loss.item()})")
    assert guard.steps == 1 and guard.consecutive == 1


def test_nonfinite_guard_accepts_float_loss_and_forwards_closure():
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(0.0)

    backprop(m, o)
    assert guard.step(0.5, closure) is True
    assert calls == [1]
    assert guard.log[-1].loss == 0.5 and guard.log[-1].kind == "accepted"


def test_nonfinite_guard_raises_after_max_consecutive_with_history():
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw, max_consecutive=3)
    backprop(m, o)
    guard.step(1.0)
    # two in a row, then a good step resets the count
    for _ in range(2):
        assert guard.step(backprop(m, o, "nan_loss")) is False
    assert guard.step(backprop(m, o)) is True and guard.consecutive == 0
    assert guard.step(backprop(m, o, "inf_grad")) is False
    assert guard.step(backprop(m, o, "nan_loss")) is False
    before = full_state(m, o)
    with pytest.raises(RewindError) as info:
        guard.step(backprop(m, o, "inf_loss"))
    msg = str(info.value)
    assert "3 consecutive iterations were not applied" in msg and "max_consecutive=3" in msg
    for line in ("iteration 4: skipped (non-finite gradient)", "iteration 5: skipped (non-finite loss (nan))",
                 "iteration 6: skipped (non-finite loss (inf))", "iteration 3: accepted"):  # fmt: skip
        assert line in msg, msg
    assert_same(before, full_state(m, o))  # the refused step was not applied either


def test_nonfinite_guard_check_params_undoes_a_step_that_blew_up():
    m, o, rw = tiny(lr=0.1)
    guard = NonFiniteGuard(rw, check_params=True)
    backprop(m, o)
    guard.step(1.0)
    backprop(m, o)
    o.param_groups[0]["lr"] = math.inf
    before = full_state(m, o)
    assert guard.step(1.0) is False
    assert_same(before, full_state(m, o))
    assert params_finite(m)
    e = guard.log[-1]
    assert e.kind == "skipped" and e.reason == "step made parameters non-finite: undone" and e.lrs == (math.inf,)
    assert guard.steps == 1


def test_nonfinite_guard_without_check_params_lets_a_blowup_through():
    """The contrast: check_params is what catches a finite-gradient step that overflows the parameters."""
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw)
    backprop(m, o)
    o.param_groups[0]["lr"] = math.inf
    assert guard.step(1.0) is True
    assert not params_finite(m)


def test_nonfinite_guard_check_grads_false_only_checks_the_loss():
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw, check_grads=False)
    assert guard.step(backprop(m, o, "nan_loss")) is False
    assert guard.step(backprop(m, o, "inf_grad")) is True
    assert not params_finite(m)


def test_check_params_undo_is_logged_in_event_undone():
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw, check_params=True)
    backprop(m, o)
    o.param_groups[0]["lr"] = math.inf
    guard.step(1.0)
    e = guard.log[-1]
    assert e.reason == "step made parameters non-finite: undone"
    assert e.undone == 1  # Event.undone: "steps undone by this decision"


# =============================================================================================== SpikeDetector


def test_spike_detector_mad_score_and_warmup():
    det = SpikeDetector(window=5, threshold=3.0, warmup=5, min_rel=0.2, space="linear", min_scale=0.0, min_abs=0.0)
    for x in [1.0, 2.0, 3.0, 4.0]:
        assert det.score(1e9) == 0.0 and det.is_spike(1e9) is False  # warm-up: no finite value is a spike
        det.update(x)
    assert det.is_spike(1e9) is False
    det.update(5.0)
    # median 3, MAD = median(2, 1, 0, 1, 2) = 1
    assert det.centre_and_scale() == (3.0, 1.4826)
    assert det.score(10.0) == 7.0 / 1.4826
    assert det.is_spike(10.0) and not det.is_spike(3.0 + 3 * 1.4826)  # z == 3 is not above the threshold
    assert not det.is_spike(-100.0)  # only upward spikes
    # the window keeps the last 5 values
    for x in [3.0] * 5:
        det.update(x)
    assert list(det.values) == [3.0] * 5 and det.count == 10


def test_spike_detector_nonfinite_values():
    det = SpikeDetector(window=4, warmup=2)
    assert det.is_spike(math.nan) and det.is_spike(math.inf)  # even during warm-up
    det.update(math.nan)
    det.update(math.inf)
    assert det.count == 0 and not det.values


def test_spike_detector_min_rel():
    det = SpikeDetector(window=10, threshold=3.0, warmup=5, min_rel=0.2, space="linear", min_scale=0.0, min_abs=0.0)
    for i in range(10):
        det.update(1.0 + 0.001 * (i % 3))
    assert det.score(1.15) > 100  # a huge z-score ...
    assert not det.is_spike(1.15)  # ... but only 15% above the median
    assert det.is_spike(1.25)
    det.min_rel = 0.1
    assert det.is_spike(1.15)


def test_spike_detector_constant_series_uses_tiny_scale():
    det = SpikeDetector(window=5, threshold=6.0, warmup=3, min_rel=0.0, space="linear", min_scale=0.0, min_abs=0.0)
    for _ in range(5):
        det.update(2.0)
    assert det.centre_and_scale() == (2.0, 0.0)
    assert det.is_spike(2.0 + 1e-9) and not det.is_spike(2.0)


def test_spike_detector_ema():
    det = SpikeDetector(method="ema", alpha=0.5, warmup=2, threshold=2.0, min_rel=0.0, window=3, space="linear", min_scale=0.0, min_abs=0.0)
    det.update(1.0)
    assert (det.mean, det.var) == (1.0, 0.0)
    det.update(2.0)
    assert (det.mean, det.var) == (1.5, 0.25)  # var = (1-a)(var + a d^2)
    assert det.score(2.5) == 2.0 and not det.is_spike(2.5) and det.is_spike(2.5001)
    for x in [2.0, 2.0, 2.0, 2.0, 2.0]:  # ema ignores the window: warm-up may exceed it
        det.update(x)
    assert det.mean == pytest.approx(2.0, abs=0.02) and len(det.values) == 3
    SpikeDetector(method="ema", window=3, warmup=10)  # allowed for ema


@pytest.mark.parametrize("method", ["mad", "ema"])
def test_spike_detector_state_dict_round_trip(method):
    det = SpikeDetector(method=method, window=6, warmup=3)
    for i in range(9):
        det.update(1.0 + 0.1 * (i % 4))
    sd = det.state_dict()
    other = SpikeDetector(method=method, window=6, warmup=3)
    other.load_state_dict(json.loads(json.dumps(sd)))  # plain data, serialisable
    assert other.state_dict() == sd
    for x in [0.5, 1.2, 1.5, 3.0, 30.0]:
        assert other.score(x) == det.score(x) and other.is_spike(x) == det.is_spike(x)
    det.update(7.0)  # the saved dict is a copy
    assert sd["values"] != det.state_dict()["values"] and other.state_dict() == json.loads(json.dumps(sd))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(xs=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20), x=st.floats(-1e6, 1e6))
def test_spike_detector_mad_matches_reference(xs, x):
    import statistics

    det = SpikeDetector(window=7, warmup=1, threshold=6.0, min_rel=0.2, space="linear", min_scale=0.0, min_abs=0.0)
    for v in xs:
        det.update(v)
    last = xs[-7:]
    med = statistics.median(last)
    mad = statistics.median([abs(v - med) for v in last])
    assert det.centre_and_scale() == (med, 1.4826 * mad)
    scale = 1.4826 * mad if mad > 0 else 1e-12 * max(abs(med), 1.0)
    assert det.score(x) == (x - med) / scale
    assert det.is_spike(x) == ((x - med) / scale > 6.0 and x > med + 0.2 * abs(med))


def test_spike_detector_log_space_judges_ratios():
    """The default judges log(x): a classifier near zero loss has batches of 0.1 among batches of 0.01 (a factor
    of 10 is ordinary noise there), while a run at a steady loss of 1 flags a factor of 3."""
    near_zero = SpikeDetector(window=20, warmup=10)
    for i in range(20):
        near_zero.update([0.01, 0.003, 0.1, 0.02, 0.0005][i % 5])
    assert near_zero.in_log and not near_zero.is_spike(0.3) and near_zero.is_spike(1e3)
    med = statistics.median(near_zero.values)
    us = [math.log(v) for v in near_zero.values]
    um = statistics.median(us)
    scale = max(1.4826 * statistics.median([abs(u - um) for u in us]), 0.1)
    assert near_zero.centre_and_scale() == (um, scale) and near_zero.score(0.3) == (math.log(0.3) - um) / scale
    assert med == statistics.median([0.01, 0.003, 0.1, 0.02, 0.0005] * 4)
    steady = SpikeDetector(window=20, warmup=10)
    for i in range(20):
        steady.update(1.0 + 0.01 * (i % 3))
    # min_scale 0.1 in log units: a 10% wobble is not a spike, a 3x jump is
    assert not steady.is_spike(1.3) and steady.is_spike(3.0)
    assert steady.centre_and_scale()[1] == 0.1


def test_spike_detector_tolerances_near_zero_and_negative_losses():
    det = SpikeDetector(window=10, warmup=5, min_abs=0.01)
    for x in [1.0, 0.9, 1.1, 1.0, 0.95] + [0.0] * 10:  # the start sets the absolute scale; then an exact zero loss
        det.update(x)
    assert det.centre_and_scale()[0] == math.log(1e-30) or not det.in_log
    assert not det.is_spike(1e-9) and not det.is_spike(0.009)  # below 1% of the loss at the start
    assert det.is_spike(0.02)
    neg = SpikeDetector(window=10, warmup=5)  # a loss that lives below zero: judged in linear space
    for i in range(10):
        neg.update(-5.0 + 0.1 * (i % 3))
    assert not neg.in_log and not neg.is_spike(-4.8) and neg.is_spike(100.0)


# =============================================================================================== SpikeGuard


def quiet(i: int) -> float:
    """A calm loss series: 1.00, 1.01, 1.02, 1.00, ..."""
    return 1.0 + 0.01 * (i % 3)


def det(**kw) -> SpikeDetector:
    return SpikeDetector(**{"window": 10, "threshold": 6.0, "warmup": 5, **kw})


def test_spike_guard_detects_after_warmup_not_during():
    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, drop_first=False, detector=det(warmup=5))
    for i in range(2):
        backprop(m, o)
        assert guard.step(quiet(i))
    backprop(m, o)
    assert guard.step(100.0) is True  # during warm-up: accepted, and it counts towards the warm-up
    assert guard.log[-1].kind == "accepted"
    for i in range(2):
        backprop(m, o)
        guard.step(quiet(i))
    assert guard.detector.count == 5
    backprop(m, o)
    before = full_state(m, o)
    assert guard.step(1e4) is False
    e = guard.log[-1]
    assert e.kind == "rolled_back" and e.reason.startswith("loss spike (z=") and e.loss == 1e4
    assert e.undone == 5 and guard.steps == 0 and guard.rollbacks == 1
    assert not values_equal(before["model"], full_state(m, o)["model"])


def test_spike_guard_rolls_back_min_of_rollback_and_history():
    m, o, rw = tiny(capacity=8)
    states = []
    guard = SpikeGuard(rw, drop_first=False, detector=det(warmup=3))  # rollback defaults to the capacity, 8
    assert guard.rollback == 8
    start = full_state(m, o)
    for i in range(6):
        backprop(m, o)
        states.append(full_state(m, o))  # the state each step's record will hold
        guard.step(quiet(i))
    backprop(m, o)
    guard.step(50.0)
    assert guard.log[-1].undone == 6  # only 6 steps of history
    assert_same(states[0], full_state(m, o))
    assert values_equal(start["model"], full_state(m, o)["model"])

    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, drop_first=False, detector=det(warmup=3), rollback=3, recheck=0)  # no probation
    states = []
    for i in range(6):
        backprop(m, o)
        states.append(full_state(m, o))
        guard.step(quiet(i))
    backprop(m, o)
    guard.step(50.0)
    assert guard.log[-1].undone == 3 and guard.steps == 3
    assert_same(states[3], full_state(m, o))  # as just before the 4th step
    # the roll-back consumed the history: right after it, a spike with no step since undoes nothing more (the state
    # is the restored one: the batch is dropped), and after one step stands a roll-back can only undo what is left
    assert len(rw) == 3
    guard.max_consecutive = 1
    guard.step(math.nan)
    assert guard.log[-1].kind == "rolled_back" and guard.log[-1].undone == 0 and "batch dropped" in guard.log[-1].reason
    assert_same(states[3], full_state(m, o))
    backprop(m, o)
    guard.step(quiet(0))
    assert len(rw) == 4
    backprop(m, o)
    guard.step(math.nan)
    assert guard.log[-1].kind == "rolled_back" and guard.log[-1].undone == 3 and len(rw) == 1
    assert_same(states[1], full_state(m, o))


def test_spike_guard_detector_statistics_roll_back_with_history():
    """After undoing n steps the detector holds the accepted losses of the steps that still stand: the losses of the
    undone steps (the first one measured at the parameters that are live again) and of the spike are forgotten, so
    the history is the same whether the guard or a framework's step (before_step/after_step) recorded it."""
    m, o, rw = tiny(capacity=4)
    guard = SpikeGuard(rw, drop_first=False, detector=det(warmup=3, window=20), rollback=3, grad_norm=True,
                       grad_detector=det(warmup=3, window=20))  # fmt: skip
    accepted, grad_values = [], []
    for i in range(7):
        backprop(m, o)
        accepted.append(quiet(i) + i * 1e-3)
        grad_values.append(guard.grad_detector.state_dict()["values"])
        assert guard.step(accepted[-1])
    gsd = guard.grad_detector.state_dict()
    backprop(m, o)
    guard.step(77.0)
    assert guard.log[-1].undone == 3
    assert list(guard.detector.values) == accepted[:4] and guard.detector.count == 4
    assert guard.grad_detector.count == 4 and list(guard.grad_detector.values) == gsd["values"][:4]


def test_spike_guard_cooldown_and_linear_ramp():
    m, o, rw = tiny(lr=0.1)
    f, cooldown, ramp = 0.5, 3, 4
    guard = SpikeGuard(rw, drop_first=False, detector=det(), lr_factor=f, cooldown=cooldown, ramp=ramp, rollback=1)
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    backprop(m, o)
    assert guard.lr_scale == 1.0
    guard.step(100.0)
    assert guard.log[-1].extra["lr_factor"] == f
    # ramp step r = 1..ramp runs at f + (1 - f) * r / ramp: the last ramp step is back at the full lr
    expected = [f] * cooldown + [f + (1 - f) * r / ramp for r in range(1, ramp + 1)] + [1.0, 1.0]
    got = []
    for i in range(len(expected)):
        backprop(m, o)
        scale = guard.lr_scale
        got.append(scale)
        assert guard.step(quiet(i)) is True
        e = guard.log[-1]
        assert e.lrs == (0.1 * scale,)  # the step used the scaled lr ...
        assert o.param_groups[0]["lr"] == 0.1  # ... and param_groups is back to the unscaled one
        assert e.reason == ("" if scale == 1.0 else f"cool-down lr x{scale:.3g}")
    assert got == expected
    assert got[cooldown : cooldown + ramp] == [0.625, 0.75, 0.875, 1.0]


def test_spike_guard_factor_compounds_and_is_floored():
    m, o, rw = tiny()
    guard = SpikeGuard(rw, drop_first=False, detector=det(), lr_factor=0.1, min_lr_factor=0.02, cooldown=5, ramp=5,
                       rollback=1, max_rollbacks=10)  # fmt: skip
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    backprop(m, o)
    guard.step(100.0)
    assert guard.lr_scale == 0.1
    backprop(m, o)
    guard.step(100.0)  # a spike right after the first, no step between (a burst of bad batches): no compounding
    assert guard.log[-1].extra["lr_factor"] == 0.1 and guard.lr_scale == 0.1
    backprop(m, o)
    assert guard.step(quiet(0)) is True  # a step at the reduced lr ...
    backprop(m, o)
    guard.step(100.0)  # ... then a spike: the lr is still too high, 0.1 * 0.1 = 0.01, floored at 0.02
    assert guard.log[-1].extra["lr_factor"] == 0.02 and guard.lr_scale == 0.02
    for i in range(7):  # 5 cool-down steps, then 2 into the ramp
        backprop(m, o)
        guard.step(quiet(i))
    s = guard.lr_scale
    assert s == 0.02 + 0.98 * 3 / 5  # the third ramp step
    backprop(m, o)
    guard.step(100.0)  # a spike during the ramp compounds the current scale
    assert guard.log[-1].extra["lr_factor"] == s * 0.1


def test_spike_guard_keeps_scheduler_lr_exact():
    """With an LR scheduler and a cool-down in progress, after every iteration param_groups holds exactly the
    scheduler's lr (LambdaLR: initial lr x lambda(epoch)); each step used that lr x the cool-down scale."""

    def lam(epoch):
        return 1.0 / (1.0 + 0.05 * epoch)

    data = make_data(30, {10: "poison", 19: "poison"})
    model = make_model(0)
    opt = make_opt(model, "sgd", 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    rw = Rewind(model, opt, schedulers=[sched], capacity=4)
    guard = SpikeGuard(rw, drop_first=False, detector=SpikeDetector(window=8, warmup=6), cooldown=3, ramp=3, rollback=2)
    scaled = 0
    for i, x, t, fault in guard.wrap(data):
        loss = forward_loss(model, x, t, fault)
        opt.zero_grad()
        loss.backward()
        scale = guard.lr_scale
        before = opt.param_groups[0]["lr"]
        assert before == 0.05 * lam(sched.last_epoch)
        if guard.step(loss):
            assert guard.log[-1].lrs == (before * scale,)
            scaled += scale != 1.0
            sched.step()
        assert opt.param_groups[0]["lr"] == 0.05 * lam(sched.last_epoch)
    assert guard.rollbacks == 2 and scaled >= 6
    assert sched.last_epoch == guard.steps


def test_spike_guard_skip_batches_skips_exactly_that_many():
    m, o, rw = tiny(capacity=4)
    guard = SpikeGuard(rw, detector=det(), skip_batches=3, rollback=2)
    seen = []
    spikes = {7, 15}
    loader = guard.wrap(range(30))
    assert isinstance(loader, SkippableIterator) and guard.wrap(loader) is loader
    for i in loader:
        seen.append(i)
        backprop(m, o)
        guard.step(100.0 if i in spikes else quiet(i))
    assert [e.skipped_batches for e in guard.log if e.kind == "rolled_back"] == [3, 3]
    assert seen == [*range(0, 8), *range(11, 16), *range(19, 30)]
    assert loader.skipped == 6 and loader.seen == len(seen)


def test_spike_guard_without_wrap_does_not_apply_the_next_batches():
    # no wrapped iterator (a framework's loop): the next skip_batches steps are not applied instead
    m, o, rw = tiny()
    guard = SpikeGuard(rw, detector=det(), skip_batches=3)
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    guard.step(100.0)
    assert guard.log[-1].kind == "rolled_back" and guard.log[-1].skipped_batches == 3
    before = [p.detach().clone() for p in m.parameters()]
    for i in range(3):
        backprop(m, o)
        assert guard.step(quiet(i)) is False
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert [e.reason for e in guard.log[-3:]] == ["batch skipped after a roll-back"] * 3
    backprop(m, o)
    assert guard.step(quiet(3)) is True


def test_spike_guard_consecutive_nonfinite_is_a_spike():
    m, o, rw = tiny()
    guard = SpikeGuard(rw, detector=det(), max_consecutive=3, rollback=1)
    for i in range(3):
        backprop(m, o)
        guard.step(quiet(i))
    for _ in range(3):
        guard.step(backprop(m, o, "nan_loss"))
    assert kinds(guard.log)[-3:] == ["skipped", "skipped", "rolled_back"]
    assert guard.log[-1].reason == "non-finite loss (nan), 3 in a row" and guard.log[-1].undone == 1
    # NaNs never reach the statistics; the undone step's loss is forgotten with it
    assert guard.consecutive == 0 and guard.detector.count == 2


def test_spike_guard_max_rollbacks_within_budget_window_raises():
    m, o, rw = tiny()
    guard = SpikeGuard(rw, detector=det(), max_rollbacks=2, budget_window=100, rollback=1, cooldown=0, ramp=0)
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    for _ in range(2):
        backprop(m, o)
        assert guard.step(100.0) is False
        backprop(m, o)
        guard.step(1.0)
    backprop(m, o)
    before = full_state(m, o)
    with pytest.raises(RewindError) as info:
        guard.step(100.0)
    msg = str(info.value)
    assert "3 roll-backs within 100 iterations (max_rollbacks=2)" in msg
    assert "iteration 8: rolled_back (loss spike" in msg and "at iteration 10" in msg
    assert_same(before, full_state(m, o))


def test_spike_guard_budget_window_forgets_old_rollbacks():
    m, o, rw = tiny()
    guard = SpikeGuard(rw, detector=det(), max_rollbacks=1, budget_window=6, rollback=1, cooldown=0, ramp=0)
    for i in range(30):
        backprop(m, o)
        guard.step(100.0 if i in (8, 14, 20, 26) else quiet(i))  # 6 iterations apart: never 2 in a window
    assert guard.rollbacks == 4
    backprop(m, o)
    guard.step(quiet(0))
    backprop(m, o)
    with pytest.raises(RewindError, match="2 roll-backs within 6 iterations"):
        guard.step(100.0)  # 5 iterations after the last one


def test_spike_guard_gradient_norm_spike():
    data = make_data(16, {11: "grad_spike"})
    for grad_norm in (True, False):
        run = GuardRun(capacity=4, sched=False)
        guard = SpikeGuard(run.rw, drop_first=False, detector=SpikeDetector(window=10, warmup=8), grad_norm=grad_norm,
                           grad_detector=SpikeDetector(window=10, warmup=8), rollback=2)  # fmt: skip
        run.train(guard, data)
        e = guard.log[11]
        if grad_norm:
            assert e.kind == "rolled_back" and e.reason.startswith("gradient-norm spike (z=")
            assert e.undone == 2 and e.extra["grad_norm"] > 100
        else:
            assert e.kind == "accepted"  # the loss was normal: only the gradient norm shows it
            assert guard.log[12].kind == "rolled_back"  # ... and the next loss pays for it


def test_spike_guard_first_argument_not_a_rewind():
    m, o, rw = tiny()
    with pytest.raises(RewindError, match="needs a torchrewind.Rewind as its first argument"):
        SpikeGuard(o)


# ======================================================================================== LineSearch / BoldDriver


def test_linesearch_shrinks_by_exactly_shrink_and_armijo_holds():
    data = make_data(6)
    run = SearchRun(opt="sgd_plain", lr=40.0, dropout=0.0, groups=True)
    ls = LineSearch(run.rw, c=0.2, shrink=0.3, grow=1.0, max_tries=30)
    run.train(ls, data)
    for evs in group_by_iteration(ls.log):
        assert [e.kind for e in evs] == ["rejected"] * (len(evs) - 1) + ["accepted"]
        for a, b in zip(evs, evs[1:]):
            assert b.lrs == tuple(lr * 0.3 for lr in a.lrs)  # bitwise: exactly one multiplication by shrink
    assert max(len(evs) for evs in group_by_iteration(ls.log)) >= 3  # two shrinks in a row at least once
    # the accepted steps satisfy Armijo (recomputed from scratch in the replay)
    rep = SearchRun(opt="sgd_plain", lr=40.0, dropout=0.0, groups=True)
    rep.replay(ls.log, data, accept=armijo(0.2), shrink=0.3, grow=1.0, lr_max=40.0, max_tries=30)
    assert_same(run.state(), rep.state())


def test_linesearch_grow_is_capped_at_lr_max():
    data = make_data(20)
    # lr_max="initial": a good lr never grows past the initial one
    run = SearchRun(opt="sgd_plain", lr=0.2)
    ls = LineSearch(run.rw, grow=1.5, lr_max="initial")
    run.train(ls, data)
    assert ls.log.counts()["accepted"] == 20 and get_lrs(run.opt) == (0.2,)
    # max_growth: at most that many times the initial lr
    run = SearchRun(opt="sgd_plain", lr=0.02)
    ls = LineSearch(run.rw, grow=1.5, max_growth=3.0)
    run.train(ls, data)
    assert ls.log.counts()["accepted"] == 20 and get_lrs(run.opt) == (0.02 * 3.0,) and ls.lr_max == 0.02 * 3.0
    # lr_max=None: grows by grow after every accepted step
    run = SearchRun(opt="sgd_plain", lr=0.01)
    ls = LineSearch(run.rw, grow=1.5, lr_max=None)
    run.train(ls, data[:5])
    assert ls.log.counts()["accepted"] == 5 and get_lrs(run.opt) == (0.01 * 1.5 * 1.5 * 1.5 * 1.5 * 1.5,)
    # explicit lr_max, two groups: the largest group lr is capped, the ratio is kept
    run = SearchRun(opt="sgd_plain", lr=0.01, groups=True)
    ls = LineSearch(run.rw, grow=2.0, lr_max=0.1)
    run.train(ls, data)
    top = [max(e.lrs) for e in ls.log]
    assert top[:5] == [0.01, 0.02, 0.04, 0.08, 0.1]
    assert all(t <= 0.1 for t in top)
    assert all(e.lrs[1] / e.lrs[0] == pytest.approx(0.25, rel=1e-12) for e in ls.log)


def test_linesearch_grow_auto_returns_adam_to_its_lr():
    # grow="auto": 1.1 around SGD; 10 around Adam (eps setting), where with max_growth="auto" (cap 1x) the iteration
    # after a rejection starts at Adam's own lr again instead of creeping back over ~20 iterations
    assert LineSearch(SearchRun(opt="sgd", lr=1.0).rw).grow == 1.1
    run = SearchRun(opt="adam", lr=0.05)
    ls = LineSearch(run.rw)
    assert ls.grow == 10.0 and ls.step_size.settings()["grow"] == "auto"
    run.train(ls, make_data(24, {9: "poison", 14: "poison"}))
    groups = group_by_iteration(ls.log)
    lowered = [i for i, evs in enumerate(groups) if evs[-1].kind == "accepted" and max(evs[-1].lrs) < 0.05]
    assert lowered, "the poisoned batches should have made the search lower some step"
    for i in lowered:  # the next iteration starts at the optimizer's lr (0.05 capped, not 0.05 * shrink * 1.1)
        if i + 1 < len(groups):
            assert max(groups[i + 1][0].lrs) == 0.05
    assert get_lrs(run.opt) == (0.05,)
    # an explicit grow is kept as given
    assert LineSearch(SearchRun(opt="adam", lr=0.05).rw, grow=1.1).grow == 1.1


def test_linesearch_cap_is_exact():
    run = SearchRun(opt="sgd_plain", lr=0.01, dropout=0.0)
    ls = LineSearch(run.rw, lr_max=0.1, grow=1.1)
    run.opt.param_groups[0]["lr"] = 0.093  # e.g. after some shrinking and growing; 0.093 * 1.1 > 0.1
    run.train(ls, make_data(1))
    assert ls.log[-1].kind == "accepted"
    assert run.opt.param_groups[0]["lr"] <= 0.1  # 0.093 * (0.1 / 0.093) == 0.10000000000000002


def test_search_stats_count_passes():
    data = make_data(16, {3: "nan_loss", 8: "poison"})
    run = SearchRun(opt="sgd", lr=1.0)
    ls = LineSearch(run.rw, max_tries=3)
    run.train(ls, data)
    groups = group_by_iteration(ls.log)
    skipped = sum(evs[0].kind == "skipped" for evs in groups)
    trials = sum(len(evs) for evs in groups if evs[0].kind != "skipped")
    stats = ls.stats
    assert stats["iterations"] == 16 and ls.iteration == 16
    assert stats["forwards"] == 16 + trials
    assert stats["backwards"] == 16 - skipped == 15
    assert stats["steps"] == stats["accepted"] == ls.steps
    assert stats["forwards_per_step"] == stats["forwards"] / stats["steps"]
    assert stats["exhausted"] == 1 and stats["skipped"] == 1
    assert {k: stats[k] for k in KINDS} == ls.log.counts()


def test_linesearch_exhausted_leaves_state_and_lr_as_before():
    data = make_data(3, {2: "poison"})
    run = SearchRun(opt="sgd", lr=1.0)
    ls = LineSearch(run.rw, max_tries=3)
    run.train(ls, data[:2])
    i, x, t, fault = data[2]
    before = run.state()
    lrs_before = get_lrs(run.opt)

    def loss_fn():
        return forward_loss(run.model, x, t, fault)

    rng = torch.get_rng_state()
    loss_fn()
    after_one_forward = torch.get_rng_state()  # the RNG one dropout draw further
    torch.set_rng_state(rng)
    ls.step(loss_fn)
    assert kinds(ls.log)[-3:] == ["rejected", "rejected", "exhausted"]
    after = run.state()
    # everything as before the iteration, the RNG as after the first evaluation (as in a plain loop)
    assert values_equal(after["rng"], after_one_forward)
    after["rng"] = before["rng"]
    assert_same(before, after)
    assert get_lrs(run.opt) == lrs_before and len(run.rw) == 0


def test_linesearch_trial_losses_use_the_same_dropout_mask():
    """With same_rng the trial loss is the loss of the same dropout mask: a zero step gives exactly f0 (and is
    rejected: a step that changes nothing is a no-op, never accepted)."""
    run = SearchRun(opt="sgd_plain", lr=1e-30, dropout=0.5)  # the step changes nothing in float32
    ls = BoldDriver(run.rw, grow=1.0, max_tries=2)
    run.train(ls, make_data(3))
    assert all(e.kind != "accepted" and e.loss_after == e.loss for e in ls.log)
    assert all("did not change the loss" in e.reason for e in ls.log)
    # the loss did not move: a smaller lr cannot move it either, so one trial ends each search (max_tries=2)
    assert all([e.kind for e in evs] == ["exhausted"] for evs in group_by_iteration(ls.log))
    assert all("a smaller lr cannot change it either" in e.reason for e in ls.log)
    assert get_lrs(run.opt) == (1e-30,)  # exhausted: back to the iteration's starting lr
    run = SearchRun(opt="sgd_plain", lr=1e-30, dropout=0.5)
    ls = BoldDriver(run.rw, grow=1.0, same_rng=False)
    run.train(ls, make_data(3))
    assert any(e.loss_after != e.loss for e in ls.log)  # a fresh mask each evaluation


@pytest.mark.parametrize("cls", [LineSearch, BoldDriver])
def test_search_puts_the_rng_back_after_trial_evaluations(cls):
    """The trials draw with the RNG reset to the first evaluation's state; afterwards the RNG is where the first
    forward/backward left it, whatever the trials drew (here: extra draws only under no_grad)."""
    run = SearchRun(opt="sgd", lr=2.0, dropout=0.3)
    pol = cls(run.rw, max_tries=5)
    for i, x, t, fault in make_data(8, {5: "poison"}):

        def loss_fn():
            if not torch.is_grad_enabled():
                torch.rand(7)
            return forward_loss(run.model, x, t, fault)

        rng = torch.get_rng_state()
        loss_fn()
        expected = torch.get_rng_state()
        torch.set_rng_state(rng)
        pol.step(loss_fn)
        assert values_equal(torch.get_rng_state(), expected)
    assert pol.log.counts()["rejected"] > 0


def test_bolddriver_grows_by_grow_on_acceptance():
    run = SearchRun(opt="sgd_plain", lr=0.01)
    bd = BoldDriver(run.rw, grow=1.05)
    run.train(bd, make_data(10))
    assert kinds(bd.log) == ["accepted"] * 10
    for a, b in zip(bd.log, bd.log.events[1:]):
        assert b.lrs == (a.lrs[0] * 1.05,)
    assert get_lrs(run.opt) == (bd.log[-1].lrs[0] * 1.05,)


def test_bolddriver_recovers_from_a_100x_too_low_lr():
    data = make_data(120)
    good = 0.5
    run = SearchRun(opt="sgd_plain", lr=good / 100)
    bd = BoldDriver(run.rw, max_growth=None)  # the default caps growth at 10x the initial lr
    run.train(bd, data)
    lr_end = get_lrs(run.opt)[0]
    assert lr_end > good / 3  # 1.05**100 ~ 131x: back in the right range ...
    assert bd.log.counts()["rejected"] > 0  # ... and it found the ceiling itself

    base = SearchRun(opt="sgd_plain", lr=good / 100)
    for i, x, t, fault in data:  # plain SGD at the too-low lr
        base.opt.zero_grad()
        forward_loss(base.model, x, t, fault).backward()
        base.opt.step()
    X, y = _digits()
    with torch.no_grad():
        run.model.eval(), base.model.eval()
        ours, theirs = F.cross_entropy(run.model(X), y).item(), F.cross_entropy(base.model(X), y).item()
    assert ours < 0.5 * theirs, (ours, theirs)


def test_search_exception_in_trial_evaluation_restores_state():
    run = SearchRun(opt="sgd", lr=0.5, dropout=0.0)
    ls = LineSearch(run.rw)
    data = make_data(2)
    run.train(ls, data[:1])
    i, x, t, fault = data[1]
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader hiccup")
        return forward_loss(run.model, x, t, fault)

    before = run.state()
    with pytest.raises(RuntimeError, match="hiccup"):
        ls.step(loss_fn)
    assert_same(before, run.state())


def test_search_on_manual_rewind_is_refused_or_exact():
    data = make_data(6, {3: "poison"})
    ref = SearchRun(opt="sgd", lr=1.0)
    ref_ls = LineSearch(ref.rw, max_tries=3)
    ref.train(ref_ls, data)

    run = SearchRun(opt="sgd", lr=1.0)
    run.rw.close()
    run.rw = Rewind(run.model, run.opt, auto=False)
    try:
        ls = LineSearch(run.rw, max_tries=3)
    except RewindError:
        return  # refusing is fine
    run.rw.snapshot()  # a user checkpoint at the start
    run.train(ls, data)
    assert_same(ref.state(), run.state())


# =============================================================================================== bad input


def test_search_loss_fn_bad_return_values():
    run = SearchRun(opt="sgd", lr=0.1, dropout=0.0)
    ls = LineSearch(run.rw)
    run.train(ls, make_data(1))
    x, t = make_data(1)[0][1:3]
    before = run.state()
    n = len(ls.log)
    cases = [
        (lambda: F.cross_entropy(run.model(x), t, reduction="none"), "must be a scalar tensor, got shape \\(32,\\)"),
        (lambda: F.cross_entropy(run.model(x), t).item(), "must return a tensor that requires grad"),
        (lambda: "2.3", "must be a scalar tensor or a float, got str"),
        (lambda: None, "got NoneType"),
        (lambda: F.cross_entropy(run.model(x), t).detach(), "requires grad"),
    ]
    for fn, msg in cases:
        with pytest.raises(RewindError, match=msg):
            ls.step(fn)
    with pytest.raises(RewindError, match="takes a callable that returns the loss, got Tensor"):
        ls.step(F.cross_entropy(run.model(x), t))  # the loss itself instead of a function
    assert_same(before, run.state())
    assert len(ls.log) == n and ls.steps == 1 and len(run.rw) == 1


@pytest.mark.parametrize("guard_cls", [NonFiniteGuard, SpikeGuard])
def test_guard_step_bad_loss(guard_cls):
    m, o, rw = tiny()
    guard = guard_cls(rw)
    backprop(m, o)
    before = full_state(m, o)
    with pytest.raises(RewindError, match=r"must be a scalar tensor, got shape \(2, 2\); reduce it"):
        guard.step(torch.ones(2, 2, requires_grad=True))
    with pytest.raises(RewindError, match="must be a scalar tensor or a float, got str"):
        guard.step("0.5")
    with pytest.raises(RewindError, match="got bool"):
        guard.step(True)
    assert_same(before, full_state(m, o))
    assert len(guard.log) == 0 and guard.steps == 0 and len(rw) == 0
    assert guard.step(torch.ones(1, 1))  # a one-element tensor is fine


def test_history_needed_beyond_capacity():
    m, o, rw = tiny(capacity=2)
    with pytest.raises(RewindError, match=r"rollback=3 needs a history of 3 steps, but the Rewind has capacity=2"):
        SpikeGuard(rw, rollback=3)
    assert SpikeGuard(rw, rollback=2).rollback == 2


@pytest.mark.parametrize("cls", [NonFiniteGuard, LineSearch, BoldDriver])
@pytest.mark.parametrize("arg", ["optimizer", "model", None])
def test_first_argument_not_a_rewind(cls, arg):
    m, o, rw = tiny()
    bad = {"optimizer": o, "model": m, None: None}[arg]
    with pytest.raises(RewindError, match="needs a torchrewind.Rewind as its first argument"):
        cls(bad)


BAD_SETTINGS = [
    (NonFiniteGuard, dict(max_consecutive=0), "max_consecutive must be an int >= 1"),
    (NonFiniteGuard, dict(max_consecutive=2.5), "max_consecutive must be an int >= 1"),
    (SpikeGuard, dict(lr_factor=1.5), "lr_factor must be a finite number in"),
    (SpikeGuard, dict(lr_factor=0.0), "lr_factor must be a finite number in"),
    (SpikeGuard, dict(lr_factor=-0.5), "lr_factor must be a finite number in"),
    (SpikeGuard, dict(min_lr_factor=2.0), "min_lr_factor must be a finite number in"),
    (SpikeGuard, dict(skip_batches=-1), "skip_batches must be an int >= 0"),
    (SpikeGuard, dict(skip_batches=1.5), "skip_batches must be an int >= 0"),
    (SpikeGuard, dict(cooldown=-1), "cooldown must be an int >= 0"),
    (SpikeGuard, dict(ramp=-2), "ramp must be an int >= 0"),
    (SpikeGuard, dict(budget_window=-1), "budget_window must be an int >= 1"),
    (SpikeGuard, dict(max_rollbacks=0), "max_rollbacks must be an int >= 1"),
    (SpikeGuard, dict(rollback=0), "rollback must be an int >= 1"),
    (SpikeGuard, dict(rollback=True), "rollback must be an int >= 1"),
    (SpikeGuard, dict(rollback=1.0), "rollback must be an int >= 1"),
    (SpikeGuard, dict(max_consecutive=0), "max_consecutive must be an int >= 1"),
    (LineSearch, dict(shrink=1.0), "shrink must be a finite number in"),
    (LineSearch, dict(shrink=1.5), "shrink must be a finite number in"),
    (LineSearch, dict(shrink=0.0), "shrink must be a finite number in"),
    (LineSearch, dict(grow=0.9), r"grow must be a finite number in \[1, inf\)"),
    (LineSearch, dict(grow="fast"), "grow must be a number >= 1 or 'auto'"),
    (LineSearch, dict(max_tries=0), "max_tries must be an int >= 1"),
    (LineSearch, dict(max_tries=2.0), "max_tries must be an int >= 1"),
    (LineSearch, dict(c=0.0), "c must be a finite number in"),
    (LineSearch, dict(c=1.0), "c must be a finite number in"),
    (BoldDriver, dict(shrink=1.0), "shrink must be a finite number in"),
    (BoldDriver, dict(grow=0.5), r"grow must be a finite number in \[1, inf\)"),
    (BoldDriver, dict(max_tries=0), "max_tries must be an int >= 1"),
    (BoldDriver, dict(tolerance=-0.1), r"tolerance must be a finite number in \[0, inf\)"),
    (SpikeDetector, dict(window=2), "window must be an int >= 3"),
    (SpikeDetector, dict(warmup=0), "warmup must be an int >= 1"),
    (SpikeDetector, dict(window=10, warmup=11), r"warmup \(11\) cannot exceed window \(10\)"),
    (SpikeDetector, dict(method="median"), "method must be one of 'mad', 'ema'"),
    (SpikeDetector, dict(threshold=0), r"threshold must be a number in \(0, inf\)"),
    (SpikeDetector, dict(threshold=math.nan), r"threshold must be a number in \(0, inf\)"),
    (SpikeDetector, dict(alpha=0.0), "alpha must be a finite number in"),
    (SpikeDetector, dict(alpha=1.0), "alpha must be a finite number in"),
]


@pytest.mark.parametrize("cls,kw,msg", BAD_SETTINGS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_SETTINGS])
def test_contradictory_settings(cls, kw, msg):
    m, o, rw = tiny(capacity=2)
    backprop(m, o)
    o.step()
    before = full_state(m, o)
    tracked = []
    rw.track = tracked.append  # (instance attribute: sees what a guard asks the Rewind to track)
    with pytest.raises(RewindError, match=msg):
        cls(**kw) if cls is SpikeDetector else cls(rw, **kw)
    assert_same(before, full_state(m, o))
    assert len(rw) == 1 and tracked == []  # a refused SpikeGuard tracks nothing


@pytest.mark.parametrize("cls", [LineSearch, BoldDriver])
@pytest.mark.parametrize("lr_max", ["max", -1.0, 0.0])
def test_bad_lr_max(cls, lr_max):
    m, o, rw = tiny()
    with pytest.raises(RewindError, match="lr_max"):
        cls(rw, lr_max=lr_max)


def test_skippable_iterator():
    it = SkippableIterator(iter(range(10)))
    assert iter(it) is it
    assert next(it) == 0
    it.skip(2)
    it.skip(1)
    assert next(it) == 4 and (it.seen, it.skipped) == (2, 3)
    it.skip(0)
    assert list(it) == [5, 6, 7, 8, 9]
    it = SkippableIterator(range(5))
    it.skip(10)
    assert list(it) == [] and it.skipped == 5
    for bad in (-1, 1.5, "2"):
        with pytest.raises(RewindError, match="n must be an int >= 0"):
            it.skip(bad)


# =============================================================================================== Trajectory

EVENTS = [
    Event(0, 1, "accepted", 2.5, 2.25, (0.1, 0.025), "armijo: f1=2.25 vs f0+c*g.d=2.4", extra={"tries": 1}),
    Event(1, 1, "rejected", 2.0, math.inf, (0.1,), 'quotes " and, commas\nand a newline', undone=1,
          extra={"tries": 1}),  # fmt: skip
    Event(2, 1, "skipped", math.nan, None, (0.05,), "non-finite loss (nan)"),
    Event(3, 0, "rolled_back", -math.inf, None, (1e-3, 3e-300), "loss spike (z=12.0)", undone=1, skipped_batches=2,
          extra={"grad_norm": 3.5, "lr_factor": 0.5}),  # fmt: skip
    Event(4, 0, "exhausted", 1.0, 1.5, (), "", undone=1, extra={"tries": 10}),
    Event(5, 1, "accepted", 0.1 + 0.2, math.nan, (1 / 3,), "ünïcödé ✓", extra={"nested": {"a": [1, 2.5]}}),
]


def _unnum(v):
    """Undo the JSON/CSV encoding of non-finite floats ("nan", "inf", "-inf" strings)."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def parse_csv(text: str) -> list[dict]:
    def opt_float(s):
        return None if s == "" else float(s)

    out = []
    for r in csv.DictReader(io.StringIO(text)):
        out.append(
            {
                "iteration": int(r["iteration"]),
                "step": int(r["step"]),
                "kind": r["kind"],
                "loss": opt_float(r["loss"]),
                "loss_after": opt_float(r["loss_after"]),
                "lrs": tuple(float(s) for s in r["lrs"].split()),
                "reason": r["reason"],
                "undone": int(r["undone"]),
                "skipped_batches": int(r["skipped_batches"]),
                "extra": {k: _unnum(v) for k, v in json.loads(r["extra"]).items()} if r["extra"] else {},
            }
        )
    return out


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(text: str) -> list[dict]:
    rows = json.loads(text, parse_constant=_no_constants)  # strict JSON: no NaN/Infinity tokens
    for r in rows:
        r["loss"], r["loss_after"] = _unnum(r["loss"]), _unnum(r["loss_after"])
        r["lrs"] = tuple(r["lrs"])
        r["extra"] = {k: _unnum(v) for k, v in r["extra"].items()}
    return rows


def make_log(events) -> Trajectory:
    log = Trajectory()
    for e in events:
        assert log.add(e) is e
    return log


def test_trajectory_csv_round_trip(tmp_path):
    log = make_log(EVENTS)
    text = log.to_csv(tmp_path / "run.csv")
    assert (tmp_path / "run.csv").read_bytes().decode() == text  # csv's \r\n line ends, written as they are
    assert values_equal(parse_csv(text), log.records())
    with open(tmp_path / "run.csv", newline="") as f:
        assert [r["kind"] for r in csv.DictReader(f)] == [e.kind for e in EVENTS]


def test_trajectory_json_round_trip(tmp_path):
    log = make_log(EVENTS)
    text = log.to_json(tmp_path / "run.json")
    assert (tmp_path / "run.json").read_text() == text
    rows = parse_json(text)
    assert values_equal(rows, log.records())
    raw = json.loads(text)
    assert (raw[1]["loss_after"], raw[2]["loss"], raw[3]["loss"], raw[5]["loss_after"]) == ("inf", "nan", "-inf", "nan")


def test_trajectory_round_trips_a_real_policy_log(tmp_path):
    data = make_data(24, SEARCH_FAULTS)
    run = SearchRun(opt="sgd", lr=1.0)
    ls = LineSearch(run.rw, max_tries=4)
    run.train(ls, data)
    assert values_equal(parse_csv(ls.log.to_csv()), ls.log.records())
    assert values_equal(parse_json(ls.log.to_json()), ls.log.records())


def test_trajectory_json_is_strict_for_a_guard_log():
    m, o, rw = tiny()
    guard = SpikeGuard(rw)
    guard.step(backprop(m, o, "inf_grad"))  # logs extra={"grad_norm": inf}
    e = guard.log[-1]
    assert e.kind == "skipped" and e.extra["grad_norm"] == math.inf
    assert values_equal(parse_json(guard.log.to_json()), guard.log.records())


def test_trajectory_counts_and_container():
    log = make_log(EVENTS)
    c = log.counts()
    assert list(c) == list(KINDS)
    assert c == {"accepted": 2, "rejected": 1, "rolled_back": 1, "skipped": 1, "exhausted": 1}
    assert Trajectory().counts() == dict.fromkeys(KINDS, 0)
    assert len(log) == 6 and log[3] is EVENTS[3] and list(log) == EVENTS
    assert log.records()[3]["lrs"] == (1e-3, 3e-300) and log.records()[0]["extra"] == {"tries": 1}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(
        st.builds(
            Event,
            iteration=st.integers(0, 10**6),
            step=st.integers(0, 10**6),
            kind=st.sampled_from(KINDS),
            loss=st.none() | st.floats(allow_nan=True, allow_infinity=True),
            loss_after=st.none() | st.floats(allow_nan=True, allow_infinity=True),
            lrs=st.lists(st.floats(min_value=0, allow_infinity=False, allow_nan=False), max_size=3).map(tuple),
            reason=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
            undone=st.integers(0, 8),
            skipped_batches=st.integers(0, 8),
            extra=st.dictionaries(st.sampled_from(["tries", "grad_norm", "lr_factor"]),
                                  st.integers(0, 9) | st.floats(allow_nan=False, allow_infinity=False)),  # fmt: skip
        ),
        max_size=6,
    )
)
def test_trajectory_export_round_trip_property(events):
    log = make_log(events)
    assert values_equal(parse_csv(log.to_csv()), log.records())
    assert values_equal(parse_json(log.to_json()), log.records())


@pytest.mark.filterwarnings("ignore:No artists with labels found to put in legend")  # the empty log
def test_trajectory_plot_writes_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, log in [("all_kinds", make_log(EVENTS)), ("empty", Trajectory())]:
        path = tmp_path / f"{name}.png"
        fig = log.plot(path, title=name)
        plt.close(fig)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    fig, ax = plt.subplots()
    assert make_log(EVENTS).plot(ax=ax) is fig  # drawing into a given axes, nothing saved
    plt.close(fig)


# =============================================================================================== pieces and decisions


def test_lr_factor_one_means_no_cooldown():
    m, o, rw = tiny(lr=0.1)
    guard = SpikeGuard(rw, detector=det(), lr_factor=1.0, min_lr_factor=1.0, rollback=1)
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    backprop(m, o)
    assert guard.step(100.0) is False and guard.log[-1].kind == "rolled_back"
    assert guard.log[-1].extra["lr_factor"] == 1.0 and guard.lr_scale == 1.0
    backprop(m, o)
    assert guard.step(quiet(0)) and guard.log[-1].lrs == (0.1,) and guard.log[-1].reason == ""


def test_rollback_after_a_nonfinite_step_in_a_cooldown_leaves_the_restored_lrs():
    """A step at the cool-down lr that makes a parameter non-finite is undone, and (max_consecutive=1) the guard
    rolls back: param_groups then hold the lrs of the restored state, the scheduler's (before the pieces were split,
    the cool-down's lr bookkeeping put back the lr of the iteration instead)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    big = torch.nn.Parameter(torch.tensor([3e38]))  # overflows at a step of lr * 3e38 >= 0.4e38
    o = torch.optim.SGD([*m.parameters(), big], lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)
    rw = Rewind(m, o, schedulers=[sched], capacity=4)
    guard = SpikeGuard(rw, detector=det(), rollback=2, cooldown=3, ramp=0, check_params=True, max_consecutive=1,
                       drop_first=False, recheck=0)  # fmt: skip  (recheck=0: a full roll-back, not probation's)

    def step(loss, boom=False):
        backprop(m, o)
        if boom:
            big.grad = torch.tensor([-3e38])
        if guard.step(loss):
            sched.step()

    for i in range(6):
        step(quiet(i))
    step(100.0)  # spike: 2 steps undone, cool-down at lr x0.5
    step(quiet(0))
    assert guard.log[-1].reason == "cool-down lr x0.5"
    step(quiet(1), boom=True)
    e = guard.log[-1]
    assert (e.kind, e.reason, e.undone) == ("rolled_back", "step made parameters non-finite: undone, 1 in a row", 3)
    assert sched.last_epoch == guard.steps == 3 and big.isfinite().all()
    assert o.param_groups[0]["lr"] == sched.get_last_lr()[0] == e.lrs[0]


class CapGuard(NonFiniteGuard):
    """A custom guard on the public base: skip any step whose loss is above a cap, else NonFiniteGuard's rule."""

    def decide(self, loss, grad_norm):
        from torchrewind.policies import Decision

        return Decision.skip("loss above the cap") if loss > 5.0 else super().decide(loss, grad_norm)


@pytest.mark.parametrize("framework", [False, True], ids=["step", "after_step"])
def test_a_custom_decision_is_carried_out_by_the_driver(framework):
    m, o, rw = tiny()
    guard = CapGuard(rw, max_consecutive=5)
    before = None
    for i, loss in enumerate([1.0, 9.0, math.nan, 2.0]):
        backprop(m, o)
        if i == 1:
            before = full_state(m, o)
        if framework:
            guard.before_step()
            o.step()
            guard.after_step(loss)
        else:
            guard.step(loss)
        if i == 2:
            assert_same(before, full_state(m, o))  # neither the capped nor the NaN step was applied
    assert kinds(guard.log) == ["accepted", "skipped", "skipped", "accepted"]
    assert guard.log[1].reason == "loss above the cap" and guard.log[1].undone == int(framework)
    assert guard.consecutive == 0 and guard.steps == 2


def test_decision_vocabulary():
    from torchrewind.policies import Decision, Guard

    assert Decision.apply() == Decision("apply", "")
    assert Decision.roll_back("why", 3, 2) == Decision("roll_back", "why", 3, 2)
    m, o, rw = tiny()
    assert SpikeGuard(rw, detector=det(), rollback=2, skip_batches=1).decide(math.inf, None) == Decision.skip(
        "non-finite loss (inf)"
    )
    assert NonFiniteGuard(rw).decide(1.0, math.nan) == Decision.skip("non-finite gradient")

    class Odd(Guard):
        def decide(self, loss, grad_norm):
            return Decision("explode")

    backprop(m, o)
    with pytest.raises(RewindError, match="unknown action 'explode'"):
        Odd(rw).step(1.0)


# =============================================================================================== state_dict: resume

RESUME_FAULTS = {5: "nan_loss", 20: "poison", 27: "inf_grad", 40: "poison", 47: "nan_loss", 48: "nan_loss"}


def resume_guard(rw, **kw):
    """warmup=16: a detector that restarted at a resume would still be warming up 10 iterations later."""
    opts = dict(detector=SpikeDetector(window=16, threshold=6, warmup=16), rollback=3, skip_batches=2, cooldown=3,
                ramp=4, max_consecutive=2, check_params=True, drop_first=False)  # fmt: skip
    opts.update(kw)
    return SpikeGuard(rw, **opts)


def guarded_loop(run: GuardRun, guard, batches, *, wrap: bool, stop: int | None = None) -> None:
    """The README loop (guard.step; sched.step when it stands), optionally without guard.wrap (then a skip means:
    the next batches' steps are not applied), stopping once the guard has judged ``stop`` iterations."""
    for i, x, t, fault in guard.wrap(batches) if wrap else batches:
        loss = forward_loss(run.model, x, t, fault)
        run.opt.zero_grad()
        loss.backward()
        inject_grad(run.model, fault)
        if guard.step(loss):
            run.sched.step()
        if stop is not None and guard.iteration == stop:
            return


def checkpoint(run: GuardRun, guard, path) -> dict:
    """What a training script saves: model, optimizer, scheduler, the guard, the RNG; read back as plain data."""
    torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict(), "sched": run.sched.state_dict(),
                "guard": guard.state_dict(), "rng": torch.get_rng_state()}, path)  # fmt: skip
    return torch.load(path, weights_only=True)  # plain data only: the safe loader reads it


def key_sorted(state: dict) -> dict:
    """full_state with each param group's keys in one order (optimizer.load_state_dict puts "params" last)."""
    return {**state, "groups": [dict(sorted(g.items())) for g in state["groups"]]}


def resumed_run(ckpt: dict, make_guard, *, load_guard: bool = True) -> tuple[GuardRun, object]:
    run = GuardRun(opt="sgd", lr=0.05, capacity=4, seed=1)  # another init: everything comes from the checkpoint
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["opt"])
    run.sched.load_state_dict(ckpt["sched"])
    guard = make_guard(run.rw)
    if load_guard:
        guard.load_state_dict(ckpt["guard"])
    torch.set_rng_state(ckpt["rng"])
    return run, guard


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped-loader", "no-loader"])
@pytest.mark.parametrize("when", ["10-before-a-spike", "right-after-a-roll-back"])
def test_spike_guard_resumed_from_a_checkpoint_takes_the_same_decisions(tmp_path, when, wrap):
    """Interrupted and resumed from torch.save'd model, optimizer, scheduler, RNG and guard state: the same event
    log and the same final state, bit for bit, as the run never interrupted. Stopped 10 iterations before a spike,
    or right after a roll-back (batches still to skip, a cool-down in progress)."""
    data = make_data(60, RESUME_FAULTS)
    spike = 38 if wrap else 40  # data 40; with a wrapped loader the 2 batches skipped at 20 are no iterations
    stop = spike - 10 if when == "10-before-a-spike" else 21
    ref = GuardRun(opt="sgd", lr=0.05, capacity=4)
    g_ref = resume_guard(ref.rw)
    guarded_loop(ref, g_ref, data, wrap=wrap)
    rolled = [e.iteration for e in g_ref.log if e.kind == "rolled_back"]
    assert 20 in rolled and spike in rolled and any(e.kind == "skipped" for e in g_ref.log), rolled

    first = GuardRun(opt="sgd", lr=0.05, capacity=4)
    g1 = resume_guard(first.rw)
    guarded_loop(first, g1, data, wrap=wrap, stop=stop)
    ckpt = checkpoint(first, g1, tmp_path / "ckpt.pt")
    if stop == 21:
        assert g1.log[-1].kind == "rolled_back" and g1.lr_scale != 1.0
        b = ckpt["guard"]["batches"]
        assert (b["loader"]["pending"] if wrap else b["queued"]) == 2  # the batches still to skip
    pos = (lambda s: s["seen"] + s["skipped"])(ckpt["guard"]["batches"]["loader"]) if wrap else stop

    run, guard = resumed_run(ckpt, resume_guard)
    guarded_loop(run, guard, data[pos:], wrap=wrap)
    assert values_equal(guard.log.records(), g_ref.log.records())  # every decision, loss, lr, reason
    assert (guard.iteration, guard.steps, guard.rollbacks) == (g_ref.iteration, g_ref.steps, g_ref.rollbacks)
    assert_same(key_sorted(ref.state()), key_sorted(run.state()))
    assert values_equal(guard.state_dict(), g_ref.state_dict())

    if stop == spike - 10:  # without the guard's state the detector restarts its warm-up: the spike goes through
        run, guard = resumed_run(ckpt, resume_guard, load_guard=False)
        guarded_loop(run, guard, data[pos:], wrap=wrap)
        assert guard.log[10].kind == "accepted" and guard.log[10].loss > 100


def test_nonfinite_guard_resume_keeps_the_consecutive_count(tmp_path):
    data = make_data(12, {4: "nan_loss", 5: "inf_grad", 6: "nan_loss"})

    def make(rw):
        return NonFiniteGuard(rw, max_consecutive=3)

    ref = GuardRun(opt="sgd", lr=0.05, capacity=4)
    with pytest.raises(RewindError, match="3 consecutive iterations were not applied"):
        guarded_loop(ref, make(ref.rw), data, wrap=False)
    first = GuardRun(opt="sgd", lr=0.05, capacity=4)
    g1 = make(first.rw)
    guarded_loop(first, g1, data, wrap=False, stop=6)
    run, guard = resumed_run(checkpoint(first, g1, tmp_path / "c.pt"), make)
    assert guard.consecutive == 2
    with pytest.raises(RewindError, match="3 consecutive iterations were not applied"):
        guarded_loop(run, guard, data[6:], wrap=False)


@pytest.mark.parametrize("cls,kw", [(LineSearch, dict(max_tries=4, lr_max="initial")),
                                    (BoldDriver, dict(max_tries=3, lr_max="initial"))])
def test_search_resumed_from_a_checkpoint_is_exact(tmp_path, cls, kw):
    """LineSearch/BoldDriver interrupted and resumed: same log, same state; lr_max="initial" is the original run's
    lr, not the (grown or shrunk) lr the resumed optimizer starts with."""
    data = make_data(24, SEARCH_FAULTS)
    ref = SearchRun(opt="sgd", lr=1.0, sched=True)
    p_ref = cls(ref.rw, **kw)
    ref.train(p_ref, data)
    first = SearchRun(opt="sgd", lr=1.0, sched=True)
    p1 = cls(first.rw, **kw)
    first.train(p1, data[:11])
    torch.save({"model": first.model.state_dict(), "opt": first.opt.state_dict(), "sched": first.sched.state_dict(),
                "search": p1.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")  # fmt: skip
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    run = SearchRun(opt="sgd", lr=1.0, sched=True, seed=3)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["opt"])
    run.sched.load_state_dict(ckpt["sched"])
    assert get_lrs(run.opt) != (1.0,)  # the search moved the lr: "initial" would now resolve to another cap
    pol = cls(run.rw, **kw)
    pol.load_state_dict(ckpt["search"])
    assert pol.lr_max == p1.lr_max == 1.0
    torch.set_rng_state(ckpt["rng"])
    run.train(pol, data[11:])
    assert values_equal(pol.log.records(), p_ref.log.records()) and pol.stats == p_ref.stats
    assert_same(key_sorted(ref.state()), key_sorted(run.state()))


def guard_after_some_steps(**kw):
    m, o, rw = tiny(capacity=4)
    guard = SpikeGuard(rw, **{"detector": det(), "rollback": 2, "skip_batches": 1, "grad_norm": True, **kw})
    for i in range(8):
        backprop(m, o)
        guard.step(100.0 if i == 6 else quiet(i))
    return guard


@pytest.mark.parametrize(
    "make,state,match",
    [
        (lambda rw: NonFiniteGuard(rw), None, "saved by a 'SpikeGuard', not a 'NonFiniteGuard'"),
        (lambda rw: SpikeGuard(rw, detector=det(), rollback=3, skip_batches=1, grad_norm=True), None,
         r"other settings \(rollback: 2 saved, 3 here\)"),
        (lambda rw: SpikeGuard(rw, detector=det(window=12), rollback=2, skip_batches=1, grad_norm=True), None,
         r"window: 10 saved, 12 here"),
        (lambda rw: SpikeGuard(rw, detector=det(), rollback=2, skip_batches=1, grad_norm=True, max_rollbacks=30),
         None, r"max_rollbacks: 20 saved, 30 here"),
        (None, lambda sd: {**sd, "version": 7}, "format version 7"),
        (None, lambda sd: {k: v for k, v in sd.items() if k != "cooldown"}, r"lacks \['cooldown'\]"),
        (None, lambda sd: {**sd, "steps": -1}, "steps must be an int >= 0"),
        (None, lambda sd: {**sd, "detector": {**sd["detector"], "values": [1.0, math.nan]}}, "finite numbers"),
        (None, lambda sd: {**sd, "log": {"events": [{"kind": "exploded"}]}}, "not an event"),
        (None, lambda sd: {**sd, "budget": {**sd["budget"], "recent": ["x"]}}, "must be an int"),
        (None, lambda sd: [sd], "must be a dict returned by SpikeGuard.state_dict()"),
    ],
    ids=["other-guard", "rollback", "detector-window", "budget", "version", "missing", "negative", "nan-value",
         "bad-event", "bad-budget", "not-a-dict"],  # fmt: skip
)
def test_load_state_dict_refuses_a_mismatched_state_and_changes_nothing(make, state, match):
    saved = guard_after_some_steps().state_dict()
    target = guard_after_some_steps(skip_batches=1)
    target.step(quiet(0))  # one more iteration: its state differs from the saved one
    if make is not None:
        target = make(target.rw)
    before = target.state_dict()
    bad = state(saved) if state is not None else saved
    with pytest.raises(RewindError, match=match):
        target.load_state_dict(bad)
    assert values_equal(target.state_dict(), before)


def test_load_state_dict_strict_false_keeps_the_settings():
    saved = guard_after_some_steps().state_dict()
    m, o, rw = tiny(capacity=4)
    guard = SpikeGuard(rw, detector=det(window=5, warmup=3), rollback=3, skip_batches=1, grad_norm=True,
                       max_rollbacks=40, cooldown=1)  # fmt: skip
    guard.load_state_dict(saved, strict=False)
    assert (guard.rollback, guard.max_rollbacks, guard.cooldown, guard.detector.window) == (3, 40, 1, 5)
    assert guard.iteration == 8 and guard.rollbacks == 1 and list(guard.detector.values) == saved["detector"][
        "values"][-5:]  # fmt: skip
    assert guard.lr_cooldown.cool_left <= 1 and len(guard.log) == 8


def test_state_dict_is_plain_data(tmp_path):
    guard = guard_after_some_steps()
    sd = guard.state_dict()
    assert json.loads(json.dumps(sd)) == json.loads(json.dumps(sd, sort_keys=True))  # JSON-able, str keys
    torch.save(sd, tmp_path / "g.pt")
    back = torch.load(tmp_path / "g.pt", weights_only=True)
    assert values_equal(back, sd)
    again = guard_after_some_steps()
    again.step(quiet(0))
    again.load_state_dict(json.loads(json.dumps(sd)))  # through JSON (tuples become lists) as well
    assert values_equal(again.state_dict(), sd)
    assert [e.lrs for e in again.log] == [e.lrs for e in guard.log] and isinstance(again.log[0].lrs, tuple)


def test_state_dict_between_before_and_after_step_is_refused():
    m, o, rw = tiny()
    guard = NonFiniteGuard(rw)
    backprop(m, o)
    guard.before_step()
    with pytest.raises(RewindError, match="between before_step"):
        guard.state_dict()
    with pytest.raises(RewindError, match="between before_step"):
        guard.load_state_dict({})
    o.step()
    guard.after_step(1.0)
    assert guard.state_dict()["steps"] == 1


@pytest.mark.parametrize("piece", ["detector", "cooldown", "budget", "trajectory", "iterator"])
def test_piece_state_round_trips(piece):
    from torchrewind.policies import LrCooldown, RollbackBudget

    if piece == "detector":
        a, b = SpikeDetector(window=4, warmup=2), SpikeDetector(window=4, warmup=2)
        for x in (1.0, 2.0, 1.5, 1.2, 1.1):
            a.update(x)
    elif piece == "cooldown":
        a, b = LrCooldown(0.3, 0.01, 4, 2), LrCooldown(0.3, 0.01, 4, 2)
        a.spiked()
        a.stepped(a.scale)
    elif piece == "budget":
        a, b = RollbackBudget(3, 10), RollbackBudget(3, 10)
        for i in (1, 4, 12):
            assert a.charge(i)
        assert list(a.recent) == [4, 12]
    elif piece == "trajectory":
        a, b = make_log(EVENTS), Trajectory()
    else:
        a, b = SkippableIterator(range(10)), SkippableIterator(range(10))
        next(a), a.skip(3), next(a), a.skip(2)
    sd = a.state_dict()
    b.load_state_dict(json.loads(json.dumps(sd)))
    assert values_equal(b.state_dict(), sd)
    if piece == "iterator":
        assert sd == {"seen": 2, "skipped": 3, "pending": 2}
    if piece == "trajectory":
        assert values_equal(b.records(), a.records()) and b[3].lrs == (1e-3, 3e-300)


# =============================================================================================== defaults that hold


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(8, 3))  # fmt: skip


def _bn_data(nan_at: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(12)]
    x = data[nan_at][0].clone()
    x[0, 1] = float("nan")
    data[nan_at] = (x, data[nan_at][1])
    return data


@pytest.mark.parametrize("framework", [False, True], ids=["step", "before/after_step"])
@pytest.mark.parametrize("kind", ["nonfinite", "spike"])
def test_a_skipped_nan_batch_leaves_no_trace_in_batchnorm_or_rng(kind, framework):
    """With wrap(), the undo point is recorded before forward: a NaN batch's skip takes back the running statistics
    its forward poisoned and the dropout RNG it drew, bit for bit."""
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = Rewind(model, opt, capacity=3)
    guard = NonFiniteGuard(rw) if kind == "nonfinite" else SpikeGuard(rw, detector=det(warmup=3))
    at_top = {}
    for i, (x, y) in enumerate(guard.wrap(_bn_data(nan_at=7))):
        at_top[i] = (full_state(model, opt), torch.get_rng_state())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if framework:
            guard.before_step()
            opt.step()
            ok = guard.after_step(loss)
        else:
            ok = guard.step(loss)
        if i == 7:
            assert not ok and guard.log[-1].kind == "skipped"
            state, rng = at_top[7]
            assert_same(state, full_state(model, opt))  # buffers (running mean/var) included
            assert torch.equal(rng, torch.get_rng_state())
    assert all(bool(b.isfinite().all()) for b in model.buffers())
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_a_batch_skipped_without_wrap_still_poisons_batchnorm():
    """Without wrap() only the step is undoable: documented, and the reason wrap() records before forward."""
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(Rewind(model, opt))
    for x, y in _bn_data(nan_at=2)[:4]:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    assert not bool(model[1].running_mean.isfinite().all())


def test_spike_guard_burst_rolls_back_once_then_drops_batches():
    """Spikes back to back (no step stands between them) undo nothing more: one roll-back, then dropped batches."""
    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, drop_first=False, detector=det(warmup=3), rollback=4)
    for i in range(8):
        backprop(m, o)
        guard.step(quiet(i))
    for _ in range(5):  # a burst of five bad batches
        backprop(m, o)
        guard.step(1e3)
    rolled = [e for e in guard.log if e.kind == "rolled_back"]
    assert [e.undone for e in rolled] == [4, 0, 0, 0, 0] and guard.steps == 4
    assert all("batch dropped" in e.reason for e in rolled[1:])
    backprop(m, o)
    guard.step(quiet(0))
    backprop(m, o)
    guard.step(1e3)  # a step stood since, on probation: a real roll-back again, to the last roll-back's point
    assert guard.log[-1].undone == 1 and "on probation" in guard.log[-1].reason
    sd = guard.state_dict()
    assert sd["stepped_since_rollback"] is False
    other = SpikeGuard(Rewind(*tiny(capacity=8)[:2], capacity=8), drop_first=False, detector=det(warmup=3), rollback=4)
    other.load_state_dict(json.loads(json.dumps(sd)))
    assert other.stepped_since_rollback is False


def test_spike_guard_defaults_never_fire_on_a_classifier_at_zero_loss():
    """The colleague's case: batch losses near zero, one misclassified example makes a batch 10x the median. The
    default detector (log space, noise floor, tolerances) stays quiet; the previous one (median/MAD of raw losses)
    fires."""
    g = torch.Generator().manual_seed(0)
    losses = [1.0 * 0.9**i for i in range(40)]
    losses += [float(torch.exp(torch.randn((), generator=g) * 1.5 - 6.0)) for _ in range(300)]  # ~2.5e-3, heavy tail
    losses += [0.1, 0.0, 0.2, 0.0]
    new, old = SpikeDetector(), SpikeDetector(space="linear", min_scale=0.0, min_abs=0.0, min_rel=0.2)
    flags = {"new": 0, "old": 0}
    for x in losses:
        for name, d in (("new", new), ("old", old)):
            if d.is_spike(x):
                flags[name] += 1
            else:
                d.update(x)
    assert flags["new"] == 0 and flags["old"] > 5, flags
    assert new.is_spike(50.0) and new.is_spike(math.nan)  # what a fault looks like is still caught


def test_linesearch_zero_loss_or_gradient_takes_the_step_without_a_search():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    ls = LineSearch(Rewind(None, opt))
    f = ls.step(lambda: torch.relu(-w.abs()).sum())  # exactly 0, zero gradient
    assert f == 0.0 and ls.log[-1].kind == "accepted" and ls.log[-1].extra == {"tries": 0}
    assert "zero loss" in ls.log[-1].reason and ls.forwards == 1
    f = ls.step(lambda: (w * 0.0).sum() + 3.0)  # a loss that does not depend on w: zero gradient
    assert f == 3.0 and "zero gradient" in ls.log[-1].reason and ls.forwards == 2
    assert get_lrs(opt) == (0.1,)  # nothing learned about the lr


def test_search_max_growth_caps_the_lr():
    """BoldDriver never grows past 10x its initial lr by default (it grew without end before); LineSearch's "auto"
    cap is 10x around SGD and 1x around Adam (its tuned lr is only ever lowered)."""
    data = make_data(40)
    run = SearchRun(opt="sgd_plain", lr=0.001, dropout=0.0)
    bd = BoldDriver(run.rw, grow=2.0)
    run.train(bd, data)
    assert max(e.lrs[0] for e in bd.log) <= 0.01 and get_lrs(run.opt) == (0.01,) and bd.lr_max == 0.01
    sgd_ls = LineSearch(SearchRun(opt="sgd", lr=0.3).rw)
    adam_ls = LineSearch(SearchRun(opt="adam", lr=0.003).rw)
    assert sgd_ls.lr_max == pytest.approx(3.0) and adam_ls.lr_max == 0.003 and adam_ls.max_growth == "auto"
    with pytest.raises(RewindError, match="max_growth"):
        LineSearch(SearchRun().rw, max_growth=0.5)
    with pytest.raises(RewindError, match="max_growth"):
        BoldDriver(SearchRun().rw, max_growth="lots")


def test_bolddriver_lr_floor():
    """BoldDriver's lr never falls below min_fraction (1e-3 by default) x its initial lr (it fell to 1e-10x before);
    at the floor a rejection ends the search with the iteration's starting lr; the floor is kept by state_dict."""
    data = make_data(30, {k: "poison" for k in range(3, 30, 2)})  # every other batch rejects every try
    run = SearchRun(opt="sgd", lr=0.5)
    bd = BoldDriver(run.rw, min_fraction=0.05, shrink=0.3, max_tries=10)
    run.train(bd, data)
    assert bd.step_size.lr_min == pytest.approx(0.5 * 0.05)
    assert min(e.lrs[0] for e in bd.log) >= 0.5 * 0.05  # never below the floor ...
    assert any(e.lrs[0] == pytest.approx(0.025) for e in bd.log)  # ... reached (0.5 * 0.3**3 would be under it)
    floor_ends = [e for e in bd.log if e.kind == "exhausted" and "floor" in e.reason]
    assert floor_ends and all(e.extra["tries"] < 10 for e in floor_ends)
    assert BoldDriver(SearchRun(lr=0.2).rw).step_size.lr_min == pytest.approx(0.2 * 1e-3)  # the default
    assert BoldDriver(SearchRun(lr=0.2).rw, min_fraction=None).step_size.lr_min is None
    assert LineSearch(SearchRun(lr=0.2).rw).step_size.lr_min is None  # exhaustion resets its lr already
    # state_dict round trip: the floor in force is the original run's, not one resolved from the resumed lr
    sd = bd.state_dict()
    assert sd["step_size"]["lr_min"] == bd.step_size.lr_min and sd["step_size"]["settings"]["min_fraction"] == 0.05
    other = BoldDriver(SearchRun(opt="sgd", lr=0.01).rw, min_fraction=0.05, shrink=0.3, max_tries=10)
    other.load_state_dict(sd)
    assert other.step_size.lr_min == bd.step_size.lr_min and other.state_dict() == sd
    with pytest.raises(RewindError, match="min_fraction"):
        other.load_state_dict({**sd, "step_size": {**sd["step_size"], "settings": {**sd["step_size"]["settings"],
                                                                                   "min_fraction": 0.1}}})
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(RewindError, match="min_fraction"):
            BoldDriver(SearchRun().rw, min_fraction=bad)


class _Scalar(torch.nn.Module):
    """One weight w (no RNG use): batch ``(k, target)`` has the loss k·(w − target)², so the gradient and the heavy-ball
    step are known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def loss(self, k: float, target: float) -> torch.Tensor:
        return k * (self.w - target) ** 2


def _scalar_run(lr: float = 1.0, momentum: float = 0.9, opt: str = "sgd", **kw):
    model = _Scalar()
    o = (torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, **kw) if opt == "sgd"
         else torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
         else torch.optim.RMSprop(model.parameters(), lr=lr, momentum=momentum))  # fmt: skip
    return model, o, Rewind(model, o)


def _scalar_state(model, opt):
    return {"w": model.w.detach().clone(), "buf": opt.state[model.w]["momentum_buffer"].clone()}


# at lr 0.5 the first batch builds a momentum buffer pulling w up (w: 0 -> 10, buffer -20); at the second batch w is
# 0.1 above its target, so the gradient is 0.2 and the heavy-ball step (0.9·20 − 0.2)·0.55 goes further up: uphill
UPHILL = [(1.0, 10.0), (1.0, 9.9)]


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}],
                         ids=["for-loop", "foreach", "fused"])
def test_linesearch_restarts_momentum_that_goes_uphill(impl):
    """uphill="restart" (the default around SGD with momentum): the uphill trial is undone before it is evaluated,
    the momentum buffer zeroed and the gradient's own step searched; bitwise what SGD does from a zeroed buffer, with
    each of SGD's implementations (they all keep the buffer in ``state["momentum_buffer"]``)."""
    model, opt, rw = _scalar_run(lr=0.5, **impl)
    ls = LineSearch(rw)
    assert ls.restart_uphill and not ls.take_uphill
    for k, target in UPHILL:
        ls.step(lambda: model.loss(k, target))
    first, second = ls.log.events
    assert first.kind == "accepted" and first.extra == {"tries": 1}
    assert second.kind == "accepted" and second.extra == {"tries": 1, "restarted": True}
    assert ls.forwards == 4  # two evaluations per iteration: the restarted trial's uphill step was never evaluated
    assert second.loss_after < second.loss
    # by hand: the same first step, then a zeroed buffer and a plain step at the grown lr
    ref, ropt, _ = _scalar_run(lr=0.5, **impl)
    ropt.zero_grad()
    ref.loss(*UPHILL[0]).backward()
    ropt.step()
    ropt.param_groups[0]["lr"] *= 1.1  # the search grew the lr after the accepted step
    ropt.state[ref.w]["momentum_buffer"].zero_()
    ropt.zero_grad()
    ref.loss(*UPHILL[1]).backward()
    ropt.step()
    ropt.param_groups[0]["lr"] *= 1.1
    assert_same(_scalar_state(model, opt), _scalar_state(ref, ropt))
    assert get_lrs(opt) == get_lrs(ropt)
    # uphill="skip" (the previous behaviour): no step at all, the stale buffer kept
    model, opt, rw = _scalar_run(lr=0.5, **impl)
    ls = LineSearch(rw, uphill="skip")
    ls.step(lambda: model.loss(*UPHILL[0]))
    before = _scalar_state(model, opt)
    ls.step(lambda: model.loss(*UPHILL[1]))
    assert ls.log.events[-1].kind == "exhausted" and "not a descent direction" in ls.log.events[-1].reason
    assert_same(before, _scalar_state(model, opt))


def test_linesearch_restart_that_finds_nothing_restores_the_buffer():
    """A restarted search that ends without a step leaves the state as before the iteration: the momentum buffer is
    the old one, not the zeroed one (the undo point was recorded before the restart)."""
    model, opt, rw = _scalar_run(lr=0.5)
    ls = LineSearch(rw, max_tries=1)
    ls.step(lambda: model.loss(*UPHILL[0]))
    before = _scalar_state(model, opt)
    ls.step(lambda: model.loss(40.0, 9.9))  # steep: the gradient step at this lr overshoots, Armijo fails
    last = ls.log.events[-1]
    assert last.kind == "exhausted" and last.extra == {"tries": 1, "restarted": True}
    assert_same(before, _scalar_state(model, opt))
    assert not torch.equal(before["buf"], torch.zeros(()))
    # the next iteration runs from the old buffer again, with the lr the failed iteration started with
    assert get_lrs(opt) == (0.5 * 1.1,)


def test_linesearch_c_auto():
    """c="auto": 0.3 around SGD & co. (chosen with the momentum restart on the suite's tune half), 0.1 around
    optimizers that scale each step (chosen for Adam); a number is kept; anything else is refused."""
    assert LineSearch(_scalar_run()[2]).c == 0.3
    assert LineSearch(_scalar_run(momentum=0.0)[2]).c == 0.3
    assert LineSearch(_scalar_run(opt="adam")[2]).c == 0.1
    assert LineSearch(_scalar_run()[2], c=0.05).c == 0.05
    for bad in ("big", 0.0, 1.0):
        with pytest.raises(RewindError, match="c must be"):
            LineSearch(_scalar_run()[2], c=bad)


def test_linesearch_error_in_a_restarted_trial_leaves_the_state_as_before():
    """loss_fn raising while a restarted trial is judged: the undo restores the iteration's start, old buffer
    included (the restart's zeroing is not left behind)."""
    model, opt, rw = _scalar_run(lr=0.5)
    ls = LineSearch(rw)
    ls.step(lambda: model.loss(*UPHILL[0]))
    before = _scalar_state(model, opt)
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        return model.loss(*UPHILL[1])

    with pytest.raises(RuntimeError, match="data loader died"):
        ls.step(loss_fn)
    assert_same(before, _scalar_state(model, opt))
    assert get_lrs(opt) == (0.55,)


def test_linesearch_uphill_restart_needs_momentum():
    _, opt, rw = _scalar_run(momentum=0.0)
    assert not LineSearch(rw).restart_uphill  # "auto" around SGD without momentum: nothing to restart, skip
    with pytest.raises(RewindValueError, match="uphill='restart' restarts the optimizer's momentum"):
        LineSearch(rw, uphill="restart")
    _, _, rw = _scalar_run(opt="adam")
    assert not LineSearch(rw).restart_uphill  # Adam & co. take the step as it is
    with pytest.raises(RewindValueError, match="has none here"):
        LineSearch(rw, uphill="restart")
    _, _, rw = _scalar_run(opt="rmsprop")  # momentum and eps: "auto" takes; "restart" is allowed
    assert LineSearch(rw).take_uphill and LineSearch(rw, uphill="restart").restart_uphill


def test_linesearch_restart_replay_is_exact():
    """On real batches: restarts happen, and a replay by hand (restart included) ends bitwise where the search did."""
    data = make_data(60)
    run = SearchRun(opt="sgd", lr=0.3, groups=True)
    ls = LineSearch(run.rw, max_tries=4)
    run.train(ls, data)
    assert any(e.extra.get("restarted") for e in ls.log)
    rep = SearchRun(opt="sgd", lr=0.3, groups=True)
    rep.replay(ls.log, data, accept=armijo(0.3), shrink=0.5, grow=1.1, lr_max=3.0, max_tries=4, restart=True)
    assert_same(run.state(), rep.state())


def test_linesearch_around_adam_never_collapses():
    """Adam's step is often not a descent direction for the mini-batch: a failure cannot be helped by a smaller lr, so
    the search ends there (uphill="auto" takes Adam's step as it is, uphill="skip" takes none), and a step that does
    not change the float32 loss is never accepted, so the lr stays within [start * shrink**max_tries, start]."""
    for uphill, kind in (("auto", "accepted"), ("skip", "exhausted")):
        data = make_data(60)
        run = SearchRun(opt="adam", lr=0.05, dropout=0.0)  # at 0.05 one of Adam's steps goes uphill on its batch
        ls = LineSearch(run.rw, uphill=uphill)
        run.train(ls, data)
        assert all(not (e.kind == "accepted" and e.loss_after == e.loss) for e in ls.log)
        assert min(e.lrs[0] for e in ls.log) >= 0.05 * 0.5**10 and get_lrs(run.opt)[0] <= 0.05
        uphill_events = [e for e in ls.log if "not a descent direction" in e.reason]
        assert uphill_events and all(e.kind == kind for e in uphill_events), uphill
        if kind == "accepted":  # taken as Adam proposed it: the loss went up, the step stands
            assert all(e.loss_after > e.loss for e in uphill_events)
    with pytest.raises(RewindValueError, match="uphill must be one of"):
        LineSearch(SearchRun().rw, uphill="never")
    assert LineSearch(SearchRun(opt="sgd").rw).take_uphill is False  # around SGD a failed uphill step is skipped
    assert LineSearch(SearchRun(opt="adam").rw).take_uphill is True


def test_spike_detector_noise_from_differences_sees_a_spike_during_a_fast_descent():
    """Early in training the loss falls fast: the spread of the window's log-losses is mostly the descent, which hides
    a 20x jump (noise="level"); the batch-to-batch differences measure the noise around the trend and catch it."""
    g = torch.Generator().manual_seed(0)
    losses = [2.3 * math.exp(-i / 15) * float(torch.exp(0.1 * torch.randn((), generator=g))) for i in range(60)]
    diff, level = SpikeDetector(), SpikeDetector(noise="level")
    for x in losses:
        assert not diff.is_spike(x) and not level.is_spike(x)  # the descent itself is no spike
        diff.update(x)
        level.update(x)
    jump = 20 * losses[-1]
    assert diff.is_spike(jump) and not level.is_spike(jump), (diff.score(jump), level.score(jump))
    assert diff.settings()["noise"] == "diff"
    with pytest.raises(RewindError, match="noise"):
        SpikeDetector(noise="trend")


# ================================================================== SpikeGuard: first spikes dropped, buffers watched


def test_spike_guard_first_spike_drops_its_batch_a_repeat_rolls_back():
    """drop_first (default): a spike's step was never applied, so one bad batch is only dropped (nothing undone, no
    cool-down); a spike on the next batch too means the state is bad: roll back and cool down."""
    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, detector=det(warmup=3), rollback=4)
    for i in range(8):
        backprop(m, o)
        guard.step(quiet(i))
    params = [p.detach().clone() for p in m.parameters()]
    backprop(m, o)
    assert guard.step(1e3) is False  # one bad batch
    e = guard.log[-1]
    assert (e.kind, e.undone, e.extra["dropped"]) == ("rolled_back", 0, True) and "batch dropped" in e.reason
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters())) and rw.step == 8 and guard.steps == 8
    assert guard.lr_scale == 1.0 and guard.suspect
    backprop(m, o)
    assert guard.step(quiet(0)) and not guard.suspect and guard.log[-1].reason == ""  # full lr: no cool-down
    for _ in range(2):  # two bad batches in a row: the second rolls back
        backprop(m, o)
        guard.step(1e3)
    assert [e.undone for e in guard.log[-2:]] == [0, 4] and guard.lr_scale == 0.5 and guard.steps == 5
    backprop(m, o)
    guard.step(1e3)  # a burst goes on: no step stands since the roll-back, the batch is dropped
    assert guard.log[-1].undone == 0 and "no step since the last roll-back" in guard.log[-1].reason
    sd = json.loads(json.dumps(guard.state_dict()))
    assert sd["suspect"] is False and sd["settings"]["drop_first"] is True
    # non-finite iterations in a row are already a repeat: they roll back at once
    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, detector=det(warmup=3), rollback=4, max_consecutive=2)
    for i in range(6):
        backprop(m, o)
        guard.step(quiet(i))
    for _ in range(2):
        backprop(m, o)
        guard.step(float("nan"))
    assert [e.kind for e in guard.log[-2:]] == ["skipped", "rolled_back"] and guard.log[-1].undone == 4


def _probation_run(recheck: int = 2, spike: bool = True):
    """8 calm steps, then (``spike``) two spikes in a row: a dropped batch, then a roll-back of 4 steps."""
    m, o, rw = tiny(capacity=8)
    guard = SpikeGuard(rw, detector=det(warmup=3), rollback=4, recheck=recheck)
    for i in range(8):
        backprop(m, o)
        guard.step(quiet(i))
    if spike:
        for _ in range(2):
            backprop(m, o)
            guard.step(1e3)
        assert [e.undone for e in guard.log[-2:]] == [0, 4] and guard.lr_scale == 0.5
    return m, o, guard


def feed_losses(m, o, guard, losses) -> list[tuple[str, int]]:
    out = []
    for v in losses:
        backprop(m, o)
        guard.step(v)
        out.append((guard.log[-1].kind, guard.log[-1].undone))
    return out


def test_spike_guard_probation_after_a_roll_back():
    """After a roll-back the next ``recheck`` steps are on probation: a loss 1.4x the median (below the spike bar:
    1.5x and z 6) after one of them undoes the steps taken since the roll-back, bit for bit, and deepens the
    cool-down. The same loss is applied on a run that never rolled back, after the probation, and with recheck=0;
    a roll-back on probation does not start a new one (two judgements per roll-back in all)."""
    rise = 1.4
    m, o, guard = _probation_run()
    restored = full_state(m, o)
    assert feed_losses(m, o, guard, [quiet(0), rise]) == [("accepted", 0), ("rolled_back", 1)]
    e = guard.log[-1]
    assert "loss rise after a roll-back" in e.reason and "on probation" in e.reason
    assert_same(restored, full_state(m, o))
    assert guard.lr_scale == 0.25
    # the second judgement of this roll-back's probation; then none: the third rise stands
    assert feed_losses(m, o, guard, [quiet(1), rise, quiet(2), rise]) == [("accepted", 0), ("rolled_back", 1),
                                                                   ("accepted", 0), ("accepted", 0)]  # fmt: skip
    assert guard.lr_scale == 0.125 and guard.probation == 0 and not guard.on_probation
    # a spike on probation rolls back at once too (no first drop), to the roll-back's point
    m, o, guard = _probation_run()
    assert feed_losses(m, o, guard, [quiet(0), quiet(1), 1e3]) == [("accepted", 0), ("accepted", 0),
                                                                 ("rolled_back", 2)]  # fmt: skip
    # the probation lasts ``recheck`` steps
    m, o, guard = _probation_run()
    assert feed_losses(m, o, guard, [quiet(0), quiet(1), quiet(2), rise]) == [("accepted", 0)] * 4
    # no roll-back, or recheck=0: the rise is ordinary noise
    for recheck, spike in ((2, False), (0, True)):
        m, o, guard = _probation_run(recheck, spike)
        assert feed_losses(m, o, guard, [quiet(0), rise]) == [("accepted", 0)] * 2
    # the counters are part of the guard's state (resume mid-probation); a state saved before they existed loads
    m, o, guard = _probation_run()
    feed_losses(m, o, guard, [quiet(0)])
    sd = json.loads(json.dumps(guard.state_dict()))
    assert (sd["probation"], sd["on_probation"], sd["since_rollback"]) == (1, True, 1)
    other = _probation_run(spike=False)[2]
    other.load_state_dict(sd)
    assert (other.probation, other.on_probation, other.since_rollback) == (1, True, 1)
    old = {k: v for k, v in sd.items() if k not in ("probation", "on_probation", "since_rollback")}
    other.load_state_dict(old)
    assert (other.probation, other.on_probation, other.since_rollback) == (0, False, 0)
    for bad in ({"recheck": -1}, {"recheck_threshold": 0.0}, {"recheck_min_rel": -0.1}):
        with pytest.raises(RewindError, match=next(iter(bad))):
            SpikeGuard(Rewind(*tiny()[:2]), **bad)


def _bn_batches(n: int, scale_at: tuple[int, ...] = (), factor: float = 1e3):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, generator=g)
    out = []
    for i in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x * factor if i in scale_at else x, (x @ w).argmax(1)))
    return out


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_spike_guard_rolls_back_a_batchnorm_running_stat_jump(opt_kind):
    """Inputs x1e3: BatchNorm (train mode) normalises them away, so the loss does not spike, but the running variance
    jumps ~1e5-fold (eval mode would be broken for ~100 steps). Watching buffers the guard sees the jump and takes
    the batch back, running statistics included (wrap: recorded before forward), bit for bit; without, it cannot."""
    for watch in (True, False):
        model = _bn_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05) if opt_kind == "sgd" else \
            torch.optim.Adam(model.parameters(), lr=0.01)  # fmt: skip
        # the default (buffers="auto") watches the Rewind's own modules
        guard = SpikeGuard(Rewind(model, opt, capacity=4), **({} if watch else {"buffers": None}))
        bn = model[1]
        for i, (x, y) in enumerate(guard.wrap(_bn_batches(40, scale_at=(30,)))):
            var = bn.running_var.clone()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            ok = guard.step(loss)
            if i == 30:
                e = guard.log[-1]
                if watch:
                    assert not ok and e.kind == "rolled_back" and e.reason.startswith("buffer jump")
                    assert torch.equal(bn.running_var, var)  # the jump is taken back with the batch
                else:
                    assert ok and float(bn.running_var.max() / var.max()) > 1e3  # the loss did not show it
        events = [(e.iteration, e.kind) for e in guard.log if e.kind != "accepted"]
        assert events == ([(30, "rolled_back")] if watch else [])
        if watch:
            assert guard.settings()["buffers"] == 2 and guard.buffer_detector is not None


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_spike_guard_watching_buffers_never_fires_on_a_clean_batchnorm_run(opt_kind):
    """300 healthy iterations of a BatchNorm network from its first step (running statistics moving fastest): no
    decision other than "accepted" with the buffers watched, SGD with momentum or Adam. (The loss detector is off:
    this is about the buffers; 16-example batches with dropout give the loss a heavy tail.)"""
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_kind == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=0.01)  # fmt: skip
    guard = SpikeGuard(Rewind(model, opt, capacity=4), buffers=model, detector=SpikeDetector(threshold=math.inf))
    for x, y in guard.wrap(_bn_batches(300)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    assert guard.log.counts()["accepted"] == 300
    assert guard.buffer_detector.count == 299  # every change after the first step was learnt


def test_spike_guard_buffer_watch_state_and_errors():
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = SpikeGuard(Rewind(model, opt, capacity=4), buffers=model)
    for x, y in guard.wrap(_bn_batches(25)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        guard.step(loss)
    sd = json.loads(json.dumps(guard.state_dict()))
    assert len(sd["buffer_watch"]["ref"]) == 2 and sd["buffer_detector"]["count"] == 24  # mean and variance
    other = SpikeGuard(Rewind(_bn_model(), torch.optim.SGD(model.parameters(), lr=0.05), capacity=4),
                       buffers=_bn_model())  # fmt: skip
    other.load_state_dict(sd)
    assert other.buffer_watch.state_dict() == sd["buffer_watch"]
    assert values_equal(other.state_dict(), guard.state_dict())
    plain = SpikeGuard(Rewind(_bn_model(), torch.optim.SGD(model.parameters(), lr=0.05), capacity=4), buffers=None)
    with pytest.raises(RewindValueError, match="buffers: 2 saved, 0 here"):
        plain.load_state_dict(sd)
    bad = json.loads(json.dumps(sd))
    bad["buffer_watch"]["ref"] = [1.0]
    with pytest.raises(RewindValueError, match="expected 2 log-norms"):
        other.load_state_dict(bad)
    assert other.buffer_watch.state_dict() == sd["buffer_watch"]  # a refused state changed nothing
    rw = Rewind(*tiny()[:2])
    with pytest.raises(RewindValueError, match="buffers must be 'auto', a module"):
        SpikeGuard(rw, buffers="model")
    with pytest.raises(RewindTypeError, match="buffers must be an nn.Module"):
        SpikeGuard(rw, buffers=3)
    with pytest.raises(RewindValueError, match="must be floating-point"):
        SpikeGuard(rw, buffers=[torch.zeros(3, dtype=torch.long)])
    assert SpikeGuard(rw, buffers=torch.nn.Linear(2, 2)).buffer_watch is None  # no buffers: nothing to watch


def test_spike_guard_watches_the_rewinds_modules_by_default():
    model = _bn_model()
    rw = Rewind(model, torch.optim.SGD(model.parameters(), lr=0.05), capacity=4)
    assert rw.modules == (model,)
    assert SpikeGuard(rw).buffer_watch.count == 2  # BatchNorm's running mean and variance (not num_batches_tracked)
    assert SpikeGuard(rw, buffers=None).buffer_watch is None
    two = (torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert Rewind(two, torch.optim.SGD([p for m in two for p in m.parameters()], lr=0.1)).modules == two
    assert SpikeGuard(Rewind(*tiny()[:2])).buffer_watch is None  # no floating-point buffers: nothing to watch


def test_buffer_watch_measures_the_largest_change_of_norm():
    a, b, z = torch.ones(4), torch.full((2,), 3.0), torch.zeros(3)
    watch = BufferWatch([a, b, z])
    assert watch.change() == 0.0  # no reference yet
    watch.accept()
    a.mul_(2.0)  # x2
    b.mul_(0.25)  # x0.25: the largest change, either way
    z.fill_(5.0)  # was 0: no scale to compare with, not judged
    assert watch.change() == pytest.approx(math.log(4.0))
    watch.accept()
    b.fill_(float("nan"))
    assert math.isnan(watch.change())
    watch.accept()  # a non-finite measurement never becomes the reference
    assert watch.ref[1] == pytest.approx(0.75 * math.sqrt(2.0))
