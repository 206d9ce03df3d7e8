"""Tuners that leave no trace: lr_find, find_batch_size, BranchAndPick, and the Lightning / Hugging Face entry points.

The key property: training after a tuner equals training without it, bit for bit. Each check builds the same seeded
setup twice, runs the tuner on one of them, then trains both the same way (the plain loop a user writes: iterate a
DataLoader, forward, backward, step, scheduler) and compares ``full_state`` (parameters, buffers, optimizer state,
param_groups, schedulers, torch RNG) with ``assert_same`` -- never allclose -- plus Python's and NumPy's RNG, the
loader's generator and the batches the loader yields next.
"""

from __future__ import annotations

import contextlib
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from statecheck import assert_same, full_state
from torch.utils.data import DataLoader, TensorDataset

from torchrewind import Rewind, RewindError, Trajectory
from torchrewind.errors import RewindTypeError, RewindValueError
from torchrewind.tuners import (
    BranchAndPick,
    LRSweep,
    StateHold,
    find_batch_size,
    lr_find,
    scaled,
)
from torchrewind.tuners import suggest
from torchrewind.tuners.data import data_state


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


# =============================================================================================== the training setup
D_IN, N_CLS, N = 16, 4, 384


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, D_IN, generator=g)
    return x, (x @ torch.randn(D_IN, N_CLS, generator=g)).argmax(1)


class Setup:
    """A seeded model/optimizer/scheduler/loader. ``kind``: "plain" (SGD momentum), "sched" (Adam + StepLR), "bn"
    (BatchNorm + Dropout, Adam), "shuffle" (like "bn", loader shuffled by its own generator), "global" (shuffled by
    the global torch RNG, no generator)."""

    def __init__(self, kind: str = "plain", seed: int = 0) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        bn = kind in ("bn", "shuffle", "global")
        mid = [torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.2)] if bn else []
        self.model = torch.nn.Sequential(torch.nn.Linear(D_IN, 32), *mid, torch.nn.ReLU(), torch.nn.Linear(32, N_CLS))
        if kind == "plain":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=7, gamma=0.5) if kind != "plain" else None
        x, y = _data()
        self.gen = torch.Generator().manual_seed(7) if kind == "shuffle" else None
        shuffle = kind in ("shuffle", "global")
        self.loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=self.gen)
        self.scheds = [self.sched] if self.sched is not None else []
        self._rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    @contextlib.contextmanager
    def active(self):
        """Run with this setup's own global RNG streams (two setups trained in turn must not share them)."""
        torch.set_rng_state(self._rng[0])
        random.setstate(self._rng[1])
        np.random.set_state(self._rng[2])
        try:
            yield self
        finally:
            self._rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def train(self, steps: int = 20) -> None:
        """The user's loop: whole epochs of the loader, a scheduler step per iteration."""
        with self.active():
            self._train(steps)

    def _train(self, steps: int) -> None:
        self.model.train()
        done = 0
        while done < steps:
            for batch in self.loader:
                self.opt.zero_grad()
                self.loss(batch).backward()
                self.opt.step()
                if self.sched is not None:
                    self.sched.step()
                done += 1
                if done == steps:
                    break

    def state(self) -> dict:
        with self.active():
            return self._state()

    def _state(self) -> dict:
        s = full_state(self.model, self.opt, *self.scheds)
        s["python_rng"] = random.getstate()
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        s["numpy_rng"] = [torch.from_numpy(keys.copy()), pos, has_gauss, gauss]
        s["loader_gen"] = self.gen.get_state() if self.gen is not None else None
        s["grads"] = [None if p.grad is None else p.grad.clone() for p in self.model.parameters()]
        s["training"] = [m.training for m in self.model.modules()]
        return s


