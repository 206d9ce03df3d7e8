"""Worker functions for the distributed FaultTriage tests (tests/test_triage.py): each runs in every rank of a gloo
process group on CPU, with DDP, and asserts on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dist_workers import Run, finish, gather, init, loss_of, rank_data, same_on_all_ranks
from statecheck import assert_same

from torchrewind import FaultInjector, FaultTriage, Quarantine, UnreliableDeviceError

BIG = lambda v, g: "loss above 50" if v > 50 else ""  # noqa: E731


def plain(data, skip=()) -> dict:
    """Fault-free DDP training without torchrewind; iterations in ``skip`` are dropped on every rank."""
    run = Run("ddp")
    run.rw.close()  # the Rewind is not used: no hooks, nothing recorded
    for i, x, t, fault in data:
        if i in skip:
            continue
        run.backward(x, t, fault)
        run.opt.step()
        run.sched.step()
    return run.state()


def triaged(data, inject_at=(), ids=False, persistent=False, stop=None, **kw) -> tuple[Run, FaultTriage]:
    """Triaged DDP training; ``ids``: each rank names its batches itself (``r<rank>-b<i>``); ``persistent``: the
    injected fault hits every computation from then on. The batch goes through ``batch=`` (for cross_check)."""
    run = Run("ddp", capacity=1)
    triage = FaultTriage(run.rw, check=BIG, **kw)
    inj = FaultInjector(run.model[5], kind="scale", factor=1e4)  # the logits, on the ranks in inject_at
    rank = torch.distributed.get_rank()
    for i, x, t, fault in data[:stop]:
        if (rank, i) in inject_at:
            inj.arm(None if persistent else 1)
        if triage.step(lambda b: loss_of(run.net, *b), batch_id=f"r{rank}-b{i}" if ids else None, batch=(x, t, fault)):
            run.sched.step()
    return run, triage


def fault_on_one_rank(rank: int, world: int, port: int, tmp: str) -> None:
    init(rank, world, port)
    for case in ("transient", "reproducible", "persistent"):
        _case(rank, case, tmp)
    finish()


def _case(rank: int, case: str, tmp: str) -> None:
    if case == "transient":
        # rank 1's forward is corrupted once: every rank reruns (one agreed decision), rank 1 is named, and training
        # ends bitwise as the fault-free run on both replicas
        data = rank_data(20, {})
        run, triage = triaged(data, inject_at={(1, 7)})
        (f,) = triage.faults
        assert f["verdict"] == "transient" and f["action"] == "continued", f
        assert f["loss_differs"] == [1] and f["grads_differ"] == [0, 1], f  # DDP averaged rank 1's fault into both
        assert [s["rank"] for s in f["suspects"]] == [1] and f["suspects"][0]["device"] == "cpu"
        assert f["rank"] == rank and triage.steps == 20
        same_on_all_ranks(run.state())
        assert_same(run.state(), plain(data))
    elif case == "persistent":
        # rank 1's device corrupts every forward from iteration 9 on: its failure reproduces in place, but rank 0
        # computes rank 1's batch normally from the same state -> a persistent fault of rank 1, raised on every rank
        data = rank_data(12, {})
        try:
            triaged(data, inject_at={(1, 9)}, persistent=True, cross_check=True)
        except UnreliableDeviceError as e:
            d = e.diagnosis
            assert d["verdict"] == "persistent" and [s["rank"] for s in d["suspects"]] == [1], d
            assert d["cross_check"] == {"1": 0} and "persistent fault of that device" in str(e)
        else:
            raise AssertionError("no UnreliableDeviceError")
        # cross-checked data faults stay the data's: the same NaN batch as below, confirmed by rank 1
        run, triage = triaged(rank_data(16, {(0, 12): "nan"}), cross_check=True)
        (f,) = triage.faults
        assert f["verdict"] == "reproducible" and f["cross_check"] == {"0": 1} and f["action"] == "skipped", f
        assert_same(run.state(), plain(rank_data(16, {(0, 12): "nan"}), skip={12}))
    else:
        # rank 0's batch 12 has a NaN loss (the data): reproducible on every rank's rerun; all ranks skip the
        # iteration; only rank 0's batch id is quarantined; a restart reads the file and skips it without computing
        data = rank_data(20, {(0, 12): "nan"})
        qfile = Path(tmp) / "q.jsonl"
        run, triage = triaged(data, quarantine=qfile, ids=True)
        (f,) = triage.faults
        assert f["verdict"] == "reproducible" and f["action"] == "skipped" and f["quarantined"] == ["r0-b12"], f
        same_on_all_ranks(run.state())
        ref = plain(data, skip={12})
        assert_same(run.state(), ref)
        torch.distributed.barrier()  # rank 0 wrote the file
        lines = [json.loads(x) for x in qfile.read_text().splitlines()]
        assert [(e["batch"], e["rank"]) for e in lines] == [("r0-b12", 0)], lines
        again, t2 = triaged(data, quarantine=qfile, ids=True)
        assert t2.faults == [] and t2.reruns == 0 and len(Quarantine(qfile)) == 1
        assert [e.iteration for e in t2.log if e.kind == "skipped"] == [12]
        assert_same(again.state(), ref)
    decisions = gather([(e.kind, e.reason) for e in triage.log])
    assert decisions[0] == decisions[1], "ranks took different decisions"
