"""Exactness of everything around the optimizer: schedulers, GradScaler, RNG, buffers, identity, grads, layout
changes (param groups added, tensors replaced), unusual tensors (views, tied, channels_last, many dtypes)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from statecheck import assert_same, full_state

from torchrewind import Rewind, RewindError
from torchrewind.core.values import tensors_bitwise_equal

lrs = torch.optim.lr_scheduler


class Net(torch.nn.Module):
    """Small model whose forward changes buffers (BatchNorm) and draws random numbers (Dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)) for _ in range(n)]


def backward(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    opt.zero_grad()
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[1, 3, 4], gamma=0.3),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=4),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.2, total_steps=20),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 1 / (e + 1)),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.2, total_iters=3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=5, power=2.0),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=2), lrs.ExponentialLR(o, gamma=0.8)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def _sched_step(s, loss):
    if isinstance(s, lrs.ReduceLROnPlateau):
        s.step(loss.item() * 0 + 1.0)  # constant metric: plateau -> LR reductions at every patience window
    else:
        s.step()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_undo_is_exact(name):
    def run(undo_at):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = SCHEDULERS[name](opt)
        rw = Rewind(model, opt, schedulers=[sched], capacity=3) if undo_at else None
        for i, b in enumerate(batches(6)):
            loss = backward(model, opt, b)
            opt.step()
            _sched_step(sched, loss)
            if i in undo_at:
                n = undo_at[i]
                rw.undo(n)  # back before the step n steps ago: re-apply the undone steps' updates
                rw.redo(n - 1) if n > 1 else None
                opt.step()
                _sched_step(sched, loss)
        return full_state(model, opt, sched)

    assert_same(run({}), run({1: 1, 3: 2, 5: 1}))


def test_scheduler_state_comes_back_before_its_step():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = lrs.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    rw = Rewind(model, opt, schedulers=sched)  # a single object is accepted too
    b = batches(2)
    backward(model, opt, b[0])
    opt.step()
    sched.step()
    backward(model, opt, b[1])
    before = full_state(model, opt, sched)
    opt.step()
    sched.step()
    rw.undo()
    after = full_state(model, opt, sched)
    after["rng"] = before["rng"]
    assert_same(before, after)
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


# ---------------------------------------------------------------------------------------------- GradScaler
def test_gradscaler_with_skipped_steps_is_exact():
    """Pattern with an explicit boundary at the top of the iteration: the whole iteration (scale, backward,
    scaler.step -- possibly skipped for inf grads --, update) is undone and redone."""

    def run(undo_iters):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        rw = Rewind(model, opt, scaler=scaler, capacity=2, auto=False) if undo_iters else None
        for i, (x, y) in enumerate(batches(8)):
            for attempt in range(2 if i in undo_iters else 1):
                with rw.trial() if rw else contextlib.nullcontext() as t:
                    opt.zero_grad()
                    loss = ((model(x) - y) ** 2).mean()
                    if i in (2, 5):
                        loss = loss * float("inf")  # overflow: scaler skips the step and halves the scale
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    if attempt == 0 and i in undo_iters:
                        t.rollback()
        st = full_state(model, opt)
        st["scaler"] = (scaler._scale.clone(), scaler._growth_tracker.clone(), scaler.state_dict())
        return st

    ref = run(set())
    got = run({1, 2, 4, 5})
    assert_same(ref, got)


def test_gradscaler_state_restored_by_undo():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    rw = Rewind(model, opt, scaler=scaler, capacity=4)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 32.0
    rw.undo(3)
    assert scaler.get_scale() == 4.0  # before the first step's update the scale had not grown
    rw.redo(3)
    assert scaler.get_scale() == 32.0