def assert_no_trace(kind: str, tuner, train_before: int = 5, train_after: int = 25) -> Setup:
    """``tuner(setup)`` run mid-training leaves the state as it was, and training afterwards is bitwise the same."""
    ref, run = Setup(kind), Setup(kind)
    ref.train(train_before)
    run.train(train_before)
    before = run.state()
    with run.active():
        tuner(run)
    assert_same(before, run.state())
    ref.train(train_after)
    run.train(train_after)
    assert_same(ref.state(), run.state())
    return run


# =============================================================================================== lr_find
@pytest.mark.parametrize("kind", ["plain", "sched", "bn", "shuffle", "global"])
def test_lr_find_leaves_no_trace(kind):
    res = {}

    def tuner(s: Setup) -> None:
        # generators of the loader are found on their own (shuffle: loader.generator)
        res["r"] = lr_find(s.model, s.opt, s.loss, s.loader, schedulers=s.scheds, num_steps=40, lr_max=1.0)

    assert_no_trace(kind, tuner)
    r = res["r"]
    assert 2 <= len(r.lrs) <= 40 and r.lrs[0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(r.lrs, r.lrs[1:]))  # exponential sweep: strictly increasing
    assert r.hold_seconds > 0 and r.seconds >= r.hold_seconds


def test_lr_find_really_trains_and_changes_lr():
    """The sweep takes real steps at the scheduled lrs (not a dry run): the loss falls, and each step's lr is the
    schedule's (checked with a train_step that looks at the optimizer)."""
    s = Setup("plain")
    seen = []

    def step(batch):
        seen.append(s.opt.param_groups[0]["lr"])
        s.opt.zero_grad()
        loss = s.loss(batch)
        loss.backward()
        s.opt.step()
        return loss

    res = lr_find(s.model, s.opt, data=s.loader, train_step=step, lr_min=1e-3, lr_max=1.0, num_steps=30, diverge=None)
    sweep = LRSweep(1e-3, 1.0, 30)
    assert seen == [sweep.lr(i) for i in range(30)] == res.lrs
    assert res.stopped == "completed" and min(res.smoothed) < res.smoothed[0]
    assert s.opt.param_groups[0]["lr"] == 0.05  # put back


def test_lr_find_linear_mode_and_divergence_stop():
    s = Setup("plain")
    before = s.state()
    with s.active():
        res = lr_find(s.model, s.opt, s.loss, s.loader, lr_min=0.01, lr_max=1e4, num_steps=60, mode="linear")
    assert res.stopped in ("diverged", "non-finite") and len(res.lrs) < 60
    assert res.lrs[1] - res.lrs[0] == pytest.approx(res.lrs[2] - res.lrs[1])
    assert_same(before, s.state())


def test_lr_find_through_users_rewind():
    """With rewind=, the sweep is an undone branch of the user's Rewind: its step counter is back, the next step is
    undoable to the right state, and training after is bitwise training without."""
    ref, run = Setup("bn"), Setup("bn")
    rw_ref = Rewind(ref.model, ref.opt, schedulers=ref.scheds, capacity=40)
    rw = Rewind(run.model, run.opt, schedulers=run.scheds, capacity=40)
    ref.train(3)
    run.train(3)
    before = run.state()
    with run.active():
        res = lr_find(run.model, run.opt, run.loss, run.loader, schedulers=run.scheds, rewind=rw, num_steps=40)
    assert_same(before, run.state())
    assert rw.step == rw_ref.step == 3
    ref.train(4)
    run.train(4)
    assert_same(ref.state(), run.state())
    with ref.active():
        rw_ref.undo(2)
    with run.active():
        rw.undo(2)
    assert_same(ref.state(), run.state())
    assert len(res.lrs) >= 2


def test_lr_find_rewind_too_small_refused_untouched():
    s = Setup("plain")
    rw = Rewind(s.model, s.opt, capacity=4)
    s.train(2)
    before = s.state()
    with pytest.raises(RewindValueError, match="capacity >= 50"):
        lr_find(s.model, s.opt, s.loss, s.loader, rewind=rw, num_steps=50)
    assert_same(before, s.state())
    assert rw.step == 2


