"""Random operation sequences, checked against an independent model of the timeline semantics.

Each Hypothesis example builds a tiny BatchNorm + Dropout network, one of several optimizers and an LR scheduler,
wraps them in a :class:`Rewind` (capacity / redo / auto / grads / verify drawn at random) and applies up to 25
operations: step (fresh batch), undo(k), redo(k), snapshot(), hyperparameter edits, retry(lr=...), and trials
(commit, rollback, exception). A *reference model* written from the spec (not from ``history.py``) keeps

* the recorded points, numbered in recording order, each as a bitwise reference state (``full_state`` + ``.grad``)
  captured by the test itself at exactly the moments the spec says a point is recorded (an extra step pre-hook
  registered after the Rewind's, explicit ``snapshot()`` / trial entry, and the live state before an undo that
  records for redo), together with the *history* of events that produced it from the initial state;
* which point the live state derives from, whether it is clean, whether a snapshot is pending.

After every operation the test checks ``len(rw)``, ``rw.redo_depth``, the live ``.grad`` (untouched by undo with
``grads=False``, restored with ``grads=True``) and, after undo/redo/rollback, the whole state bit for bit against
the target point's reference. Invalid undo/redo/retry/rollback must raise :class:`RewindError` and leave the state
bitwise unchanged. Finally the live state must equal a plain run (no torchrewind) that replays only the surviving
events (forward/backward on the same batch, optimizer + scheduler step, hyperparameter edits).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from statecheck import assert_same, full_state

from torchrewind import Rewind, RewindError
from torchrewind.core.values import values_equal

# --------------------------------------------------------------------------- the training setup

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
}

# Hyperparameter edits each optimizer accepts: key -> candidate values.
EDITS = {
    "sgd": {"lr": [0.1, 0.02, 0.003], "momentum": [0.5, 0.8, 0.95], "weight_decay": [0.0, 1e-2]},
    "adam": {"lr": [3e-2, 1e-3], "betas": [(0.8, 0.99), (0.95, 0.9)], "weight_decay": [0.0, 1e-2]},
    "adamw_amsgrad": {"lr": [3e-2, 1e-3], "betas": [(0.8, 0.99), (0.95, 0.9)], "weight_decay": [0.0, 0.1]},
    "rmsprop_centered": {"lr": [3e-2, 1e-3], "momentum": [0.2, 0.9], "weight_decay": [0.0, 1e-2]},
    "adagrad": {"lr": [0.3, 0.01], "lr_decay": [0.0, 0.1], "weight_decay": [0.0, 1e-2]},
}


def make_scheduler(kind: str, opt: torch.optim.Optimizer):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    exp = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    stp = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return torch.optim.lr_scheduler.ChainedScheduler([exp, stp])


def build(opt_name: str, sched_kind: str, seed: int):
    """Same seed -> bitwise identical network, optimizer, scheduler and global RNG state."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    )
    net.train()
    opt = OPTIMIZERS[opt_name](net.parameters())
    sched = make_scheduler(sched_kind, opt)
    return net, opt, sched


def grads_of(net: torch.nn.Module) -> list:
    return [None if p.grad is None else p.grad.detach().clone() for p in net.parameters()]


def grads_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and values_equal(x, y)) for x, y in zip(a, b)
    )


def forward_backward(net, opt, batch) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    F.mse_loss(net(x), y).backward()


def set_hparams(opt, hp: dict) -> None:
    for g in opt.param_groups:
        g.update(hp)


def replay(opt_name, sched_kind, seed, batches, events) -> tuple:
    """A plain run (no torchrewind) applying ``events``; returns its (full_state, grads)."""
    net, opt, sched = build(opt_name, sched_kind, seed)
    for ev in events:
        if ev[0] == "fwd":
            forward_backward(net, opt, batches[ev[1]])
        elif ev[0] == "hp":
            set_hparams(opt, dict(ev[1]))
        else:  # ("step", grads or None): None = the grads of the preceding forward/backward
            if ev[1] is not None:
                for p, g in zip(net.parameters(), ev[1]):
                    p.grad = None if g is None else g.clone()
            opt.step()
            sched.step()
    return full_state(net, opt, sched)