# ---------------------------------------------------------------------------------------------- RNG
def test_dropout_repeats_after_undo_with_explicit_boundary():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rw = Rewind(model, opt, auto=False)
    x, y = batches(1)[0]
    with rw.trial() as t:
        out1 = model(x)  # draws a dropout mask and updates BatchNorm statistics
        t.rollback()
    stats = model.bn.running_mean.clone()
    out2 = model(x)
    assert torch.equal(out1, out2)
    assert not torch.equal(stats, model.bn.running_mean)


def test_rng_all_restores_python_and_numpy():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    rw = Rewind(model, opt, rng="all", generators=[gen])
    backward(model, opt, batches(1)[0])
    random.seed(3)
    np.random.seed(3)
    before = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    random.seed(3)
    np.random.seed(3)
    gen.manual_seed(5)
    torch.manual_seed(7)
    opt.step()  # records here
    draws = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    rw.undo()
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    assert before[0] == draws[0]


def test_rng_false_leaves_generators_alone():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = Rewind(model, opt, rng=False)
    backward(model, opt, batches(1)[0])
    opt.step()
    state = torch.get_rng_state()
    rw.undo()
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------- identity
def test_identity_hooks_and_pointers_survive():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    calls = []
    model.fc1.weight.register_hook(lambda g: calls.append(1))
    params = list(model.parameters())
    buffers = list(model.buffers())
    rw = Rewind(model, opt, capacity=2)
    b = batches(3)
    backward(model, opt, b[0])
    opt.step()
    backward(model, opt, b[1])
    opt.step()
    state_objs = {id(p): dict(opt.state[p]) for p in params}
    ptrs = [p.data_ptr() for p in params]
    rw.undo()
    rw.redo()
    rw.undo()
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(a is b for a, b in zip(buffers, model.buffers()))
    assert [p.data_ptr() for p in params] == ptrs
    for p in params:
        for k, v in opt.state[p].items():
            assert v is state_objs[id(p)][k]
    n = len(calls)
    backward(model, opt, b[2])
    assert len(calls) == n + 1  # the tensor hook registered before re-homing still fires