def test_lr_find_with_grad_scaler_and_clipping_train_step():
    """A train_step with a (CPU) GradScaler and gradient clipping; the scaler's state is held too."""
    ref, run = Setup("sched"), Setup("sched")
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3) for _ in range(2)]

    def make_step(s, scaler):
        def step(batch):
            s.opt.zero_grad()
            loss = s.loss(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(s.opt)
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
            scaler.step(s.opt)
            scaler.update()
            return loss
        return step

    for s, sc in zip((ref, run), scalers):
        with s.active():
            for batch in list(s.loader)[:4]:
                make_step(s, sc)(batch)
    before = run.state()
    scale_before = scalers[1].state_dict()
    with run.active():
        lr_find(run.model, run.opt, data=run.loader, train_step=make_step(run, scalers[1]), schedulers=run.scheds,
                scaler=scalers[1], num_steps=30)  # fmt: skip
    assert_same(before, run.state())
    assert scalers[1].state_dict() == scale_before
    for s, sc in zip((ref, run), scalers):
        with s.active():
            for batch in list(s.loader)[:6]:
                make_step(s, sc)(batch)
    assert_same(ref.state(), run.state())
    assert scalers[0].state_dict() == scalers[1].state_dict()


def test_lr_find_error_mid_sweep_restores_and_raises():
    s = Setup("bn")
    s.train(2)
    before = s.state()
    calls = []

    def loss(batch):
        calls.append(1)
        if len(calls) == 6:
            raise KeyError("boom")
        return s.loss(batch)

    with pytest.raises(KeyError, match="boom"), s.active():
        lr_find(s.model, s.opt, loss, s.loader, num_steps=20)
    assert_same(before, s.state())


def test_lr_find_apply_sets_the_suggestion_after_restoring():
    s = Setup("plain")
    before = s.state()
    res = lr_find(s.model, s.opt, s.loss, s.loader, num_steps=60, lr_max=3.0, apply=True)
    assert res.suggestion is not None
    assert s.opt.param_groups[0]["lr"] == res.suggestion
    s.opt.param_groups[0]["lr"] = 0.05
    assert_same(before, s.state())


def test_lr_find_result_plot_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    s = Setup("plain")
    res = lr_find(s.model, s.opt, s.loss, s.loader, num_steps=50, lr_max=10.0)
    assert set(res.suggestions) == {"valley", "steepest", "minimum"}
    for lr in res.suggestions.values():
        assert lr is None or 1e-7 <= lr <= 10.0
    path = tmp_path / "lr.png"
    res.plot(path)
    assert path.stat().st_size > 1000
    d = json.loads(json.dumps(res.to_dict(), default=str))
    assert d["suggestion"] == res.suggestion and len(d["lrs"]) == len(res.lrs)


def test_lr_find_argument_errors_leave_state_untouched():
    s = Setup("plain")
    before = s.state()
    L = s.loss
    cases = [
        (RewindValueError, dict(loss_fn=L, data=s.loader, lr_min=1.0, lr_max=0.5)),
        (RewindValueError, dict(loss_fn=L, data=s.loader, mode="cosine")),
        (RewindValueError, dict(loss_fn=L, data=s.loader, rule="best")),
        (RewindValueError, dict(loss_fn=L, data=s.loader, num_steps=1)),
        (RewindTypeError, dict(loss_fn=L, data=s.loader, num_steps=10.0)),
        (RewindTypeError, dict(data=s.loader)),  # neither loss_fn nor train_step
        (RewindTypeError, dict(loss_fn=L, data=s.loader, train_step=L)),  # both
        (RewindValueError, dict(loss_fn=L, data=iter(s.loader))),  # a one-shot iterator would be consumed
        (RewindTypeError, dict(loss_fn=L, data=None)),
        (RewindTypeError, dict(loss_fn=L, data=s.loader, generators=[object()])),
    ]
    for err, kw in cases:
        with pytest.raises(err):
            lr_find(s.model, s.opt, **kw)
    assert_same(before, s.state())


def test_data_state_finds_loader_generators():
    x, y = _data()
    g = torch.Generator()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)
    gens, objs = data_state(loader)
    assert gens == [g] and objs == []
    assert data_state([1, 2]) == ([], [])


