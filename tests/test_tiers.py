"""Storage tiers: the step counter, the host archive (plain and compressed) and rollback_to across tiers.

Every restore is checked bitwise against the state recorded (by a step pre-hook of our own, registered after the
Rewind's) just before that optimizer step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from statecheck import assert_same, full_state

from torchrewind import HostArchive, Rewind, RewindError, Tiers


def has_codec() -> bool:
    try:
        from torchrewind.tiers import codec  # noqa: F401

        codec.encode(torch.zeros(8, dtype=torch.int64))
        return True
    except Exception:
        return False


COMPRESS = [False, pytest.param(True, marks=pytest.mark.skipif(not has_codec(), reason="needs torchrewind[delta]"))]


class Run:
    """A small model with BatchNorm and Dropout, Adam and a StepLR; remembers the state before every step."""

    def __init__(self, tiers: Tiers, overlap: bool = False, grads: bool = False, **kw) -> None:
        torch.manual_seed(0)
        self.m = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
            torch.nn.Linear(16, 3),
        )  # fmt: skip
        self.o = torch.optim.Adam(self.m.parameters(), lr=1e-2)
        self.s = torch.optim.lr_scheduler.StepLR(self.o, 3, 0.5)
        self.rw = Rewind(self.m, self.o, schedulers=[self.s], tiers=tiers, overlap=overlap, grads=grads, **kw)
        self.before: dict[int, dict] = {}
        self.o.register_step_pre_hook(lambda *a: self.before.__setitem__(self.rw.step, self.state()))
        self.k = 0

    def state(self) -> dict:
        return full_state(self.m, self.o, self.s)

    def steps(self, n: int) -> None:
        for _ in range(n):
            g = torch.Generator().manual_seed(self.k)
            self.k += 1
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
            self.o.zero_grad()
            F.mse_loss(self.m(x), y).backward()
            self.o.step()
            self.s.step()


def test_step_counter_follows_undo_redo_retry():
    r = Run(Tiers(device=3))
    assert r.rw.step == 0
    r.steps(4)
    assert r.rw.step == 4
    r.rw.undo(2)
    assert r.rw.step == 2
    r.rw.redo()
    assert r.rw.step == 3
    r.rw.retry(lr=lambda lr: lr / 2)
    assert r.rw.step == 3  # undo to 2, then one step again


@pytest.mark.parametrize("compress", COMPRESS)
@pytest.mark.parametrize("overlap", [False, True])
def test_rollback_to_every_tier_is_exact(compress, overlap):
    r = Run(Tiers(device=2, host=HostArchive(keep=100, every=1, compress=compress, keyframe=4)), overlap=overlap)
    r.steps(20)
    for target in (19, 18, 17, 11, 5, 0):  # 19/18: device ring; the rest from the archive
        assert r.rw.rollback_to(target) == target
        assert_same(r.state(), r.before[target])
        r.rw.rollback_to(target)  # idempotent
    r.steps(3)  # training goes on from the restored state, recording again
    assert r.rw.step == 3 and len(r.rw) == 2


@pytest.mark.parametrize("compress", COMPRESS)
def test_rollback_picks_newest_at_or_before_and_says_which(compress):
    r = Run(Tiers(device=1, host=HostArchive(keep=100, every=5, compress=compress)))
    r.steps(23)
    assert r.rw.tiers.host.steps() == [0, 5, 10, 15, 20]
    assert r.rw.rollback_to(13) == 10
    assert_same(r.state(), r.before[10])
    assert r.rw.rollback_to(100) == 10  # the live state is newer than nothing: stays


@pytest.mark.parametrize("compress", COMPRESS)
def test_archive_forgets_an_undone_branch(compress):
    r = Run(Tiers(device=3, host=HostArchive(keep=100, compress=compress)))
    r.steps(6)
    r.rw.undo(3)  # back to step 3; records 4 and 5 belong to the branch being abandoned
    r.o.param_groups[0]["lr"] = 0.001  # a different branch from step 3 on
    r.steps(3)
    assert r.rw.tiers.host.steps() == [0, 1, 2, 3, 4, 5]
    new4 = r.before[4]  # the pre-step hook overwrote step 4's state with the new branch's
    assert r.rw.rollback_to(4) == 4
    assert_same(r.state(), new4)


@pytest.mark.parametrize("compress", COMPRESS)
def test_keep_and_max_bytes_evict_the_oldest(compress):
    r = Run(Tiers(device=1, host=HostArchive(keep=4, compress=compress)))
    r.steps(10)
    assert r.rw.tiers.host.steps() == [6, 7, 8, 9]
    with pytest.raises(RewindError, match=r"no recorded state at or before step 3.*'host': \[6, 7, 8, 9\]"):
        r.rw.rollback_to(3)
    assert_same(r.state(), r.state())
    one = r.rw.tiers.host.records[-1].nbytes
    r2 = Run(Tiers(device=1, host=HostArchive(keep=100, compress=False, max_bytes=3 * one)))
    r2.steps(10)
    assert len(r2.rw.tiers.host.steps()) == 3 and r2.rw.nbytes_by_tier["host"] <= 3 * one


@pytest.mark.parametrize("compress", COMPRESS)
def test_max_bytes_evicts_device_points_to_the_host_tier(compress):
    """With a host tier, a device history over max_bytes keeps fewer device points (with a warning) instead of
    failing: at construction, and when Adam's state appears at the first step. Older points stay reachable."""
    probe = Run(Tiers(device=1))
    probe.steps(3)
    probe.rw.undo()  # fills the redo slot too
    per_point = probe.rw.nbytes // 2  # capacity 1 + the redo slot, with Adam's state
    params_only = sum(p.numel() * 4 for p in probe.m.parameters())
    budget = 4 * per_point  # 3 undo points + the redo slot fit once Adam's state exists
    # at construction parameters (and RNG state, hyperparameters) fit fewer than 8 points; Adam's state halves that
    with pytest.warns(RuntimeWarning, match=r"device tier keeps 3 undo point\(s\) instead of \d"):
        r = Run(Tiers(device=8, host=HostArchive(keep=50, compress=compress)), max_bytes=budget)
        r.steps(12)
    assert r.rw.capacity == 3 and r.rw.nbytes_by_tier["device"] <= budget
    assert params_only * 4 < budget
    end = r.state()
    r.rw.undo(3)
    assert_same(r.state(), r.before[9])
    with pytest.raises(RewindError, match="only 0 available"):
        r.rw.undo(1)
    r.rw.redo(3)
    assert_same(r.state(), end)
    assert r.rw.rollback_to(2) == 2  # from the host tier
    assert_same(r.state(), r.before[2])
    fresh = Run(Tiers(device=1))
    fresh.rw.snapshot()
    tight = fresh.rw.nbytes * 3  # one slot before Adam's state exists (parameters, RNG, hyperparameters) x 3
    with pytest.warns(RuntimeWarning, match="instead of 8"):
        small = Run(Tiers(device=8, host=HostArchive(keep=5)), max_bytes=tight)  # already at construction
    assert small.rw.capacity < 8
    with pytest.raises(RewindError, match="Lower capacity"):
        Run(Tiers(device=8), max_bytes=tight)  # no host tier to evict to: refused, as before