# --------------------------------------------------------------------------- the independent reference model


@dataclass
class Ref:
    state: dict  # full_state(...) at recording time
    grads: list  # .grad of every parameter at recording time
    hist: tuple  # events from the initial state to this state


class TimelineModel:
    """The spec, literally: points are numbered in recording order and stored in a dict; recording point i drops
    every point after i and evicts points <= i - nslots."""

    def __init__(self, capacity: int, redo: bool, auto: bool, grads: bool) -> None:
        self.capacity, self.redo, self.auto, self.grads = capacity, redo, auto, grads
        self.nslots = capacity + 1 if redo else capacity
        self.points: dict[int, Ref] = {}
        self.cur: int | None = None  # the point the live state derives from
        self.clean = False
        self.pending = False  # snapshot() since the last step / restore
        self.live_hist: tuple = ()
        self.live_grads: list = []

    # ---- recording
    def _after_recording(self, i: int) -> set[int]:
        return {j for j in self.points if i - self.nslots < j < i} | {i}

    def _store(self, i: int, ref: Ref) -> None:
        keep = self._after_recording(i)
        self.points = {j: r for j, r in self.points.items() if j in keep}
        self.points[i] = ref

    def next_point(self) -> int:
        if self.cur is None:
            return 0
        return self.cur if self.clean else self.cur + 1

    def record(self, ref: Ref) -> None:
        i = self.next_point()
        self._store(i, ref)
        self.cur, self.clean = i, True

    def snapshot(self, ref: Ref) -> None:
        self.record(ref)
        self.pending = True

    def step_started(self, live) -> None:
        """The optimizer's pre-step moment (``live`` is a thunk for the live reference)."""
        if self.auto and not self.pending:
            self.record(live())
        self.pending = False
        self.clean = False
        if self.cur is not None:
            self.points = {j: r for j, r in self.points.items() if j <= self.cur}

    # ---- moving
    def _plan(self, target: int) -> tuple[int | None, int] | None:
        """Record-for-redo point (or None) and target, or None when the target is not available."""
        rec = self.cur + 1 if (not self.clean and self.redo) else None
        available = set(self.points) if rec is None else self._after_recording(rec) - {rec}
        return (rec, target) if target in available else None

    def plan_undo(self, n: int):
        if self.cur is None or not 1 <= n <= self.capacity:
            return None
        if self.clean:
            target = self.cur - n
        elif self.redo:
            target = self.cur + 1 - n
        else:
            target = self.cur - (n - 1)
        return self._plan(target)

    def plan_redo(self, n: int):
        if self.cur is None or not self.clean or n < 1 or (self.cur + n) not in self.points:
            return None
        return None, self.cur + n

    def plan_goto(self, point: int):
        plan = self._plan(point)
        if plan is None and point in self.points:
            # Recording the live state for redo would evict the trial's start point: a rollback restores it
            # without recording (rollback matters more than redo).
            return None, point
        return plan

    def move(self, plan, live) -> Ref:
        rec, target = plan
        if rec is not None:
            self._store(rec, live())
        self.cur, self.clean, self.pending = target, True, False
        ref = self.points[target]
        self.live_hist = ref.hist
        if self.grads:
            self.live_grads = ref.grads
        return ref

    # ---- queries
    def undo_depth(self) -> int:
        d = 0
        while self.plan_undo(d + 1) is not None:
            d += 1
        return d

    def redo_depth(self) -> int:
        d = 0
        while self.plan_redo(d + 1) is not None:
            d += 1
        return d


# --------------------------------------------------------------------------- the driver


def pick_n(raw: int, depth: int) -> int:
    """undo/redo ops carry a raw int in 0..5: 5 asks for one step more than the model says is possible (must
    fail), anything else for a possible number of steps (when there is one)."""
    return depth + 1 if raw == 5 else 1 + raw % max(depth, 1)


class _Boom(Exception):
    pass


