"""Worker functions for tests/test_distributed.py: each runs in every rank of a gloo process group (CPU).

They assert; a failing rank raises, which torch.multiprocessing.spawn re-raises in the test with the traceback."""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from statecheck import assert_same, full_state

from torchrewind import (
    DiskCheckpoints,
    HostArchive,
    LineSearch,
    NonFiniteGuard,
    Rewind,
    SpikeDetector,
    SpikeGuard,
    Tiers,
)


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a rank that takes another path than the others fails after a minute instead of hanging CI
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def finish() -> None:
    """Leave together: every rank done with its collectives, DDP reducers freed before the group goes away (a rank
    that exits while another still tears down can abort in gloo's destructor: pytorch/pytorch#179291)."""
    import gc

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_on_all_ranks(state: dict) -> None:
    """Replicated state (everything but the RNG: each rank has its own dropout stream) is bitwise equal."""
    state = {k: v for k, v in state.items() if k != "rng"}
    states = gather(state)
    for other in states[1:]:
        assert_same(states[0], other)


def _digits(n: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    return X[perm][:n].contiguous(), y[perm][:n].contiguous()


def rank_data(n: int, faults: dict[tuple[int, int], str], bs: int = 16) -> list[tuple]:
    """This rank's ``n`` batches ``(i, x, y, fault)``; ``faults[(rank, i)]`` puts a fault on one rank only:
    ``poison`` (inputs x1e3: a loss spike) or ``nan`` (a NaN loss)."""
    X, y = _digits()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for i in range(n):
        j = ((i * world + rank) * bs) % (len(y) - bs)
        x, t = X[j : j + bs], y[j : j + bs]
        f = faults.get((rank, i))
        if f == "poison":
            x = x * 1e3
        out.append((i, x, t, f))
    return out


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


def loss_of(model, x, t, fault) -> torch.Tensor:
    loss = F.cross_entropy(model(x), t)
    return loss + float("nan") if fault == "nan" else loss


FAULTS = {(1, 14): "poison", (0, 20): "nan", (1, 27): "poison", (0, 28): "poison"}


class Run:
    """A (DDP- or FSDP2-wrapped) model, Adam, a scheduler and a Rewind, built identically on every rank."""

    def __init__(self, wrap: str, *, capacity: int = 4, group="auto", opt: str = "adam", tiers=None, **kw) -> None:
        self.model = mlp()
        torch.manual_seed(100 + dist.get_rank())  # each rank its own dropout stream, as in real data parallelism
        if wrap == "ddp":
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            self.net = fully_shard(self.model)
        params = self.net.parameters()
        self.opt = (
            torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
            if opt == "adam"
            else torch.optim.SGD(params, lr=0.05, momentum=0.9)
        )
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.99)
        if tiers is not None:
            capacity = tiers.device
        self.rw = Rewind(self.net, self.opt, schedulers=[self.sched], capacity=capacity, group=group, tiers=tiers,
                         **kw)  # fmt: skip

    def state(self) -> dict:
        return full_state(self.model, self.opt, self.sched)

    def backward(self, x, t, fault) -> torch.Tensor:
        loss = loss_of(self.net, x, t, fault)
        self.opt.zero_grad()
        loss.backward()
        return loss

    def train(self, guard, data) -> None:
        for i, x, t, fault in guard.wrap(data):
            if guard.step(self.backward(x, t, fault)):
                self.sched.step()

    def replay(self, log, data) -> None:
        """The guard's decisions, replayed by hand with Rewind on the same data."""
        pos = 0
        for e in log.events:
            i, x, t, fault = data[pos]
            pos += 1
            self.rw.snapshot()  # as guard.wrap() does: the iteration's undo point is recorded before its forward
            loss = self.backward(x, t, fault)
            if e.kind == "accepted":
                base = [g["lr"] for g in self.opt.param_groups]
                for g, lr in zip(self.opt.param_groups, e.lrs):
                    g["lr"] = lr
                self.opt.step()
                for g, lr in zip(self.opt.param_groups, base):
                    g["lr"] = lr
                self.sched.step()
            elif e.kind == "rolled_back":
                if e.undone:
                    self.rw.undo(e.undone)
                else:
                    self.rw.revert()  # nothing to undo: the forward's RNG draws are still taken back
                pos += e.skipped_batches
            else:  # skipped: back to the point before the forward (RNG, buffers)
                self.rw.revert()
            del loss