def test_bad_tier_settings():
    with pytest.raises(RewindError, match="keep must be an int >= 1"):
        HostArchive(keep=0)
    with pytest.raises(RewindError, match="every must be an int >= 1"):
        HostArchive(every=0)
    with pytest.raises(RewindError, match="device must be an int >= 1"):
        Tiers(device=0)
    with pytest.raises(RewindError, match="host must be a HostArchive"):
        Tiers(host=5)
    m = torch.nn.Linear(2, 2)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(RewindError, match="disagree"):
        Rewind(m, o, capacity=3, tiers=Tiers(device=2))
    rw = Rewind(m, o, tiers=Tiers(device=2))
    with pytest.raises(RewindError, match="step must be an int"):
        rw.rollback_to(1.5)


@pytest.mark.parametrize("keep", [40, 5], ids=["deep-enough", "oldest-kept"])
def test_spike_guard_rolls_back_beyond_the_device_ring(keep):
    """SpikeGuard(rollback=10) on a 2-point device ring with a host tier: the roll-back goes 10 steps back through
    the host tier (PaLM-style long roll-backs without 10 device copies), or to the oldest point kept."""
    from torchrewind import SpikeDetector, SpikeGuard

    r = Run(Tiers(device=2, host=HostArchive(keep=keep, every=1)))
    guard = SpikeGuard(r.rw, detector=SpikeDetector(window=16, warmup=8, threshold=6), rollback=10, cooldown=0,
                       ramp=0, drop_first=False)  # fmt: skip
    for k in range(30):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        r.o.zero_grad()
        loss = F.mse_loss(r.m(x), y * (1000.0 if k == 25 else 1.0))
        loss.backward()
        if not guard.step(loss):
            break
    e = guard.log.events[-1]
    assert e.kind == "rolled_back" and e.iteration == 25
    want = 15 if keep == 40 else 25 - keep  # the host tier holds the last `keep` recorded steps (20..24)
    assert e.undone == 25 - want and r.rw.step == want
    assert_same(r.state(), r.before[want])
    with pytest.raises(RewindError, match="capacity=2.*host or disk"):
        SpikeGuard(Rewind(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                          capacity=2), rollback=10)  # fmt: skip


@pytest.mark.skipif(not has_codec(), reason="needs torchrewind[delta]")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_history_is_coded_by_element_size_and_exact(dtype):
    """A bf16/fp16 model's arena holds 2-byte weights and moments next to Adam's fp32 `step` scalars: the archive
    codes each run with its own element size (a better ratio than treating all as fp32), bit for bit."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).to(dtype)
    o = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4)
    host = HostArchive(keep=20, threads=2)
    rw = Rewind(m, o, tiers=Tiers(device=1, host=host))
    before = {}
    o.register_step_pre_hook(lambda *a: before.__setitem__(rw.step, full_state(m, o)))
    for _ in range(12):
        o.zero_grad()
        m(torch.randn(16, 64).to(dtype)).float().square().mean().backward()
        o.step()
    rec = host.records[3]
    assert {k for segs in rec.segments.values() for _, k in segs} >= {2}
    assert rw.rollback_to(3) == 3
    assert_same(full_state(m, o), before[3])
    assert host.nbytes < 0.7 * sum(r.nbytes for r in host.records[-1:]) * len(host.records)