# =============================================================================================== suggestion rules
def _curve(n=100, noise=0.0, seed=0):
    """A typical range-test curve: plateau, a descent centred at 1e-2, a minimum near 0.3, then divergence."""
    g = torch.Generator().manual_seed(seed)
    lrs = [1e-6 * (1e7) ** (i / (n - 1)) for i in range(n)]
    out = []
    for lr in lrs:
        t = math.log10(lr)
        base = 2.0 - 1.5 / (1 + math.exp(-(t + 2) * 3))  # sigmoid descent centred at log10 lr = -2
        base += 4 * max(t + 0.5, 0) ** 2  # divergence past ~0.3
        out.append(base + noise * float(torch.randn((), generator=g)))
    return lrs, out


def test_suggestion_rules_on_a_clean_curve():
    lrs, loss = _curve()
    v = suggest.valley(lrs, loss)
    st = suggest.steepest(lrs, loss)
    mn = suggest.minimum(lrs, loss)
    assert 10 ** -2.6 < v < 10 ** -1.4  # the middle of the descent
    assert 10 ** -2.3 < st < 10 ** -1.7  # the sigmoid's steepest point
    lo = min(range(len(loss)), key=loss.__getitem__)
    assert mn == pytest.approx(lrs[lo] / 10)


def test_suggestion_rules_need_a_curve():
    assert suggest.valley([1e-3, 1e-2], [1.0, 0.5]) is None
    flat = [1.0] * 40
    lrs = [10 ** (-5 + i / 10) for i in range(40)]
    assert suggest.valley(lrs, flat) is None  # no descent
    rising = [1.0 + i for i in range(40)]
    assert suggest.valley(lrs, rising) is None
    assert suggest.steepest(lrs, [math.nan] * 40) is None
    assert suggest.minimum(lrs, [math.nan] * 40) is None


def test_valley_is_steadier_than_steepest_under_noise():
    """On noisy curves the valley moves less than the steepest point (spread of log10 suggestions over seeds)."""
    spread = {}
    for name in ("valley", "steepest"):
        xs = []
        for seed in range(12):
            lrs, loss = _curve(noise=0.05, seed=seed)
            sw = LRSweep(lrs[0], lrs[-1], len(lrs), diverge=None)
            for lr, v in zip(lrs, loss):
                sw.record(lr, v)
            xs.append(math.log10(suggest.SUGGEST[name](sw.lrs, sw.smoothed)))
        spread[name] = max(xs) - min(xs)
    assert spread["valley"] < spread["steepest"], spread


# =============================================================================================== batch size
def _bs_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(2048, 64, generator=g), torch.randint(0, 10, (2048,), generator=g))
    return model, opt, ds, lambda b: F.cross_entropy(model(b[0]), b[1])


def test_find_batch_size_budget_is_exact_and_leaves_no_trace():
    model, opt, ds, loss = _bs_setup()
    before = full_state(model, opt)  # a fresh Adam: its lazily created state must be gone again
    res = find_batch_size(model, opt, loss, ds, max_bytes=4 * 2**20)
    assert_same(before, full_state(model, opt))
    assert len(opt.state) == 0
    b = res.batch_size
    by_size = {t.batch_size: t for t in res.trials}
    assert by_size[b].fits and by_size[b].peak_bytes <= 4 * 2**20
    assert not by_size[b + 1].fits and by_size[b + 1].peak_bytes > 4 * 2**20  # bisected to the exact size
    sizes = [t.batch_size for t in res.trials]
    assert sizes[:4] == [2, 4, 8, 16]  # powers of two first
    peaks = [by_size[s].peak_bytes for s in sorted(by_size)]
    assert peaks == sorted(peaks)  # memory grows with the batch