def test_rehoming_keeps_grad_accumulator_hooks():
    """DDP registers its all-reduce on each parameter's AccumulateGrad node; re-homing (at construction and when the
    arena grows for the optimizer state) must keep that node, or gradients silently stop being all-reduced."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    params = list(model.parameters())
    nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]  # what DDP's reducer hooks into
    fired: list[int] = []
    for i, n in enumerate(nodes):
        n.register_hook(lambda *_, i=i: fired.append(i))
    post: list[int] = []
    params[0].register_post_accumulate_grad_hook(lambda p: post.append(1))
    rw = Rewind(model, opt, capacity=2)
    for b in batches(3):
        backward(model, opt, b)
        opt.step()  # the first step creates Adam's state: the arena grows and tensors are re-homed again
    rw.undo()
    fired.clear()
    backward(model, opt, batches(1)[0])
    assert sorted(fired) == list(range(len(params)))
    assert len(post) == 4
    assert [p.view_as(p).grad_fn.next_functions[0][0] for p in params] == nodes


def test_lazy_state_undone_and_recreated_in_place():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rw = Rewind(model, opt, capacity=2)
    b = batches(2)
    backward(model, opt, b[0])
    opt.step()
    first = {id(p): dict(opt.state[p]) for p in model.parameters()}
    rw.undo()
    assert len(opt.state) == 0
    rw.redo()
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert v is first[id(p)][k]  # redo brings back the same tensor objects
    rw.undo()
    opt.step()  # re-creates state lazily; it is bound to the same arena positions (no growth)
    used = {d: a.used for d, a in rw._tracker.arenas.items()}
    backward(model, opt, b[1])
    opt.step()
    assert {d: a.used for d, a in rw._tracker.arenas.items()} == used


# ---------------------------------------------------------------------------------------------- grads
def test_grads_option_restores_gradients_after_zero_grad():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = Rewind(model, opt, grads=True)
    backward(model, opt, batches(1)[0])
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    rw.retry(lr=0.01)  # works although zero_grad() ran: grads came back with undo
    rw.undo()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_grads_none_restored_as_none():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(list(model.parameters()) + list(frozen.parameters()), lr=0.1)
    rw = Rewind(model, opt, grads=True)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    frozen(torch.randn(2, 3)).sum().backward()
    rw.undo()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- layout changes
def test_param_group_added_after_construction():
    def run(use_rw):
        torch.manual_seed(0)
        model = Net()
        head = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        rw = Rewind(model, opt, capacity=4) if use_rw else None
        for i, (x, y) in enumerate(batches(5)):
            if i == 2:
                opt.add_param_group({"params": head.parameters(), "lr": 0.1})
            opt.zero_grad()
            ((head(model(x)) - y[:, :2]) ** 2).mean().backward()
            if use_rw and i == 3:
                opt.step()
                rw.undo(2)  # back to before step 2: the new group (added before step 2) is there
                assert len(opt.param_groups) == 2
                rw.undo(1)  # before step 1: the group did not exist yet
                assert len(opt.param_groups) == 1
                rw.redo(3)
                assert len(opt.param_groups) == 2
                rw.undo()
            opt.step()
        return full_state(None, opt)

    assert_same(run(False), run(True))


def test_param_data_replaced_same_shape_is_rebound():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rw = Rewind(model, opt)
    new = torch.randn_like(model.fc1.weight)
    model.fc1.weight.data = new.clone()  # user replaces the storage: detected and re-homed at the next record
    backward(model, opt, batches(1)[0])
    opt.step()
    rw.undo()
    assert torch.equal(model.fc1.weight, new)


def test_optimizer_load_state_dict_between_steps():
    def run(use_rw):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        rw = Rewind(model, opt, capacity=2) if use_rw else None
        b = batches(4)
        backward(model, opt, b[0])
        opt.step()
        sd = opt.state_dict()
        opt.load_state_dict(sd)  # replaces every state tensor and optimizer.state itself
        for i in (1, 2, 3):
            backward(model, opt, b[i])
            opt.step()
            if use_rw and i == 2:
                rw.undo()
                opt.step()
        return full_state(model, opt)

    assert_same(run(False), run(True))


def test_buffer_replaced_by_module_code():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("total", torch.zeros(2))

        def forward(self, x):
            self.total = self.total + x.detach().sum(0)  # replaces the buffer tensor (not in place)
            return self.lin(x)

    torch.manual_seed(0)
    m = Counter()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rw = Rewind(m, opt, capacity=3)
    for _ in range(3):
        opt.zero_grad()
        m(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert torch.equal(m.total, torch.full((2,), 3.0))
    rw.undo(2)
    assert torch.equal(m.total, torch.full((2,), 2.0))  # recorded before step 2, after 2 forwards


# ---------------------------------------------------------------------------------------------- unusual tensors
class Unusual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: one Parameter in two modules
        base = torch.randn(4, 8)
        self.view_param = torch.nn.Parameter(base[:, :4])  # a non-contiguous view: cannot be re-homed ...
        self.base = base  # ... while its base is in use too (a plain attribute: not tracked)
        self.conv = torch.nn.Conv2d(1, 2, 3).to(memory_format=torch.channels_last)
        self.register_buffer("f16", torch.randn(5).half())
        self.register_buffer("bf16", torch.randn(5).bfloat16())
        self.register_buffer("f64", torch.randn(5).double())
        self.register_buffer("i64", torch.arange(5))
        self.register_buffer("flag", torch.tensor([True, False]))
        self.register_buffer("nothing", None)

    def forward(self, i):
        h = self.emb(i) @ self.view_param
        c = self.conv(h[None, None]).sum()
        self.i64.add_(1)
        self.f16.mul_(1.5)
        return self.out(h).sum() + c


def test_tied_views_channels_last_and_dtypes():
    def run(use_rw):
        torch.manual_seed(0)
        m = Unusual()
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        rw = Rewind(m, opt, capacity=2) if use_rw else None
        idx = torch.tensor([1, 2, 3, 4])
        for i in range(4):
            opt.zero_grad()
            m(idx).backward()
            opt.step()
            if use_rw and i in (0, 2):
                rw.undo()
                opt.step()
        return full_state(m, opt)

    assert_same(run(False), run(True))
    m = Unusual()
    rw = Rewind(m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert [k for k, _ in rw._tracker.pinned_params] != []  # the view is copied in place, not moved
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert m.out.weight is m.emb.weight


def test_special_float_bits_round_trip():
    m = torch.nn.Module()
    weird = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), -float("inf")], dtype=torch.float32)
    weird = torch.cat([weird, torch.tensor([0x7FC00001, 0x7FA00000], dtype=torch.int32).view(torch.float32)])
    m.register_buffer("w", weird.clone())
    m.p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rw = Rewind(m, opt)
    m.p.grad = torch.ones(1)
    opt.step()
    m.w.fill_(1.0)
    rw.undo()
    assert tensors_bitwise_equal(m.w, weird)


# ---------------------------------------------------------------------------------------------- misc API
def test_iterable_of_modules_and_params_outside_model():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)
    loose = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.RMSprop([*a.parameters(), *b.parameters(), loose], lr=0.01)
    rw = Rewind([a, b], opt)
    before = {k: v.clone() for k, v in {**a.state_dict(), **b.state_dict(), "loose": loose}.items()}
    opt.zero_grad()
    (b(a(torch.randn(4, 3))) * loose).sum().backward()
    before.update({k: v.clone() for k, v in b.state_dict().items()})  # BN forward ran before the step
    opt.step()
    rw.undo()
    after = {**a.state_dict(), **b.state_dict(), "loose": loose}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_close_stops_recording():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    rw = Rewind(m, opt, capacity=3)
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    rw.close()
    opt.step()
    assert len(rw) == 1


def test_no_reallocation_in_steady_state_and_nbytes():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rw = Rewind(model, opt, capacity=3)
    b = batches(12)
    for i in range(6):  # every slot is written once after the optimizer state exists
        backward(model, opt, b[i])
        opt.step()
    ptrs = [w.data_ptr() for s in rw._ring.slots for w in s.words.values()]
    arena = [a.data_ptr for a in rw._tracker.arenas.values()]
    for i in range(6, 12):
        backward(model, opt, b[i])
        opt.step()
    assert [w.data_ptr() for s in rw._ring.slots for w in s.words.values()] == ptrs
    assert [a.data_ptr for a in rw._tracker.arenas.values()] == arena
    per = rw.state_nbytes
    small = rw.nbytes - 4 * per  # capacity + 1 (redo) slots, each one arena copy, plus by-value state (RNG, lrs)
    assert 4 * torch.get_rng_state().numel() <= small < 4 * (torch.get_rng_state().numel() + 2048)
    assert "Rewind(" in repr(rw)


def test_tensor_with_outside_view_is_not_moved():
    """A parameter someone holds a view of must keep sharing memory with that view (it is copied in place)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    alias = m.weight.detach().view(-1)  # shares storage with the parameter
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    rw = Rewind(m, opt)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert torch.equal(alias, m.weight.detach().view(-1))  # still the same memory after the step
    before = alias.clone()
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    rw.undo()
    assert torch.equal(alias, before)
    assert alias.data_ptr() == m.weight.data_ptr()