class Run:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.net, self.opt, self.sched = build(cfg["opt"], cfg["sched"], cfg["seed"])
        self.rw = Rewind(
            self.net,
            self.opt,
            schedulers=[self.sched],
            capacity=cfg["capacity"],
            grads=cfg["grads"],
            redo=cfg["redo"],
            auto=cfg["auto"],
            verify=cfg["verify"],
            overlap=cfg.get("overlap", False),
        )
        self.m = TimelineModel(cfg["capacity"], cfg["redo"], cfg["auto"], cfg["grads"])
        self.m.live_grads = grads_of(self.net)
        self.opt.register_step_pre_hook(self._pre_step)  # after the Rewind's hook: sees what it recorded
        self.data = torch.Generator().manual_seed(cfg["seed"] + 1)
        self.batches: list = []
        self.log: list[str] = []
        self._before_step = None

    # ---- helpers
    def live(self) -> Ref:
        return Ref(full_state(self.net, self.opt, self.sched), grads_of(self.net), self.m.live_hist)

    def _pre_step(self, opt, args, kwargs) -> None:
        if self._before_step is not None:
            self._before_step()
        assert grads_equal(grads_of(self.net), self.m.live_grads), "the .grad about to be used is not the expected one"
        self.m.step_started(self.live)

    def opt_step(self, grads_event) -> None:
        self.opt.step()  # both pre-hooks fire here
        self.sched.step()
        self.m.live_hist += (("step", grads_event),)
        self.m.live_grads = grads_of(self.net)

    def step(self) -> None:
        batch = (torch.randn(5, 6, generator=self.data), torch.randn(5, 3, generator=self.data))
        self.batches.append(batch)
        forward_backward(self.net, self.opt, batch)
        self.m.live_hist += (("fwd", len(self.batches) - 1),)
        self.m.live_grads = grads_of(self.net)
        self.opt_step(None)

    def hp(self, key, value) -> None:
        set_hparams(self.opt, {key: value})
        self.m.live_hist += (("hp", ((key, value),)),)

    def expect_restored(self, ref: Ref) -> None:
        assert_same(ref.state, full_state(self.net, self.opt, self.sched))
        if self.cfg["grads"]:
            assert grads_equal(grads_of(self.net), ref.grads), "grads=True: .grad not restored"

    def expect_unchanged(self, before: Ref) -> None:
        self.expect_restored(Ref(before.state, before.grads, ()))
        assert grads_equal(grads_of(self.net), before.grads)

    def goto(self, plan, action) -> None:
        """Run ``action`` (an undo/redo/rollback) that the model planned as ``plan`` (None: must fail)."""
        before = self.live()
        if plan is None:
            with pytest.raises(RewindError):
                action()
            self.expect_unchanged(before)
            return
        action()
        ref = self.m.move(plan, lambda: before)
        self.expect_restored(ref)

    def check(self) -> None:
        assert len(self.rw) == self.m.undo_depth(), (len(self.rw), self.m.undo_depth())
        assert self.rw.redo_depth == self.m.redo_depth(), (self.rw.redo_depth, self.m.redo_depth())
        assert grads_equal(grads_of(self.net), self.m.live_grads), ".grad differs from the expected live .grad"

    # ---- operations
    def apply(self, op) -> None:
        self.log.append(repr(op))
        kind = op[0]
        if kind == "step":
            self.step()
        elif kind == "sstep":  # the auto=False idiom: snapshot at the top of the iteration, then step
            self.apply(("snapshot",))
            self.step()
        elif kind == "undo":
            n = pick_n(op[1], self.m.undo_depth())
            self.log[-1] += f" -> undo({n})"
            self.goto(self.m.plan_undo(n), lambda: self.rw.undo(n))
        elif kind == "redo":
            n = pick_n(op[1], self.m.redo_depth())
            self.log[-1] += f" -> redo({n})"
            self.goto(self.m.plan_redo(n), lambda: self.rw.redo(n))
        elif kind == "snapshot":
            ref = self.live()
            self.rw.snapshot()
            self.m.snapshot(ref)
            assert_same(ref.state, full_state(self.net, self.opt, self.sched))  # snapshot changes nothing
        elif kind == "hp":
            key, i = op[1], op[2]
            choices = EDITS[self.cfg["opt"]]
            key = sorted(choices)[key % len(choices)]
            self.hp(key, choices[key][i % len(choices[key])])
        elif kind == "retry":
            self.retry(op[1])
        elif kind == "trial":
            self.trial(op[1], op[2], op[3])
        else:  # pragma: no cover
            raise AssertionError(op)
        self.check()

    def retry(self, lr: float) -> None:
        before = self.live()
        plan = self.m.plan_undo(1)
        no_grads = not self.cfg["grads"] and all(g is None for g in self.m.live_grads)
        if plan is None or no_grads:
            with pytest.raises(RewindError):
                self.rw.retry(lr=lr)
            self.expect_unchanged(before)
            return

        def before_step():  # runs inside retry, after its undo + hyperparameter edit, before the step records
            ref = self.m.move(plan, lambda: before)
            expected = dict(ref.state, groups=[dict(g, lr=lr) for g in ref.state["groups"]])
            assert_same(expected, full_state(self.net, self.opt, self.sched))
            if self.cfg["grads"]:
                assert grads_equal(grads_of(self.net), ref.grads), "grads=True: .grad not restored by retry"
            self.m.live_hist += (("hp", (("lr", lr),)),)

        self._before_step = before_step
        try:
            self.rw.retry(lr=lr)
        finally:
            self._before_step = None
        self.sched.step()
        self.m.live_hist += (("step", self.m.live_grads),)
        self.m.live_grads = grads_of(self.net)

    def trial(self, nsteps: int, end: str, inner_undo: bool) -> None:
        outcome = None
        try:
            with self.rw.trial() as t:
                self.m.snapshot(self.live())
                start = self.m.cur
                for _ in range(nsteps):
                    self.step()
                if inner_undo:  # possibly to before the trial's start point
                    self.apply(("undo", 0))
                if end != "commit":
                    plan = self.m.plan_goto(start)
                    before = self.live()
                if end == "rollback":
                    t.rollback()
                    outcome = "rolled back"
                elif end == "raise":
                    raise _Boom()
        except _Boom:
            outcome = "rolled back"
        except RewindError:
            outcome = "error"
        if end == "commit":
            assert outcome is None
            return
        if plan is None:
            assert outcome == "error"
            self.expect_unchanged(before)
            return
        assert outcome == "rolled back"
        ref = self.m.move(plan, lambda: before)
        self.expect_restored(ref)

    def final_replay_check(self) -> None:
        live = full_state(self.net, self.opt, self.sched)
        rep = replay(self.cfg["opt"], self.cfg["sched"], self.cfg["seed"], self.batches, self.m.live_hist)
        assert_same(rep, live)