def spike_guard(rw):
    return SpikeGuard(rw, detector=SpikeDetector(window=16, threshold=6, warmup=8), rollback=3, skip_batches=1,
                      cooldown=2, ramp=2, max_consecutive=2)  # fmt: skip


def guard_agreement(rank: int, world: int, port: int, wrap: str) -> None:
    """A fault on one rank only: every rank takes the same decisions (one roll-back for all) and ends in the same
    state as the same decisions replayed by hand; without agreement (group=None) the replicas diverge."""
    init(rank, world, port)
    data = rank_data(36, FAULTS)
    run = Run(wrap)
    guard = spike_guard(run.rw)
    run.train(guard, data)
    kinds = [e.kind for e in guard.log]
    assert kinds.count("rolled_back") >= 2 and "skipped" in kinds, kinds
    logs = gather([(e.kind, e.loss, e.lrs, e.undone, e.skipped_batches) for e in guard.log])
    assert all(str(x) == str(logs[0]) for x in logs), "ranks took different decisions"
    assert all(math.isfinite(float(p.detach().sum())) for p in run.model.parameters())
    if wrap == "ddp":
        same_on_all_ranks(run.state())  # replicated state: bitwise equal on every rank

    rep = Run(wrap)
    rep.replay(guard.log, data)
    assert_same(run.state(), rep.state())

    if wrap == "ddp":  # each rank alone: the rank that saw the spike rolls back, the other does not
        alone = Run(wrap, group=None)
        g = spike_guard(alone.rw)
        g.skip_batches = 0  # (with skipping, the ranks would run different numbers of all-reduces and hang)
        alone.train(g, data)
        logs = gather([e.kind for e in g.log])
        assert logs[0] != logs[1]
        states = gather(alone.state()["model"])
        assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    finish()


def buffer_jump_agreement(rank: int, world: int, port: int) -> None:
    """Inputs x1e3 on one rank only, into a DDP BatchNorm network: the loss does not spike (BatchNorm normalises the
    batch), but that rank's running variance jumps. The buffer signal is summed over ranks with the loss, so every
    rank drops the iteration together, and the parameters stay bitwise equal on all ranks."""
    init(rank, world, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))  # fmt: skip
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    guard = SpikeGuard(Rewind(net, opt, capacity=4))  # buffers="auto": the Rewind's modules
    assert guard.buffer_watch is not None and guard.buffer_watch.count == 2
    bn = model[1]
    for i, x, t, fault in guard.wrap(rank_data(45, {(1, 35): "poison"})):  # after the detector's warm-up (20)
        var = bn.running_var.clone()
        loss = F.cross_entropy(net(x), t)
        opt.zero_grad()
        loss.backward()
        ok = guard.step(loss)
        if i == 35:
            assert not ok and guard.log[-1].reason.startswith("buffer jump"), guard.log[-1]
            assert torch.equal(bn.running_var, var)  # the jump is taken back with the batch, on the faulty rank too
    logs = gather([(e.iteration, e.kind, e.reason) for e in guard.log if e.kind != "accepted"])
    assert all(x == logs[0] for x in logs), "ranks took different decisions"
    assert [k for _, k, _ in logs[0]] == ["rolled_back"], logs[0]
    params = gather({k: v.detach().clone() for k, v in model.named_parameters()})
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
    finish()