def test_find_batch_size_power_mode_and_limit():
    model, opt, ds, loss = _bs_setup()
    res = find_batch_size(model, opt, loss, ds, max_bytes=4 * 2**20, search="power")
    assert res.batch_size & (res.batch_size - 1) == 0  # a power of two
    res = find_batch_size(model, opt, loss, ds, max_batch_size=100)  # no budget: bounded by the limit
    assert res.batch_size == 100 and [t.batch_size for t in res.trials][-1] == 100


def test_find_batch_size_out_of_memory_inside_the_optimizer_step_is_undone():
    """An OOM after the optimizer already changed parameters and created its state (a half-done step) is caught as
    "does not fit" and undone with everything else."""
    model, opt, ds, loss = _bs_setup()
    before = full_state(model, opt)

    def step(batch):
        opt.zero_grad()
        out = loss(batch)
        out.backward()
        opt.step()  # applied ...
        if len(batch[0]) > 300:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return out

    res = find_batch_size(model, opt, data=ds, train_step=step, max_batch_size=2048)
    assert res.batch_size == 300
    oom = [t for t in res.trials if t.peak_bytes is None]
    assert oom and all("out of memory" in t.reason for t in oom)
    assert_same(before, full_state(model, opt))


def test_find_batch_size_callable_data_and_errors():
    model, opt, ds, loss = _bs_setup()
    before = full_state(model, opt)
    x, y = ds.tensors
    res = find_batch_size(model, opt, loss, lambda b: (x[:b], y[:b]), max_batch_size=64)
    assert res.batch_size == 64
    with pytest.raises(RewindValueError, match="max_bytes"):
        find_batch_size(model, opt, loss, lambda b: (x[:b], y[:b]))  # CPU: no budget and no limit
    with pytest.raises(RewindValueError, match="start"):
        find_batch_size(model, opt, loss, ds, start=4096, max_bytes=2**30)
    with pytest.raises(RewindTypeError):
        find_batch_size(model, opt, loss, 42, max_bytes=2**30)
    with pytest.raises(ValueError, match="more than 1 value"):  # a real error is not "does not fit"
        find_batch_size(model, opt, loss, ds, start=1, max_bytes=2**30)
    assert_same(before, full_state(model, opt))


def test_batch_size_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model, opt, ds, loss = _bs_setup()
    res = find_batch_size(model, opt, loss, ds, max_bytes=2**21)
    res.plot(tmp_path / "bs.png")
    assert (tmp_path / "bs.png").stat().st_size > 1000


