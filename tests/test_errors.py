"""Bad input: a clear RewindError that says what to do, and the training state left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from statecheck import assert_same, full_state

from torchrewind import Rewind, RewindError


def setup(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    rw = Rewind(model, opt, schedulers=[sched], **kw)
    return model, opt, sched, rw


def step(model, opt, sched=None):
    opt.zero_grad()
    model(torch.randn(6, 4)).pow(2).mean().backward()
    opt.step()
    if sched is not None:
        sched.step()


def test_undo_past_history_says_how_many():
    model, opt, sched, rw = setup(capacity=2)
    with pytest.raises(RewindError, match="only 0 available"):
        rw.undo()
    for _ in range(3):
        step(model, opt, sched)
    before = full_state(model, opt, sched)
    with pytest.raises(RewindError, match=r"cannot undo 3 step\(s\): only 2 available \(capacity=2\)"):
        rw.undo(3)
    assert_same(before, full_state(model, opt, sched))
    rw.undo(2)  # still possible after the refused request


@pytest.mark.parametrize(
    "n, exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_bad_n(n, exc):
    model, opt, sched, rw = setup()
    step(model, opt)
    with pytest.raises(RewindError, match="must be an int") as info:
        rw.undo(n)
    assert isinstance(info.value, exc)  # Python's conventions, and still a RewindError
    with pytest.raises(exc, match="must be an int"):
        rw.redo(n)


def test_redo_with_nothing_to_redo():
    model, opt, sched, rw = setup(capacity=2)
    step(model, opt)
    with pytest.raises(RewindError, match="redo is only possible right after undo"):
        rw.redo()
    rw.undo()
    step(model, opt)  # a new step clears the redo stack
    before = full_state(model, opt)
    with pytest.raises(RewindError, match="cannot redo"):
        rw.redo()
    assert_same(before, full_state(model, opt))


def test_redo_disabled_still_undoes():
    model, opt, sched, rw = setup(capacity=2, redo=False)
    step(model, opt)
    rw.undo()
    with pytest.raises(RewindError, match="cannot redo"):
        rw.redo()


@pytest.mark.parametrize("change", ["double", "resize", "bf16"])
def test_parameter_changed_since_construction(change):
    model, opt, sched, rw = setup()
    step(model, opt)
    w = model[0].weight
    if change == "double":
        model.double()
        what = "float64"
    elif change == "resize":
        w.data = torch.zeros(3, 3)
        what = r"\[3, 3\]"
    else:
        w.data = w.data.to(torch.bfloat16)
        what = "bfloat16"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RewindError, match=f"parameter '0.weight' changed .* to .*{what}.*build the Rewind"):
        rw.undo()
    with pytest.raises(RewindError, match="changed"):
        opt.step()  # the pre-step hook refuses too, before the optimizer touches anything
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_constructor_validation():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(RewindError, match="torch.optim.Optimizer"):
        Rewind(m, "sgd")
    with pytest.raises(RewindError, match="capacity must be an int >= 1"):
        Rewind(m, opt, capacity=0)
    with pytest.raises(RewindError, match="rng must be"):
        Rewind(m, opt, rng="numpy")
    with pytest.raises(RewindError, match="nn.Module"):
        Rewind(42, opt)
    with pytest.raises(RewindError, match="iterable containing int"):
        Rewind([m, 3], opt)
    with pytest.raises(RewindError, match="no state_dict"):
        Rewind(m, opt, schedulers=[object()])
    with pytest.raises(RewindError, match="different optimizer"):
        Rewind(m, opt, schedulers=[torch.optim.lr_scheduler.StepLR(other, 1)])
    with pytest.raises(RewindError, match="pass it as scaler="):
        Rewind(m, opt, schedulers=[torch.amp.GradScaler("cpu")])
    with pytest.raises(RewindError, match="scaler must be a torch.amp.GradScaler"):
        Rewind(m, opt, scaler=torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(RewindError, match="max_bytes"):
        Rewind(m, opt, max_bytes=-1)
    with pytest.raises(RewindError, match="torch.Generator"):
        Rewind(m, opt, generators=[3])
    # nothing above attached a hook: the optimizer still steps without recording anything
    assert not opt._optimizer_step_pre_hooks


def test_max_bytes_up_front_and_on_growth():
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100)  # 40,400 bytes of fp32 + alignment
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(RewindError, match=r"history would need .* over max_bytes=10,000\. Lower capacity"):
        Rewind(model, opt, capacity=4, max_bytes=10_000)
    assert not opt._optimizer_step_pre_hooks
    # Enough for the parameters but not for Adam's moments, which appear at the first step: refused at the
    # next record, before the second step changes anything.
    rw = Rewind(model, opt, capacity=1, redo=False, max_bytes=50_000)
    model(torch.randn(3, 100)).sum().backward()
    opt.step()
    before = full_state(model, opt)
    with pytest.raises(RewindError, match="max_bytes=50,000"):
        opt.step()
    after = full_state(model, opt)
    after["rng"] = before["rng"]
    assert_same(before, after)
    del rw


class Flaky:
    """A stateful object whose load_state_dict fails on demand."""

    def __init__(self):
        self.value = 0
        self.fail = False

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        if self.fail:
            raise RuntimeError("boom")
        self.value = sd["value"]


def test_exception_during_restore_leaves_state_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    flaky = Flaky()
    rw = Rewind(model, opt, schedulers=[sched, flaky], capacity=3)
    for i in range(3):
        step(model, opt, sched)
        flaky.value = i + 1
    before = full_state(model, opt, sched, flaky)
    depth = len(rw)
    flaky.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        rw.undo()
    assert_same(before, full_state(model, opt, sched, flaky))  # the scheduler restored first is rolled back
    assert len(rw) == depth - 1 or len(rw) == depth  # the failed undo evicted at most the oldest point
    flaky.fail = False
    rw.undo()
    assert flaky.value == 2


def test_retry_validation():
    model, opt, sched, rw = setup()
    step(model, opt)
    before = full_state(model, opt, sched)
    with pytest.raises(RewindError, match=r"retry\(learning_rate=...\): not a hyperparameter.*'lr'"):
        rw.retry(learning_rate=0.1)
    opt.zero_grad()
    with pytest.raises(RewindError, match="needs gradients.*grads=True"):
        rw.retry(lr=0.1)
    assert_same(before, full_state(model, opt, sched))


def test_trial_rollback_outside_block_and_evicted_start():
    model, opt, sched, rw = setup(capacity=1)
    t = rw.trial()
    with pytest.raises(RewindError, match="outside of the with-block"):
        t.rollback()
    with pytest.raises(RewindError, match="increase capacity"):
        with rw.trial() as t:
            for _ in range(3):
                step(model, opt)
            t.rollback()


def test_bad_optimizer_state_layout():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.state[m.weight] = [1, 2, 3]
    with pytest.raises(RewindError, match="not a dict"):
        Rewind(m, opt)