def nonfinite_params_agreement(rank: int, world: int, port: int) -> None:
    """check_params: parameters made non-finite on one rank only undo the step on every rank."""
    init(rank, world, port)
    run = Run("ddp")
    guard = NonFiniteGuard(run.rw, check_params=True)
    data = rank_data(6, {})
    for i, x, t, _ in data:
        loss = run.backward(x, t, None)
        if i == 3 and rank == 1:
            run.opt.param_groups[0]["lr"] = math.inf  # this rank's step blows its parameters up
        before = run.state()
        ok = guard.step(loss)
        assert ok == (i != 3)
        if i == 3:
            assert_same(before, run.state())  # the undo restores the state the step started from, lr=inf included
        run.opt.param_groups[0]["lr"] = run.sched.get_last_lr()[0]
    same_on_all_ranks(run.state())
    finish()


def line_search_agreement(rank: int, world: int, port: int) -> None:
    """LineSearch under DDP: each rank evaluates its own batch, all ranks accept/reject the same trials."""
    init(rank, world, port)
    run = Run("ddp", opt="sgd")
    run.opt.param_groups[0]["lr"] = 2.0  # too high: the search must backtrack
    ls = LineSearch(run.rw, c=0.1, max_tries=6)
    for i, x, t, _ in rank_data(8, {}):
        ls.step(lambda: loss_of(run.net, x, t, None))
    kinds = [(e.kind, e.lrs) for e in ls.log]
    assert any(k == "rejected" for k, _ in kinds)
    logs = gather(kinds)
    assert all(x == logs[0] for x in logs)
    same_on_all_ranks(run.state())
    finish()


def line_search_restart_agreement(rank: int, world: int, port: int, wrap: str) -> None:
    """LineSearch's momentum restart under DDP / FSDP2: whether a trial goes uphill is decided on the global ∇f·Δ
    (each rank holds a share), so every rank restarts on the same trials and ends with the same state."""
    init(rank, world, port)
    run = Run(wrap, opt="sgd")
    ls = LineSearch(run.rw, max_tries=4)
    gen = torch.Generator().manual_seed(7)  # the same stale "momentum" on every rank
    for i, x, t, _ in rank_data(8, {}):
        if i % 2 == 1:  # a large random buffer: the heavy-ball step is dominated by it, uphill about half the time
            with torch.no_grad():
                for p in (p for g in run.opt.param_groups for p in g["params"]):
                    buf = run.opt.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        noise = torch.randn(p.shape, generator=gen) * 50.0  # full shape on every rank
                        if hasattr(buf, "to_local"):  # FSDP2: this rank's shard of it
                            buf.to_local().copy_(_shard_like(noise, buf))
                        else:
                            buf.copy_(noise)
        ls.step(lambda: loss_of(run.net, x, t, None))
    events = [(e.kind, e.extra, e.lrs) for e in ls.log]
    assert any(extra.get("restarted") for _, extra, _ in events), events
    logs = gather(events)
    assert all(x == logs[0] for x in logs)
    if wrap == "ddp":
        same_on_all_ranks(run.state())
    finish()


def _shard_like(full: torch.Tensor, dt):
    """The local shard of ``full`` laid out as the DTensor ``dt``."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, dt.device_mesh, dt.placements).to_local()


def fsdp_undo_is_exact(rank: int, world: int, port: int, opt: str) -> None:
    """FSDP2 (fully_shard, DTensor shards of parameters and optimizer state): step -> undo -> step equals never
    having taken the undone step, bitwise on every rank's shards; undo(2) then redo(2) returns exactly."""
    init(rank, world, port)
    data = rank_data(8, {})

    def run(undo: bool) -> tuple[Run, dict | None]:
        r = Run("fsdp", opt=opt, capacity=3)
        mid = None
        for i, x, t, _ in data[:4]:
            r.backward(x, t, None)
            r.opt.step()
            r.sched.step()
        if undo:
            mid = r.state()
            r.rw.snapshot()  # before forward: the undo point includes the RNG the undone step's dropout draws
            _, x, t, _ = data[7]
            r.backward(x, t, None)
            r.opt.step()
            r.sched.step()
            r.rw.undo()
            assert_same(mid, r.state())
            r.rw.redo()
            r.rw.undo()
        for i, x, t, _ in data[4:7]:
            r.backward(x, t, None)
            r.opt.step()
            r.sched.step()
        end = r.state()
        r.rw.undo(2)
        r.rw.redo(2)
        assert_same(end, r.state())
        return r, mid

    ref, _ = run(False)
    got, _ = run(True)
    assert_same(ref.state(), got.state())
    assert type(next(got.net.parameters())).__name__ == "DTensor"
    finish()