def _arena_tracked(rw: Rewind) -> bool:
    """Every parameter, buffer and optimizer-state tensor lives in the Rewind's arenas (none copied one by one)."""
    tr = rw._tracker
    return not tr.pinned_params and not tr.structure.pinned_items and bool(tr.arenas)


@pytest.mark.parametrize("old", ["dropped", "alive", "viewed"])
def test_a_new_rewind_on_a_closed_ones_tensors(old):
    """After rw.close(), a second Rewind on the same model and optimizer: it adopts the tensors into its own arenas
    when the first one is gone (a closed, dropped Rewind frees at once: no reference cycle), and copies them one by
    one, in place, while something else still uses that memory (the first Rewind, or a view). Exact either way."""
    import weakref

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    b = batches(6)
    first = Rewind(model, opt, capacity=2)
    for batch in b[:2]:
        backward(model, opt, batch)
        opt.step()
    first.close()
    view = None
    if old == "viewed":
        view = model.fc1.weight.view(-1)  # an alias into the first Rewind's arena
    if old != "alive":
        gone = weakref.ref(first)
        del first
        assert gone() is None  # freed by reference counting, with its arenas: no gc.collect() needed
    second = Rewind(model, opt, capacity=2)
    backward(model, opt, b[2])
    opt.step()
    for batch in b[3:5]:
        backward(model, opt, batch)
        before = full_state(model, opt)  # the undo point: recorded by the pre-step hook
        opt.step()
        after = full_state(model, opt)
        second.undo()
        assert_same(before, full_state(model, opt))
        second.redo()
        assert_same(after, full_state(model, opt))
    assert _arena_tracked(second) == (old == "dropped")
    if view is not None:
        assert view.data_ptr() == model.fc1.weight.data_ptr()  # the alias was kept
        assert torch.equal(view, model.fc1.weight.detach().view(-1))


