"""overlap=True: the background copy of the next undo point gives bitwise the same history as the blocking one.

The worker's copy is made slow (copy, then sleep) so forward and backward really run while it is in flight, and
BatchNorm's running statistics change after their bytes were copied: the snapshot must still hold the values
from just before the step."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from statecheck import assert_same, full_state

from torchrewind import Rewind, RewindError
from torchrewind.core import overlap as overlap_mod


@pytest.fixture(autouse=True)
def slow_copy(monkeypatch):
    real = overlap_mod._copy_all

    def copy_then_wait(pairs):
        real(pairs)
        time.sleep(0.003)  # forward runs meanwhile and changes BatchNorm buffers after they were copied

    monkeypatch.setattr(overlap_mod, "_copy_all", copy_then_wait)


def build(overlap: bool, redo: bool = True, capacity: int = 3, opt: str = "adam"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )
    o = torch.optim.Adam(model.parameters(), lr=1e-2) if opt == "adam" else torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9
    )
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    rw = Rewind(model, o, schedulers=[sched], capacity=capacity, redo=redo, overlap=overlap, grads=True)
    return model, o, sched, rw


def iteration(model, o, sched, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    o.zero_grad()
    F.mse_loss(model(x), y).backward()
    o.step()
    sched.step()


SEQUENCES = {
    "steps-undo-redo": ["s", "s", "s", "u1", "r1", "u2", "s", "s", "u1"],
    "undo-right-after-step": ["s", "u1", "s", "s", "u2", "r2", "s"],
    "retry": ["s", "s", "retry", "s", "retry", "u1"],
    "trial": ["s", "trial-rollback", "s", "trial-keep", "u1", "s"],
    "snapshot-mid-iteration": ["s", "snap", "s", "u1", "s", "s", "u2"],
    "deep": ["s"] * 6 + ["u3", "r1", "s", "u2"],
}


def apply(op: str, model, o, sched, rw, k: int) -> None:
    if op == "s":
        iteration(model, o, sched, k)
    elif op[0] == "u":
        rw.undo(int(op[1:]))
    elif op[0] == "r" and op != "retry":
        rw.redo(int(op[1:]))
    elif op == "retry":
        rw.retry(lr=lambda lr: lr * 0.5)
    elif op == "snap":
        rw.snapshot()
    elif op.startswith("trial"):
        with rw.trial() as t:
            iteration(model, o, sched, 1000 + k)
            iteration(model, o, sched, 2000 + k)
            if op == "trial-rollback":
                t.rollback()


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("redo", [True, False], ids=["redo", "noredo"])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_overlap_matches_blocking(name, redo, opt):
    runs = [build(overlap=ov, redo=redo, opt=opt) for ov in (False, True)]
    rng = [torch.get_rng_state()] * 2  # each run draws its dropout masks from its own copy of the global RNG
    for k, op in enumerate(SEQUENCES[name]):
        states, errors = [], []
        for i, (model, o, sched, rw) in enumerate(runs):
            torch.set_rng_state(rng[i])
            try:
                apply(op, model, o, sched, rw, k)
                errors.append(None)
            except RewindError as e:  # e.g. redo with redo=False: both must refuse alike
                errors.append(str(e))
            rng[i] = torch.get_rng_state()
            states.append(full_state(model, o, sched))
        assert errors[0] == errors[1], op
        assert len(runs[0][3]) == len(runs[1][3]) and runs[0][3].redo_depth == runs[1][3].redo_depth, op
        assert_same(states[0], states[1])


def test_undo_restores_buffers_from_just_before_the_step():
    model, o, sched, rw = build(overlap=True)
    iteration(model, o, sched, 0)  # the post-step hook starts the background copy now
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    o.zero_grad()
    F.mse_loss(model(x), y).backward()  # forward changes running_mean/var and num_batches_tracked
    before = full_state(model, o, sched)
    o.step()
    rw.undo()
    assert_same(full_state(model, o, sched), before)


def test_memory_and_budget_count_the_staging_buffer():
    runs = {ov: build(overlap=ov, capacity=2) for ov in (False, True)}
    for model, o, sched, rw in runs.values():
        for k in range(5):  # every slot in use
            iteration(model, o, sched, k)
    # capacity 2 + 1 for redo = 3 equal slots, + 1 staging slot with overlap
    assert runs[True][3].nbytes * 3 == runs[False][3].nbytes * 4
    m2 = torch.nn.Linear(100, 100)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    state = sum(p.numel() * 4 for p in m2.parameters())
    # capacity 1 with redo: 2 ring slots + 1 staging = 3 copies; room for 2.5 is refused with a clear message
    with pytest.raises(RewindError, match="3 snapshots"):
        Rewind(m2, o2, capacity=1, overlap=True, max_bytes=int(state * 2.5))


def test_close_stops_the_worker():
    model, o, sched, rw = build(overlap=True)
    iteration(model, o, sched, 0)
    worker = rw._overlap._copy._pool
    assert worker is not None
    threads = set(worker._threads)
    rw.close()
    assert rw._overlap._copy._pool is None and not any(t.is_alive() for t in threads)
    iteration(model, o, sched, 1)  # no hooks any more: nothing recorded, nothing started
    assert not rw._overlap.busy