# --------------------------------------------------------------------------- strategies

# Weighted by repetition (sampled_from picks an index). undo/redo carry a raw int that the driver maps to n with
# pick_n, from the model's depth.
KINDS = ["step"] * 6 + ["sstep", "undo", "undo", "undo", "redo", "redo", "snapshot", "hp", "retry", "trial", "trial"]
_OP_ARGS = {
    "undo": (st.integers(0, 5),),
    "redo": (st.integers(0, 5),),
    "hp": (st.integers(0, 2), st.integers(0, 2)),
    "retry": (st.sampled_from([0.2, 0.01, 1e-3]),),
    "trial": (st.integers(0, 2), st.sampled_from(["commit", "rollback", "raise"]), st.booleans()),
}
ops = st.sampled_from(KINDS).flatmap(lambda k: st.tuples(st.just(k), *_OP_ARGS.get(k, ())))
configs = st.fixed_dictionaries(
    {
        "opt": st.sampled_from(sorted(OPTIMIZERS)),
        "sched": st.sampled_from(["step", "chain"]),
        "capacity": st.sampled_from([1, 2, 3, 5]),
        "redo": st.booleans(),
        "auto": st.booleans(),
        "grads": st.booleans(),
        "verify": st.booleans(),
        "overlap": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)

SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_sequence(cfg: dict, seq: list) -> None:
    r = Run(cfg)
    r.check()
    for op in seq:
        try:
            r.apply(op)
        except AssertionError as e:
            raise AssertionError(f"after ops {r.log}: {e}") from e
    r.final_replay_check()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


BASE = {"opt": "adam", "sched": "chain", "capacity": 2, "seed": 0}
BASE.update(redo=True, auto=True, grads=False, verify=False, overlap=False)


@SETTINGS
@given(cfg=configs, seq=st.lists(ops, min_size=8, max_size=25))
@example(
    cfg=BASE, seq=[("step",)] * 3 + [("undo", 2), ("redo", 1), ("hp", 0, 1), ("step",), ("redo", 1), ("undo", 3)]
)
@example(
    cfg=dict(BASE, opt="sgd", capacity=1, redo=False, auto=False, grads=True),
    seq=[("step",), ("snapshot",), ("step",), ("step",), ("undo", 1), ("retry", 0.2), ("undo", 2)]
    + [("trial", 1, "raise", False)],
)
@example(
    cfg=dict(BASE, opt="rmsprop_centered", capacity=3, grads=True, sched="step"),
    seq=[("trial", 2, "rollback", False), ("redo", 1), ("retry", 0.01), ("undo", 3), ("redo", 3)]
    + [("snapshot",), ("redo", 1), ("trial", 2, "raise", True), ("redo", 0)],
)
@example(
    cfg=dict(BASE, opt="adagrad", capacity=5, redo=False, verify=True),
    seq=[("step",), ("hp", 1, 1), ("step",), ("trial", 1, "rollback", False), ("undo", 1), ("undo", 5), ("step",)],
)
@example(
    cfg=dict(BASE, opt="adamw_amsgrad", capacity=2, auto=False, grads=True),
    seq=[("trial", 0, "rollback", False), ("step",), ("hp", 2, 0), ("undo", 0), ("redo", 0), ("snapshot",)]
    + [("retry", 0.2)],
)
@example(  # a step after undo must discard the redo points even when it records nothing (auto=False, redo=False)
    cfg=dict(BASE, opt="sgd", capacity=2, redo=False, auto=False),
    seq=[("sstep",), ("sstep",), ("undo", 1), ("step",), ("undo", 0), ("redo", 5), ("redo", 0)],
)
@example(  # trial start evicted by the steps inside it: rollback / exception must raise RewindError, state untouched
    cfg=dict(BASE, opt="adamw_amsgrad", capacity=1, redo=False, grads=True),
    seq=[("step",), ("trial", 2, "raise", False), ("trial", 2, "rollback", False), ("undo", 0), ("redo", 0)]
    + [("retry", 0.01)],
)
def test_random_sequences_match_model(cfg, seq):
    run_sequence(cfg, seq)


# --------------------------------------------------------------------------- regression
# Trial.rollback used to record the live state for redo into the ring slot that still held the trial's start point,
# then "restore" that slot: nothing was rolled back and the timeline became inconsistent.


@pytest.mark.parametrize("end", ["rollback", "raise"])
def test_trial_rollback_when_redo_recording_evicts_start(end):
    net, opt, sched = build("sgd", "step", 0)
    rw = Rewind(net, opt, schedulers=[sched], capacity=1)  # redo=True, auto=True: 2 slots
    start = full_state(net, opt, sched)
    data = torch.Generator().manual_seed(1)

    def step():
        forward_backward(net, opt, (torch.randn(5, 6, generator=data), torch.randn(5, 3, generator=data)))
        opt.step()
        sched.step()

    before = None
    try:
        with rw.trial() as t:
            step()
            step()  # auto-records point 1; the trial's start (point 0) is still stored
            before = full_state(net, opt, sched)
            if end == "rollback":
                t.rollback()
            else:
                raise _Boom()
    except _Boom:
        pass
    except RewindError:  # acceptable: refusing, state untouched
        assert_same(before, full_state(net, opt, sched))
        assert len(rw) <= 1 and rw.redo_depth <= 1
        return
    assert_same(start, full_state(net, opt, sched))  # the rollback must restore the start point
    assert len(rw) <= 1 and rw.redo_depth <= 1