def test_sandbox_leaves_no_trace():
    """Steps, lr edits, forward passes (BatchNorm), RNG draws and zero_grad inside rw.sandbox(): on exit the state,
    the gradients, the step counter and the history are as at entry, and training continues bit for bit as a twin
    that never entered the sandbox."""

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.2),
                                    torch.nn.Linear(16, 3))  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
        return model, opt, sched, Rewind(model, opt, schedulers=[sched], capacity=2)

    def it(model, opt, sched, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()

    def run(sandbox: bool):
        model, opt, sched, rw = build()  # seeds the global RNG (dropout draws from it)
        for s in range(3):
            it(model, opt, sched, s)
        out = {}
        if sandbox:
            before = full_state(model, opt, sched)
            grads = [p.grad.clone() for p in model.parameters()]
            depth = (len(rw), rw.redo_depth, rw.step, rw.held_steps())
            with rw.sandbox() as box:
                ends = []
                for branch in range(2):  # two branches from the same start end alike
                    for g in opt.param_groups:
                        g["lr"] = 1.0
                    for s in range(5):
                        it(model, opt, sched, 100 + s)
                    ends.append(full_state(model, opt, sched))
                    box.restore()
                    assert_same(before, full_state(model, opt, sched))
                    assert rw.step == 3
                assert_same(ends[0], ends[1])
                it(model, opt, sched, 7)
                torch.rand(3)
                with pytest.raises(RewindError, match="inside rw.sandbox"):
                    rw.undo()
                rw.ensure_recorded()  # a no-op inside
                opt.zero_grad()
            assert_same(before, full_state(model, opt, sched))
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
            assert (len(rw), rw.redo_depth, rw.step, rw.held_steps()) == depth
        for s in range(3, 6):
            it(model, opt, sched, s)
        out["end"] = full_state(model, opt, sched)
        rw.undo(2)
        out["undone"] = full_state(model, opt, sched)
        return out

    plain, boxed = run(False), run(True)
    assert_same(plain["end"], boxed["end"])
    assert_same(plain["undone"], boxed["undone"])


def test_sandbox_restores_after_an_exception():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = Rewind(model, opt)
    for batch in batches(2):
        backward(model, opt, batch)
        opt.step()
    before = full_state(model, opt)
    with pytest.raises(ValueError, match="boom"):
        with rw.sandbox():
            backward(model, opt, batches(1, seed=9)[0])
            opt.step()
            raise ValueError("boom")
    assert_same(before, full_state(model, opt))
    assert rw.step == 2 and not rw.in_step