# =============================================================================================== branch and pick
def _batches(n: int, seed: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    x, y = _data()
    return [(x[i], y[i]) for i in (torch.randint(0, N, (32,), generator=g) for _ in range(n))]


@pytest.mark.parametrize("with_rewind", [False, True])
def test_branch_and_pick_continues_from_the_winner_bitwise(with_rewind):
    """After a round the state equals, bit for bit, a plain run of the winner's setting from the same start on the
    same batches; the winner has the best score; each trial started from the same state (same first loss)."""
    m = 6
    batches = _batches(3 * m)
    run = Setup("bn")
    rw = Rewind(run.model, run.opt, capacity=m) if with_rewind else None
    bp = BranchAndPick(run.model, run.opt, scaled("lr", 0.3, 1.0, 3.0), loss_fn=run.loss, steps=m, rewind=rw)
    kept = []
    for r in range(3):
        with run.active():
            rnd = bp.step(iter(batches[r * m:(r + 1) * m]))
        assert rnd.best == min(range(3), key=lambda i: rnd.scores[i])
        assert len({ls[0] for ls in rnd.losses}) == 1  # same start state, same batch, same dropout mask
        assert rnd.rerun_exact is True
        kept.append(rnd.settings[rnd.best]["lr"])
    ref = Setup("bn")
    with ref.active():
        for r in range(3):
            ref.opt.param_groups[0]["lr"] = kept[r]
            for b in batches[r * m:(r + 1) * m]:
                ref.opt.zero_grad()
                ref.loss(b).backward()
                ref.opt.step()
    assert_same(ref.state(), run.state())
    assert bp.kept_steps == 3 * m and bp.log.counts()["accepted"] == 3 and bp.log.counts()["rejected"] == 6
    if with_rewind:
        assert rw.step == 3 * m and len(rw) == m  # the winners' steps are the Rewind's history


def test_branch_and_pick_metric_side_effects_are_undone():
    """A metric that runs forward passes in training mode (BatchNorm statistics, dropout RNG) and picks the first
    candidate: the state after the round is the re-run's, untouched by the metric."""
    m = 5
    batches = _batches(m)
    run, ref = Setup("bn"), Setup("bn")
    probe = _batches(1, seed=9)[0]
    scores = iter([0.0, 1.0, 2.0])

    def metric(losses):
        run.loss(probe)  # side effects: BN running stats, dropout draws
        return next(scores)

    bp = BranchAndPick(run.model, run.opt, [{"lr": 0.01}, {"lr": 0.02}, {"lr": 0.04}], loss_fn=run.loss, steps=m,
                       metric=metric)  # fmt: skip
    with run.active():
        rnd = bp.step(batches)
    assert rnd.best == 0 and rnd.rerun_exact
    with ref.active():
        ref.opt.param_groups[0]["lr"] = 0.01
        for b in batches:
            ref.opt.zero_grad()
            ref.loss(b).backward()
            ref.opt.step()
    assert_same(ref.state(), run.state())


def test_branch_and_pick_all_diverge_keeps_the_start(tmp_path):
    run = Setup("plain")
    run.train(3)
    before = run.state()
    bp = BranchAndPick(run.model, run.opt, [{"lr": 1e6, "momentum": 0.0}, {"lr": 1e7}], loss_fn=run.loss, steps=8)
    with run.active():
        rnd = bp.step(_batches(8))
    assert rnd.best is None and bp.log.counts()["exhausted"] == 2
    assert_same(before, run.state())
    pytest.importorskip("matplotlib")
    bp.plot(tmp_path / "b.png")


def test_branch_and_pick_errors():
    run = Setup("plain")
    before = run.state()
    with pytest.raises(RewindValueError, match="valid"):
        BranchAndPick(run.model, run.opt, [{"lr": 0.1}, {"learning_rate": 0.2}], loss_fn=run.loss)
    with pytest.raises(RewindValueError, match="at least 2"):
        BranchAndPick(run.model, run.opt, [{"lr": 0.1}], loss_fn=run.loss)
    with pytest.raises(RewindValueError, match="steps >= 2"):
        BranchAndPick(run.model, run.opt, scaled("lr", 1, 2), loss_fn=run.loss, steps=1)
    with pytest.raises(RewindValueError, match="capacity"):
        BranchAndPick(run.model, run.opt, scaled("lr", 1, 2), loss_fn=run.loss, steps=5,
                      rewind=Rewind(run.model, run.opt, capacity=2))  # fmt: skip
    bp = BranchAndPick(run.model, run.opt, scaled("lr", 1, 2), loss_fn=run.loss, steps=5, log=Trajectory())
    with pytest.raises(RewindValueError, match="needs 5 batches"):
        bp.step(_batches(3))
    assert_same(before, run.state())


def test_state_hold_restores_repeatedly_and_closes():
    s = Setup("shuffle")
    before = s.state()
    with s.active(), StateHold(s.model, s.opt, schedulers=s.scheds, generators=[s.gen]) as hold:
        for _ in range(3):
            s._train(4)
            random.random()
            np.random.rand()
            hold.restore()
            assert_same(before, s._state())
        s._train(2)
        assert hold.nbytes > 0
    assert_same(before, s.state())
    with pytest.raises(RewindError, match="released"):
        hold.restore()


# =============================================================================================== Lightning
def _lightning_setup():
    L = pytest.importorskip("lightning.pytorch")
    x, y = _data()

    class Net(L.LightningModule):
        def __init__(self, lr: float = 1e-3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.2),
                                           torch.nn.ReLU(), torch.nn.Linear(32, N_CLS))  # fmt: skip

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)]

    class DM(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.gen = torch.Generator().manual_seed(3)  # one generator across train_dataloader() calls

        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=self.gen)

    def make(seed: int = 0):
        torch.manual_seed(seed)
        return Net(), DM()

    def fit(model, **data):
        trainer = L.Trainer(max_steps=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(model, **data)
        return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "rng": torch.get_rng_state()}

    return L, make, fit


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("how", ["loader", "datamodule"])
def test_lightning_lr_find_leaves_no_trace(how):
    from torchrewind.integrations.lightning_tuners import lr_find as pl_lr_find

    L, make, fit = _lightning_setup()
    m, dm = make()
    data = {"train_dataloaders": dm.train_dataloader()} if how == "loader" else {"datamodule": dm}
    ref = fit(m, **data)
    m, dm = make()
    data = {"train_dataloaders": dm.train_dataloader()} if how == "loader" else {"datamodule": dm}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = pl_lr_find(m, **data, num_steps=30, lr_max=1.0)
    assert res.extra["steps"] == len(res.lrs) >= 2
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError):
        m.trainer  # detached again, as before
    assert_same(ref, fit(m, **data))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_lr_find_update_attr_then_fit_uses_it():
    from torchrewind.integrations.lightning_tuners import lr_find as pl_lr_find

    L, make, fit = _lightning_setup()
    m, dm = make()
    res = pl_lr_find(m, datamodule=dm, num_steps=40, lr_max=1.0, update_attr=True)
    assert res.suggestion is not None and m.hparams.lr == res.suggestion
    got = fit(m, datamodule=dm)
    m2, dm2 = make()
    m2.hparams.lr = res.suggestion
    assert_same(fit(m2, datamodule=dm2), got)


