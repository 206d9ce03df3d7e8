"""What users do around a Rewind every day: save, pickle, deepcopy, send a model to another process, compile, call
from inside a step, and bound the history's memory. Each test here failed before the fix it guards."""

from __future__ import annotations

import copy
import io
import multiprocessing as mp
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from statecheck import assert_same, full_state

from torchrewind import HostArchive, Rewind, RewindError, Tiers
from torchrewind.core.values import values_equal


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def clones(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def same_dict(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(values_equal(a[k].detach(), b[k].detach()) for k in a)


# ---------------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("when", ["live", "closed", "dropped"])
def test_torch_save_of_a_model_with_mixed_dtypes(when):
    """BatchNorm's int64 num_batches_tracked lives next to float32 weights in one arena: torch.save must still write
    the state_dict (it raised "Cannot save multiple tensors ... as different types"), and load it back exactly."""
    model = bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rw = Rewind(model, opt, capacity=2)
    train(model, opt, 3)
    if when != "live":
        rw.close()
    if when == "dropped":
        del rw
    sd = model.state_dict()
    data = saved({"model": sd, "opt": opt.state_dict()})
    back = torch.load(io.BytesIO(data), weights_only=True)
    assert same_dict(back["model"], sd)
    fresh = bn_model()
    fresh.load_state_dict(back["model"])
    assert same_dict(fresh.state_dict(), sd)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=0.01)
    opt2.load_state_dict(back["opt"])
    train(fresh, opt2, 2, seed=5)
    train(model, opt, 2, seed=5)
    assert same_dict(fresh.state_dict(), model.state_dict())  # the saved checkpoint resumes bit for bit


def test_saved_sizes_match_a_model_without_rewind():
    """pickle.dumps(model) wrote the whole arena once per tensor (83 MB for a 0.87 MB MLP); a part's state_dict wrote
    the whole arena chunk. Each tensor now has a storage of its own: sizes as without a Rewind."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(30)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_mlp = lambda: (opt.zero_grad(), model(torch.randn(4, 32)).sum().backward(), opt.step())  # noqa: E731
    train_mlp()  # optimizer state exists
    def sizes() -> dict[str, int]:
        return {
            "pickle": len(pickle.dumps(model)),
            "state_dict": len(saved(model.state_dict())),
            "part": len(saved(model[3].state_dict())),
            "one tensor": len(saved(model[5].weight)),
            "optimizer": len(saved(opt.state_dict())),
        }

    plain = sizes()
    rw = Rewind(model, opt, capacity=2)
    train_mlp()
    assert rw.state_nbytes > 0
    ours = sizes()
    for k in plain:
        limit = 1.05 if k == "state_dict" else 1.2
        assert ours[k] <= limit * plain[k], (k, ours[k], plain[k])


def test_pickle_and_deepcopy_give_independent_exact_copies():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = Rewind(model, opt, capacity=2)
    train(model, opt, 3)
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert same_dict(twin.state_dict(), model.state_dict())
        with torch.no_grad():
            next(twin.parameters()).add_(1.0)  # its own memory: the original and the history are untouched
        assert not same_dict(twin.state_dict(), model.state_dict())
    rw.snapshot()  # the undo point before forward: BatchNorm's statistics are undone too
    before = full_state(model, opt)
    train(model, opt, 1, seed=3)
    rw.undo()
    assert_same(before, full_state(model, opt))


def _child(conn, model):
    conn.send(saved(model.state_dict()))  # bytes back: tensors would travel as shared memory the child must keep
    conn.close()


@pytest.mark.slow
def test_a_second_process_gets_the_model():
    """multiprocessing with the spawn start method pickles the model into a new interpreter."""
    model = bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    Rewind(model, opt)
    train(model, opt, 2)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, model))
    p.start()
    got = torch.load(io.BytesIO(parent.recv()), weights_only=True)
    p.join(timeout=120)
    assert p.exitcode == 0
    assert same_dict(got, model.state_dict())


def test_load_state_dict_into_a_rehomed_model_is_undoable():
    """Resuming: load a checkpoint into the live model (copies into the arena), then step and undo exactly."""
    model = bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rw = Rewind(model, opt, capacity=2)
    train(model, opt, 2)
    ckpt = torch.load(io.BytesIO(saved({"m": model.state_dict(), "o": opt.state_dict()})), weights_only=True)
    train(model, opt, 3, seed=1)
    model.load_state_dict(ckpt["m"])
    opt.load_state_dict(ckpt["o"])  # replaces the state tensors: the Rewind re-binds them at the next record
    assert same_dict(model.state_dict(), ckpt["m"])
    rw.snapshot()
    before = full_state(model, opt)
    train(model, opt, 1, seed=2)
    rw.undo()
    assert_same(before, full_state(model, opt))


# ---------------------------------------------------------------------------------------------------- inside a step
def test_undo_redo_snapshot_rollback_inside_a_step_are_refused():
    """From an LBFGS closure (inside optimizer.step()) they were silently accepted and corrupted the history."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    rw = Rewind(model, opt, capacity=3)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    refused = []

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if not refused:
            assert rw.in_step
            for name, op in [
                ("undo", rw.undo), ("redo", rw.redo), ("snapshot", rw.snapshot), ("revert", rw.revert),
                ("rollback_to", lambda: rw.rollback_to(0)), ("retry", lambda: rw.retry(lr=0.1)),
            ]:  # fmt: skip
                with pytest.raises(RewindError, match="inside optimizer.step"):
                    op()
                refused.append(name)
            with pytest.raises(RewindError, match="inside optimizer.step"):
                with rw.trial():
                    pass
            rw.ensure_recorded()  # a no-op inside the step: the pre-step hook recorded it
        return loss

    opt.step(closure)
    before = full_state(model, opt)
    assert len(refused) == 6 and not rw.in_step
    assert rw.redo_depth == 0 and len(rw) == 1
    opt.step(closure)
    after = full_state(model, opt)
    rw.undo()
    assert_same(before, full_state(model, opt))
    rw.redo()
    assert_same(after, full_state(model, opt))


def test_undo_after_a_step_that_raised():
    """A step that raises never reaches its post-step hook; undo afterwards is legitimate (undo the failed step)."""
    model = nn.Linear(4, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    rw = Rewind(model, opt, capacity=2)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if calls[0] == 3:
            raise ValueError("data loader died")
        return loss

    before = full_state(model, opt)
    with pytest.raises(ValueError):
        opt.step(closure)  # LBFGS changed the parameters before the closure raised
    assert rw.in_step  # stale: the post-step hook never ran
    rw.undo()
    assert_same(before, full_state(model, opt))
    assert not rw.in_step


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_step_compiles_once_and_undoes_exactly():
    """torch.compile(opt.step) traced into the step hooks and recompiled every iteration (50 graphs, not 1)."""
    import torch._dynamo

    def run(with_rewind: bool):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rw = Rewind(model, opt, capacity=2) if with_rewind else None
        step = torch.compile(opt.step)
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        states = []
        for i in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step()
            if rw is not None and i == 3:
                rw.undo()  # the step is undone, then taken again: the run must equal one without the undo
                step()
            states.append(full_state(model, opt))
        return states, torch._dynamo.utils.counters["stats"]["unique_graphs"]

    plain, graphs_plain = run(False)
    ours, graphs_ours = run(True)
    assert graphs_ours <= graphs_plain + 1, (graphs_ours, graphs_plain)
    for a, b in zip(plain, ours):
        assert_same(a, b)


@pytest.mark.slow
def test_compiled_model_and_compiled_step_together():
    torch.manual_seed(0)
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rw = Rewind(model, opt, capacity=2)  # built before compiling: the tensors move once, at construction
    cmodel = torch.compile(model)
    step = torch.compile(opt.step)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(cmodel(x), y).backward()
        step()
    rw.snapshot()  # before forward: the compiled forward's BatchNorm update is undone too
    before = full_state(model, opt)
    opt.zero_grad()
    F.cross_entropy(cmodel(x), y).backward()
    step()
    after = full_state(model, opt)
    rw.undo()
    assert_same(before, full_state(model, opt))
    rw.redo()
    assert_same(after, full_state(model, opt))


# ---------------------------------------------------------------------------------------------------- max_bytes
class Tied(nn.Module):
    """A parameter that is a view of another's storage: both are copied one by one, not moved into an arena."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 64, bias=False)
        self.dec = nn.Parameter(self.enc.weight.detach().view(-1)[:1000].view(10, 100))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x).sum() + self.dec.sum()


def _setup(kind: str):
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    if kind == "one_by_one":
        m = Tied()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = lambda: m(x)  # noqa: E731
    else:
        m = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        opt = (torch.optim.LBFGS(m.parameters(), history_size=4, max_iter=3) if kind == "by_value"
               else torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))  # fmt: skip
        loss = lambda: m(x).pow(2).mean()  # noqa: E731

    def step():
        def closure():
            opt.zero_grad()
            out = loss()
            out.backward()
            return out

        opt.step(closure)

    return m, opt, step


@pytest.mark.parametrize("kind", ["arena", "one_by_one", "by_value", "grads"])
def test_max_bytes_counts_everything_a_snapshot_holds(kind):
    """The budget counted arena bytes only: tensors copied one by one (tied storage, views, subclasses), values held
    by value (LBFGS's history lists of tensors) and gradients (grads=True) slipped past it. Now a history fits
    max_bytes iff what its slots really hold does."""
    m, opt, step = _setup(kind)
    grads = kind == "grads"
    rw = Rewind(m, opt, capacity=1, grads=grads)
    for _ in range(6):  # LBFGS's history (4 pairs, 3 per step) is full: every slot holds as much as the live state
        step()
    held = rw.nbytes  # capacity 1 + redo: two full slots, measured on the slots themselves
    if kind != "arena":
        assert 2 * rw.state_nbytes < 0.9 * held  # counting the arena alone would admit the budget refused below
    rw.close()
    del rw

    def fits(nbytes: int) -> bool:
        try:
            Rewind(m, opt, capacity=1, grads=grads, max_bytes=nbytes).close()
            return True
        except RewindError as e:
            assert isinstance(e, ValueError) and "max_bytes" in str(e)
            return False

    assert fits(int(held * 1.05) + 512)
    assert not fits(int(held * 0.95))


def test_max_bytes_counts_fsdp2_shards():
    """FSDP2 parameters are DTensors, copied one by one through their local shards: counted too."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    # an in-process store: no port to take, no MASTER_* left in os.environ for later tests' subprocesses
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
        fully_shard(m)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for _ in range(2):
            m(torch.randn(2, 32)).sum().backward()
            opt.step()
        rw = Rewind(m, opt, capacity=1)
        for _ in range(2):
            m(torch.randn(2, 32)).sum().backward()
            opt.step()
        held = rw.nbytes
        assert 2 * rw.state_nbytes < 0.9 * held
        rw.close()
        del rw
        with pytest.raises(ValueError, match="max_bytes"):
            Rewind(m, opt, capacity=1, max_bytes=int(held * 0.95))
        Rewind(m, opt, capacity=1, max_bytes=int(held * 1.05) + 512).close()
    finally:
        dist.destroy_process_group()


def test_max_bytes_with_a_host_tier_shrinks_instead_of_failing():
    m = nn.Linear(40, 40)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    probe = Rewind(m, opt, capacity=1)
    probe.snapshot()
    per = probe.nbytes  # one slot
    probe.close()
    del probe
    with pytest.warns(RuntimeWarning, match="keeps 1 undo point"):
        rw = Rewind(m, opt, tiers=Tiers(device=4, host=HostArchive(keep=8, compress=False)), max_bytes=2 * per + 64)
    assert rw.capacity == 1
    assert rw.config.capacity == 4  # what was asked; rw.capacity is what the ring holds