def tiers_rollback(rank: int, world: int, port: int, wrap: str, root: str) -> None:
    """Host and disk tiers under DDP/FSDP2: each rank checkpoints into its own directory; rollback_to restores
    every rank to the same step, bit for bit (FSDP2: each rank its shards), even when a checkpoint is missing on
    one rank only (the ranks agree on the newest step all of them hold)."""
    import shutil
    from pathlib import Path

    init(rank, world, port)
    data = rank_data(14, {})
    disk = DiskCheckpoints(root, every=4, keep_last=3, async_save=True)
    shard = wrap == "ddp-shard"
    wrap = "ddp" if shard else wrap
    run = Run(wrap, tiers=Tiers(device=1, host=HostArchive(keep=3, every=1), disk=disk), shard=shard)
    assert disk.dir == Path(root) / f"rank{rank}"
    refs = {}

    def train(batches):
        for i, x, t, _ in batches:
            run.backward(x, t, None)
            refs[run.rw.step] = run.state()  # what the pre-step record of this step holds
            run.opt.step()
            run.sched.step()

    train(data[:13])
    disk.wait()
    assert disk.steps() == [4, 8, 12] and run.rw.step == 13
    assert run.rw.rollback_to(11) == 11  # host tier
    assert_same(refs[11], run.state())
    assert run.rw.rollback_to(9) == 8  # disk tier
    assert_same(refs[8], run.state())
    train(data[8:13])
    disk.wait()
    if wrap == "ddp":
        same_on_all_ranks(run.state())
    assert disk.steps() == [4, 8, 12]
    if rank == 1:
        shutil.rmtree(disk.dir / "step_000000008")  # this rank lost a checkpoint the other one has
    dist.barrier()
    got = run.rw.rollback_to(9)
    assert got == 4, got  # rank 1's newest at or before 9 is 4: every rank goes there
    assert_same(refs[4], run.state())
    train(data[4:6])
    if wrap == "ddp":
        same_on_all_ranks(run.state())
    run.rw.close()
    dist.barrier()
    finish()


def ddp_shard(rank: int, world: int, port: int) -> None:
    """Rewind(shard=True): each rank keeps half of every snapshot, yet the guarded run (faults on one rank, roll-backs)
    and explicit undo/redo end bitwise where the unsharded run does, with about half the history memory."""
    init(rank, world, port)
    data = rank_data(36, FAULTS)
    full, half = Run("ddp"), Run("ddp", shard=True)
    logs = []
    for run in (full, half):
        torch.manual_seed(100 + rank)
        guard = spike_guard(run.rw)
        run.train(guard, data)
        logs.append([(e.kind, e.loss, e.undone) for e in guard.log])
    assert str(logs[0]) == str(logs[1]) and any(k == "rolled_back" for k, _, _ in logs[0])  # str: nan == nan
    assert_same(full.state(), half.state())
    same_on_all_ranks(half.state())
    assert half.rw.nbytes < 0.6 * full.rw.nbytes, (half.rw.nbytes, full.rw.nbytes)
    end = half.state()
    half.rw.undo(3)
    back = half.state()
    half.rw.redo(3)
    assert_same(end, half.state())
    full.rw.undo(3)  # (after half's redo: both Rewinds restore the same global RNG)
    assert_same(back, full.state())
    finish()