def test_lightning_lr_find_errors():
    from torchrewind.integrations.lightning_tuners import lr_find as pl_lr_find

    L, make, fit = _lightning_setup()
    m, dm = make()
    with pytest.raises(RewindTypeError, match="exactly one"):
        pl_lr_find(m)
    with pytest.raises(RewindValueError, match="-true"):
        pl_lr_find(m, datamodule=dm, trainer_kwargs={"precision": "bf16-true"})
    with pytest.raises(RewindValueError, match="callbacks"):
        pl_lr_find(m, datamodule=dm, trainer_kwargs={"callbacks": []})
    with pytest.raises(RewindValueError, match="attr_name"):
        pl_lr_find(m, datamodule=dm, update_attr=True, attr_name="step_size")
    with pytest.raises(RewindTypeError, match="LightningModule"):
        pl_lr_find(torch.nn.Linear(2, 2), datamodule=dm)


# =============================================================================================== Hugging Face
def _hf_setup(tmp_path, own_optimizer: bool = False):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments, default_data_collator, get_linear_schedule_with_warmup

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.norm, self.drop, self.l2 = (torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                                      torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))  # fmt: skip

        def forward(self, x, labels=None):
            out = self.l2(self.drop(torch.relu(self.norm(self.l1(x))))).squeeze(-1)
            return {"loss": F.mse_loss(out, labels) if labels is not None else None, "logits": out}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 8, generator=g)
    y = x[:, :4].sum(1)
    ds = [{"x": x[i], "labels": y[i]} for i in range(len(x))]

    def make():
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", max_steps=12, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=2, dataloader_num_workers=0, seed=7, learning_rate=1e-2,
                                 disable_tqdm=True)  # fmt: skip
        model = Net()
        opts = (None, None)
        if own_optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            opts = (opt, get_linear_schedule_with_warmup(opt, 2, 40))
        return Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator, optimizers=opts)

    def train(trainer):
        trainer.train()
        out = {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "rng": torch.get_rng_state()}
        if own_optimizer:
            out["opt"] = full_state(None, trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                    else trainer.optimizer, trainer.lr_scheduler)  # fmt: skip
        return out

    return make, train


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("own_optimizer", [False, True])
def test_hf_lr_find_leaves_no_trace(tmp_path, own_optimizer):
    from torchrewind.integrations.hf_tuners import lr_find as hf_lr_find

    make, train = _hf_setup(tmp_path, own_optimizer)
    ref = train(make())
    trainer = make()
    args_before = trainer.args.to_dict()
    callbacks = list(trainer.callback_handler.callbacks)
    res = hf_lr_find(trainer, num_steps=25, lr_max=1.0)
    assert res.extra["steps"] == len(res.lrs) >= 2
    assert trainer.args.to_dict() == args_before and trainer.callback_handler.callbacks == callbacks
    assert "training_step" not in vars(trainer)
    assert_same(ref, train(trainer))


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_hf_lr_find_update_args_and_errors(tmp_path):
    from torchrewind.integrations.hf_tuners import lr_find as hf_lr_find

    make, train = _hf_setup(tmp_path)
    trainer = make()
    res = hf_lr_find(trainer, num_steps=30, lr_max=1.0, update_args=True)
    assert res.suggestion is not None and trainer.args.learning_rate == res.suggestion
    with pytest.raises(RewindTypeError, match="Trainer"):
        hf_lr_find(object())
    with pytest.raises(RewindValueError, match="lr_max"):
        hf_lr_find(trainer, lr_min=1.0, lr_max=0.1)


def test_branch_and_pick_holds_the_state_of_each_round():
    """Training between rounds (or before the first) moves the state on: each round starts from the state of then."""
    run, ref = Setup("plain"), Setup("plain")
    bp = BranchAndPick(run.model, run.opt, [{"lr": 0.02}, {"lr": 0.01}], loss_fn=run.loss, steps=4,
                       metric=lambda losses: -losses[-1])  # fmt: skip
    b1, b2 = _batches(4, seed=1), _batches(4, seed=2)
    for s in (run, ref):
        s.train(3)  # after construction, before the first round
    with run.active():
        r1 = bp.step(b1)
    run.train(2)
    with run.active():
        r2 = bp.step(b2)
    with ref.active():
        for b_, r in ((b1, r1), (b2, r2)):
            ref.opt.param_groups[0]["lr"] = r.settings[r.best]["lr"]
            for b in b_:
                ref.opt.zero_grad()
                ref.loss(b).backward()
                ref.opt.step()
            if b_ is b1:
                ref._train(2)
    assert_same(ref.state(), run.state())
    bp.close()
    with pytest.raises(RewindError, match="close"):
        bp.step(b1)


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("hf_tuners", ["transformers"], "hf"),
        ("lightning_tuners", ["lightning", "lightning.pytorch", "pytorch_lightning"], "lightning"),
    ],
)
def test_tuner_entry_points_import_their_framework_only_when_imported(module, blocked, extra):
    import subprocess
    import sys

    code = (
        "import sys; import torchrewind, torchrewind.tuners\n"
        f"assert not {{'matplotlib', {blocked[0]!r}}} & set(sys.modules), 'imported at import torchrewind'\n"
        + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
        + f"try:\n    import torchrewind.integrations.{module}\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pip install torchrewind[{extra}]" in out.stdout


def test_state_hold_on_users_rewind_restores_a_forward_without_a_step():
    """With rewind=, a tuner that fails before its first optimizer step (after a forward pass changed BatchNorm
    statistics and drew dropout masks) is still undone."""
    s = Setup("bn")
    rw = Rewind(s.model, s.opt, capacity=4)
    s.train(2)
    before = s.state()
    with s.active():
        with StateHold(s.model, s.opt, schedulers=s.scheds, rewind=rw, steps=4) as hold:
            s.loss(_batches(1)[0])  # forward only
            hold.restore()
            assert_same(before, s._state())
            s._train(3)
    assert_same(before, s.state())
    assert rw.step == 2
