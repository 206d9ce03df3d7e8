"""FaultTriage: a failed check is attributed by rerunning the iteration from its exact start.

CPU kernels are deterministic, so everything here is exact (``full_state`` + ``assert_same``: bitwise, never
allclose): with an injected transient fault the run ends bit for bit as the fault-free run; with a reproducible bad
batch as a run that never drew that batch; a restart with the quarantine file skips it without computing it. The
model has BatchNorm and dropout and an Adam + StepLR optimizer, so the restore must bring back buffers, RNG and
optimizer state for any of this to hold.
"""

from __future__ import annotations

import functools
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from statecheck import assert_same, full_state

from torchrewind import (
    DeterminismReport,
    FaultInjector,
    FaultTriage,
    NonFiniteGuard,
    Quarantine,
    ReproducibleFaultError,
    Rewind,
    RewindError,
    SpikeDetector,
    SpikeGuard,
    Trajectory,
    TriageError,
    UnreliableDeviceError,
)
from torchrewind.errors import RewindTypeError, RewindValueError
from torchrewind.policies.inject import flip_bit
from torchrewind.policies.outcome import Outcome, grad_checksum, same_number


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


D_IN, N_CLS, BS = 16, 4, 32
BIG = lambda v, g: "loss above 50" if v > 50 else ""  # noqa: E731 - a check a scaled activation fails


def make_data(n: int, nan=(), spike=()) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``n`` batches ``(x, y, weight)``; ``nan``: one NaN input (a corrupt record); ``spike``: the batch's loss
    weight is 1e3 instead of 1 (inputs x1e3 would not do: BatchNorm normalizes them away)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D_IN, N_CLS, generator=g)
    out = []
    for i in range(n):
        x = torch.randn(BS, D_IN, generator=g)
        y = (x @ w).argmax(1)
        if i in nan:
            x = x.clone()
            x[0, 0] = float("nan")
        out.append((x, y, 1e3 if i in spike else 1.0))
    return out


def setup(opt: str = "adam"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, N_CLS),
    )  # fmt: skip
    if opt == "adam":
        o = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(o, 7, 0.5)
    torch.manual_seed(100)  # the dropout stream
    return model, o, sched


def plain(data, skip=(), opt="adam"):
    """The reference: a plain loop, no Rewind, no triage; batches in ``skip`` are never drawn."""
    model, o, sched = setup(opt)
    for i, (x, y, w) in enumerate(data):
        if i in skip:
            continue
        o.zero_grad(set_to_none=True)
        (w * F.cross_entropy(model(x), y)).backward()
        o.step()
        sched.step()
    return full_state(model, o, sched)


class Run:
    """A triaged loop on fresh objects: ``inject(model)`` builds an injector armed at the iterations ``arm_at``."""

    def __init__(self, opt="adam", capacity=1, guard=None, inject=None, **kw):
        self.model, self.opt, self.sched = setup(opt)
        self.rw = Rewind(self.model, self.opt, schedulers=[self.sched], capacity=capacity)
        self.guard = guard(self.rw) if guard is not None else None
        self.triage = FaultTriage(self.rw, guard=self.guard, **kw)
        self.injector = inject(self.model) if inject is not None else None
        self.forwards: list[int] = []

    def loss_fn(self, i, x, y, w=1.0):
        def fn():
            self.forwards.append(i)
            return w * F.cross_entropy(self.model(x), y)

        return fn

    def train(self, data, arm_at=(), start=0, stop=None, times=1, ids=None):
        for i, (x, y, w) in self.triage.wrap(enumerate(data)):  # i: the position in the data
            if i < start or (stop is not None and i >= stop):
                continue
            if i in arm_at:
                self.injector.arm(times)
            bid = ids(i) if ids is not None else None
            if self.triage.step(self.loss_fn(i, x, y, w), batch_id=bid):
                self.sched.step()
        return self

    def state(self):
        return full_state(self.model, self.opt, self.sched)


def ordered(state):
    return {**state, "groups": [dict(sorted(g.items())) for g in state["groups"]]}


def logits(model):
    return FaultInjector(model[4], kind="scale", factor=1e4)


# ============================================================================================ the two diagnoses


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_transient_activation_fault_ends_bitwise_as_the_fault_free_run(opt):
    data = make_data(30)
    r = Run(opt, inject=logits, check=BIG).train(data, arm_at={12, 20})
    assert_same(r.state(), plain(data, opt=opt))
    assert [f["iteration"] for f in r.triage.faults] == [12, 20]
    f = r.triage.faults[0]
    assert f["verdict"] == "transient" and f["action"] == "continued" and f["check"] == "loss above 50"
    assert f["first"]["loss"] > 50 and f["rerun"]["loss"] < 50 and f["loss_differs"] == [0]
    assert f["suspects"] == [{"host": socket.gethostname(), "device": "cpu", "rank": 0}]
    assert r.injector.fired == 2 and r.triage.transient == 2 and r.triage.reproducible == 0
    assert r.triage.steps == 30 and r.triage.reruns == 2
    ev = r.triage.log.events[12]
    assert ev.kind == "accepted" and ev.extra["diagnosis"] == "transient" and ev.loss == f["rerun"]["loss"]


def test_transient_gradient_bitflip_is_caught_by_the_checksum_path_and_undone():
    # flip the top exponent bit of one gradient entry of the last bias (|g| < 2, nonzero: it becomes ~1e38)
    data = make_data(20)
    r = Run(inject=lambda m: FaultInjector(m[4].bias, index=1), check=lambda v, g: g > 1e3 and "gradient above 1e3")
    r.train(data, arm_at={9})
    assert_same(r.state(), plain(data))
    (f,) = r.triage.faults
    assert f["verdict"] == "transient" and f["first"]["grad_norm"] > 1e30
    assert f["loss_differs"] == [] and f["grads_differ"] == [0]  # the loss came before the fault
    assert [s["rank"] for s in f["suspects"]] == [0]  # one device: the gradients pin it


def test_nonfinite_gradient_fault_is_transient_with_the_default_checks():
    data = make_data(16)
    r = Run(inject=lambda m: FaultInjector(m[0].weight, kind="scale", factor=float("inf"))).train(data, arm_at={5})
    assert_same(r.state(), plain(data))
    (f,) = r.triage.faults
    assert f["check"] == "non-finite gradient" and f["verdict"] == "transient"


def test_reproducible_bad_batch_ends_bitwise_as_a_run_that_skipped_it(tmp_path):
    data = make_data(30, nan={15})
    q = tmp_path / "q.jsonl"
    r = Run(quarantine=q).train(data)
    assert_same(r.state(), plain(data, skip={15}))
    (f,) = r.triage.faults
    assert f["verdict"] == "reproducible" and f["action"] == "skipped" and f["quarantined"] == [15]
    assert math.isnan(f["first"]["loss"]) and f["suspects"] == [] and r.triage.reruns == 1
    assert r.forwards.count(15) == 2  # first run and rerun
    (entry,) = [json.loads(line) for line in q.read_text().splitlines()]
    assert entry["batch"] == 15 and entry["iteration"] == 15 and entry["verdict"] == "reproducible"
    ev = r.triage.log.events[15]
    assert ev.kind == "skipped" and ev.extra["diagnosis"] == "reproducible"


def test_a_restart_with_the_quarantine_file_skips_the_batch_without_computing_it(tmp_path):
    data = make_data(30, nan={15, 22})
    q = tmp_path / "q.jsonl"
    first = Run(quarantine=q).train(data, ids=lambda i: f"sample-block-{i}")
    assert Quarantine(q).ids == ["sample-block-15", "sample-block-22"]
    again = Run(quarantine=str(q)).train(data, ids=lambda i: f"sample-block-{i}")
    assert 15 not in again.forwards and 22 not in again.forwards  # never computed
    assert again.triage.faults == [] and again.triage.reruns == 0
    assert_same(again.state(), first.state())
    assert_same(again.state(), plain(data, skip={15, 22}))
    assert [e.reason for e in again.triage.log.events if e.kind == "skipped"] == [
        "quarantined batch 'sample-block-15'", "quarantined batch 'sample-block-22'"
    ]  # fmt: skip


def test_persistent_fault_reproduces_in_place_and_is_treated_as_the_data():
    # A fault that hits every run (times=None) cannot be told from bad data on one device (see the docs: the
    # cross-rank check under DDP can): the verdict is reproducible and the batch is skipped.
    data = make_data(12)
    r = Run(inject=logits, check=BIG)
    r.train(data, arm_at={4}, times=None, stop=5)
    r.injector.disarm()
    r.train(data, start=5)
    assert_same(r.state(), plain(data, skip={4}))
    (f,) = r.triage.faults
    assert f["verdict"] == "reproducible"


def test_a_rerun_that_differs_and_fails_again_is_inconsistent_and_skipped():
    data = make_data(12, spike={6})
    r = Run(inject=lambda m: FaultInjector(m[4], kind="scale", factor=1.0 + 2**-10), check=BIG)
    r.train(data, arm_at={6})
    assert_same(r.state(), plain(data, skip={6}))
    (f,) = r.triage.faults
    assert f["verdict"] == "inconsistent" and f["action"] == "skipped" and f["rerun_check"] == "loss above 50"


def test_tolerance_counts_a_tiny_difference_as_reproduced():
    data = make_data(12, spike={6})
    r = Run(inject=lambda m: FaultInjector(m[4], kind="scale", factor=1.0 + 2**-20), check=BIG, tolerance=1e-3)
    r.train(data, arm_at={6})
    assert_same(r.state(), plain(data, skip={6}))
    assert r.triage.faults[0]["verdict"] == "reproducible"


# ============================================================================================ actions and limits


def test_on_reproducible_raise_leaves_the_iteration_undone_and_quarantines_the_batch(tmp_path):
    data = make_data(12, nan={7})
    r = Run(on_reproducible="raise", quarantine=tmp_path / "q.jsonl")
    r.train(data, stop=7)
    before = r.state()
    with pytest.raises(ReproducibleFaultError, match="the data or the model") as e:
        r.train(data, start=7)
    assert e.value.diagnosis["action"] == "raised" and e.value.diagnosis["iteration"] == 7
    assert isinstance(e.value, TriageError) and isinstance(e.value, RewindError)
    assert_same(r.state(), before)  # as if iteration 7 never ran (BatchNorm statistics and RNG included)
    assert 7 in Quarantine(tmp_path / "q.jsonl")


def test_too_many_transient_faults_in_the_window_raise_unreliable_device_with_the_state_at_the_iteration_start():
    data = make_data(30)
    r = Run(inject=logits, check=BIG, max_transient=3, window=10)
    r.train(data, arm_at={3, 15, 20}, stop=24)  # 3 and 15 are 12 apart: never 3 within a window of 10
    assert r.triage.transient == 3
    before = r.state()
    with pytest.raises(UnreliableDeviceError, match=r"3 transient faults within 10 iterations .*rank 0 on") as e:
        r.train(data, arm_at={24}, start=24)
    assert e.value.diagnosis["verdict"] == "transient" and e.value.diagnosis["action"] == "raised"
    assert_same(r.state(), before)


def test_max_consecutive_reproducible_failures_blame_the_model():
    data = make_data(12, nan=set(range(4, 12)))
    r = Run(max_consecutive=3)
    with pytest.raises(TriageError, match="3 iterations in a row .* the model"):
        r.train(data)
    assert r.triage.reproducible == 3 and r.triage.steps == 4


def test_rollback_hands_reproducible_spikes_to_a_spike_guard_which_acts_as_it_would_alone():
    data = make_data(40, spike={25})
    det = lambda: SpikeDetector(warmup=10, window=20)  # noqa: E731

    def spike_guard(rw):
        return SpikeGuard(rw, detector=det(), rollback=2, skip_batches=1, cooldown=3, ramp=2)

    r = Run(capacity=3, guard=spike_guard, on_reproducible="rollback", inject=logits).train(data, arm_at={31})
    # the reference: the SpikeGuard alone, on the same data without the transient fault at 31, with the same undo
    # points (the triage records each at the top of the iteration, so a roll-back also undoes those forward passes)
    model, o, sched = setup()
    alone = SpikeGuard(Rewind(model, o, schedulers=[sched], capacity=3), detector=det(), rollback=2,
                       skip_batches=1, cooldown=3, ramp=2)  # fmt: skip
    for x, y, w in alone.wrap(data):
        alone.rw.snapshot()
        o.zero_grad(set_to_none=True)
        loss = w * F.cross_entropy(model(x), y)
        loss.backward()
        if alone.step(loss):
            sched.step()
    assert_same(r.state(), full_state(model, o, sched))
    assert [e.kind for e in r.triage.log] == [e.kind for e in alone.log]
    verdicts = [(f["batch"], f["verdict"], f["action"]) for f in r.triage.faults]
    assert verdicts == [(25, "reproducible", "rolled_back"), (31, "transient", "continued")]  # by position
    assert r.guard.rollbacks == 1 and r.triage.log.events[25].extra["diagnosis"] == "reproducible"


def test_rollback_with_a_guard_that_would_apply_skips_a_batch_the_check_rejects():
    data = make_data(14)
    r = Run(guard=NonFiniteGuard, on_reproducible="rollback", check=lambda v, g: v > 1.5 and "custom")
    r.train(data)
    bad = {f["iteration"] for f in r.triage.faults}
    assert bad and all(f["action"] == "skipped" for f in r.triage.faults)
    assert_same(r.state(), plain(data, skip=bad))


# ============================================================================================ determinism report


def test_determinism_report_on_cpu_is_all_zero_and_changes_nothing():
    data = make_data(20)
    r = Run(report_every=3).train(data)
    rep = r.triage.determinism
    assert isinstance(rep, DeterminismReport)
    for q, s in rep.stats.items():
        assert s["runs"] == 6 and s["identical"] == 6 and s["max_abs"] == 0.0 and s["max_rel"] == 0.0, q
    assert rep.max_rel == 0.0 and "| grads | 6 | 6 |" in rep.summary()
    assert r.triage.reruns == 6 and r.triage.faults == []
    assert_same(r.state(), plain(data))


def test_a_faulty_report_rerun_is_triaged_against_a_third_run():
    data = make_data(9)
    r2 = Run(report_every=3, inject=logits, check=BIG)
    for i, (x, y, _) in enumerate(data):
        if i == 5:  # a report iteration: its first run passes, its rerun is hit
            r2.injector.arm(1, after=1)
        if r2.triage.step(r2.loss_fn(i, x, y)):
            r2.sched.step()
    (f,) = r2.triage.faults
    assert f["iteration"] == 5 and f["verdict"] == "transient" and r2.forwards.count(5) == 3
    assert_same(r2.state(), plain(data))


def test_determinism_report_records_a_nondeterministic_rerun():
    data = make_data(6)
    r = Run(report_every=3, inject=lambda m: FaultInjector(m[4], kind="scale", factor=1.0 + 2**-12))
    r.train(data, arm_at={2})  # iteration 2 reports: its first run is perturbed, its rerun is not
    s = r.triage.determinism.stats
    assert s["loss"]["runs"] == 2 and s["loss"]["identical"] == 1 and 0 < s["loss"]["max_rel"] < 1e-2
    assert s["grads"]["identical"] == 1 and s["grads"]["max_abs"] > 0
    assert_same(r.state(), plain(data))  # the rerun's (unperturbed) result was kept


# ============================================================================================ framework protocol


def backprop(model, o, x, y):
    """What a framework's training step does before the optimizer step: zero_grad, forward, backward; the loss."""
    o.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def test_framework_before_step_protocol_matches_the_plain_loop():
    """A loop shaped like the HF Trainer: judge before the framework's step, undo it after when it must not stand."""
    data = make_data(24, nan={9})
    model, o, sched = setup()
    rw = Rewind(model, o, schedulers=[sched])
    t = FaultTriage(rw, check=BIG)
    inj = logits(model)
    for i, (x, y, _) in enumerate(data):
        if i == 15:
            inj.arm()
        fwd_bwd = functools.partial(backprop, model, o, x, y)
        assert t.begin()
        stands = t.judge(fwd_bwd(), fwd_bwd, framework="before_step")
        o.step()  # the framework steps regardless
        sched.step()
        if not stands:
            rw.revert()
    assert_same(full_state(model, o, sched), plain(data, skip={9}))
    assert [f["verdict"] for f in t.faults] == ["reproducible", "transient"]


def test_framework_after_step_protocol_matches_the_plain_loop():
    """A loop shaped like Lightning: the step is taken before the judgement; a rerun that passes is stepped again."""
    data = make_data(24, nan={9})
    model, o, sched = setup()
    rw = Rewind(model, o, schedulers=[sched])
    t = FaultTriage(rw, check=BIG)
    inj = logits(model)
    for i, (x, y, _) in enumerate(data):
        if i == 15:
            inj.arm()
        fwd_bwd = functools.partial(backprop, model, o, x, y)
        assert t.begin()
        loss = fwd_bwd()
        o.step()
        sched.step()
        stands = t.judge(loss, fwd_bwd, framework="after_step")
        if stands and t.reran:
            sched.step()  # the restore undid the scheduler step along with the optimizer's
    assert_same(full_state(model, o, sched), plain(data, skip={9}))


def test_judge_without_begin_and_guard_with_framework_are_refused():
    model, o, _ = setup()
    rw = Rewind(model, o)
    t = FaultTriage(rw)
    with pytest.raises(RewindError, match="no iteration was begun"):
        t.judge(1.0, lambda: 1.0)
    t2 = FaultTriage(rw, guard=NonFiniteGuard(rw))
    t2.begin()
    with pytest.raises(RewindValueError, match="step\\(loss_fn\\) only"):
        t2.judge(1.0, lambda: 1.0, framework="before_step")
    with pytest.raises(RewindValueError, match="framework must be one of"):
        t.judge(1.0, lambda: 1.0, framework="lightning")


# ============================================================================================ state


def test_resume_from_state_dict_continues_exactly(tmp_path):
    data = make_data(40, nan={25})
    kw = dict(inject=logits, check=BIG, detector=SpikeDetector(warmup=5, threshold=1e9), quarantine=None,
              max_transient=3, window=50)  # fmt: skip
    full = Run(**kw).train(data, arm_at={10, 30})
    part = Run(**{**kw, "detector": SpikeDetector(warmup=5, threshold=1e9)}).train(data, arm_at={10}, stop=18)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": part.model.state_dict(), "opt": part.opt.state_dict(), "sched": part.sched.state_dict(),
                "triage": part.triage.state_dict(), "rng": torch.get_rng_state()}, ckpt)  # fmt: skip
    sd = torch.load(ckpt, weights_only=True)
    res = Run(**{**kw, "detector": SpikeDetector(warmup=5, threshold=1e9)})
    res.model.load_state_dict(sd["model"])
    res.opt.load_state_dict(sd["opt"])
    res.sched.load_state_dict(sd["sched"])
    res.triage.load_state_dict(sd["triage"])
    torch.set_rng_state(sd["rng"])
    res.train(data, arm_at={30}, start=18)
    assert_same(ordered(res.state()), ordered(full.state()))  # load_state_dict reorders param_group keys
    assert json.dumps(res.triage.faults) == json.dumps(full.triage.faults) and res.triage.iteration == 40
    assert [(e.iteration, e.kind, e.reason) for e in res.triage.log] == [
        (e.iteration, e.kind, e.reason) for e in full.triage.log
    ]
    assert res.triage.state_dict()["transients"] == [[10, 0], [30, 0]]
    assert res.triage.detector.count == full.triage.detector.count


def test_state_dict_is_plain_data_and_refuses_other_settings(tmp_path):
    r = Run(quarantine=tmp_path / "q.jsonl").train(make_data(10, nan={4}))
    sd = r.triage.state_dict()
    json.dumps(sd, default=str)
    assert sd["type"] == "FaultTriage" and sd["quarantine"]["entries"][0]["batch"] == 4
    other = FaultTriage(Rewind(*setup()[:2]), max_transient=7)
    with pytest.raises(RewindValueError, match="max_transient: 3 saved, 7 here"):
        other.load_state_dict(sd)
    other.load_state_dict(sd, strict=False)
    assert other.iteration == 10 and other.max_transient == 7 and other.quarantine is None
    bad = {**sd, "transients": [[1, 2, 3]]}
    fresh = FaultTriage(Rewind(*setup()[:2]))
    with pytest.raises(RewindValueError, match="transients"):
        fresh.load_state_dict(bad)
    assert fresh.iteration == 0  # refused before anything changed


def test_quarantine_from_a_saved_state_without_the_file():
    r = Run(quarantine=Quarantine()).train(make_data(10, nan={4}))
    again = Run(quarantine=Quarantine())
    again.triage.load_state_dict(r.triage.state_dict())
    assert 4 in again.triage.quarantine and again.triage.quarantine.path is None


# ============================================================================================ pieces


def test_quarantine_file_format(tmp_path):
    p = tmp_path / "q.jsonl"
    q = Quarantine(p)
    assert q.add([3, 1, 2], iteration=5) and not q.add((3, 1, 2))  # tuples and lists are the same id
    assert q.add(torch.tensor([7, 8]), reason="x")
    assert [3, 1, 2] in q and (7, 8) in q and [1, 2, 3] not in q and len(q) == 2
    with open(p, "a") as f:
        f.write('{"batch": 9, "iter')  # a crash in the middle of a write: ignored
    assert Quarantine(p).ids == [[3, 1, 2], [7, 8]]
    p.write_text('{"batch": 1}\nnot json\n{"batch": 2}\n')
    with pytest.raises(RewindValueError, match="line 2 .* not JSON"):
        Quarantine(p)
    with pytest.raises(RewindTypeError, match="JSON data"):
        Quarantine().add(object())
    reader = Quarantine(tmp_path / "r.jsonl", write=False)
    reader.add(1)
    assert 1 in reader and not (tmp_path / "r.jsonl").exists()


def test_flip_bit_and_the_injector():
    assert flip_bit(torch.tensor([0.5]))[0] == 0.5 * 2.0**128
    assert flip_bit(torch.tensor([4.0]))[0] == 4.0 / 2.0**128  # the top exponent bit of a value >= 2 is set
    assert flip_bit(torch.tensor([0.5]), bit=31)[0] == -0.5
    assert flip_bit(torch.tensor([0.5], dtype=torch.float64), bit=63)[0] == -0.5
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        t = torch.tensor([0.25, 0.5], dtype=dt)
        assert flip_bit(flip_bit(t, 1), 1).equal(t) and not flip_bit(t, 1).equal(t)
    assert flip_bit(torch.tensor([5], dtype=torch.int32), bit=1)[0] == 7
    with pytest.raises(RewindValueError, match="bit must be < 32"):
        flip_bit(torch.tensor([1.0]), bit=32)
    with pytest.raises(RewindValueError, match="pass bit="):
        flip_bit(torch.tensor([1]))
    lin = torch.nn.Linear(3, 2)
    with FaultInjector(lin, kind="scale", factor=2.0) as inj:
        x = torch.ones(1, 3)
        y0 = lin(x)
        inj.arm(2)
        assert lin(x).equal(y0 * 2) and lin(x).equal(y0 * 2) and lin(x).equal(y0) and inj.fired == 2
        inj.arm(None)
        for _ in range(3):
            lin(x)
        assert inj.fired == 5 and inj.armed
    assert not inj.armed and lin(x).equal(y0)  # removed on exit
    with pytest.raises(RewindValueError, match="does not require grad"):
        FaultInjector(torch.zeros(2))
    gru = torch.nn.GRU(2, 3, batch_first=True)
    inj = FaultInjector(gru, kind="scale", factor=0.0).arm()
    out, h = gru(torch.ones(1, 4, 2))
    assert out.abs().sum() == 0 and h.abs().sum() > 0  # the first tensor of a tuple


def test_outcome_comparison_is_bitwise():
    assert same_number(float("nan"), float("nan")) and not same_number(0.0, -0.0)
    assert not same_number(1.0, 1.0 + 2**-52) and same_number(1.0, 1.0 + 2**-52, 1e-12)
    assert Outcome(1.0, 2.0, 5).differs(Outcome(1.0, 2.0, 6)) == (False, True)
    assert Outcome(1.0, 2.0, 5).differs(Outcome(1.0, 2.0, 6), tolerance=1e-3) == (False, False)  # no checksum
    p = torch.nn.Parameter(torch.ones(3))
    o = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    c = grad_checksum(o)
    p.grad = flip_bit(p.grad, 2, 0)  # the lowest mantissa bit
    assert grad_checksum(o) != c


def test_argument_checks():
    model, o, _ = setup()
    rw = Rewind(model, o)
    with pytest.raises(RewindTypeError, match="needs a torchrewind.Rewind"):
        FaultTriage(model)
    with pytest.raises(RewindValueError, match="on_reproducible must be one of"):
        FaultTriage(rw, on_reproducible="ignore")
    with pytest.raises(RewindValueError, match="'rollback' hands the fault to a guard"):
        FaultTriage(rw, on_reproducible="rollback")
    with pytest.raises(RewindTypeError, match="detector must be a SpikeDetector"):
        FaultTriage(rw, detector=3)
    with pytest.raises(RewindTypeError, match="check must be a function"):
        FaultTriage(rw, check="loss > 1")
    with pytest.raises(RewindValueError, match="max_transient must be an int >= 1"):
        FaultTriage(rw, max_transient=0)
    with pytest.raises(RewindValueError, match="tolerance must be a finite number"):
        FaultTriage(rw, tolerance=-1.0)
    with pytest.raises(RewindValueError, match="same Rewind"):
        FaultTriage(rw, guard=NonFiniteGuard(Rewind(*setup()[:2])))
    with pytest.raises(RewindValueError, match="give the detectors to the guard"):
        FaultTriage(rw, guard=NonFiniteGuard(rw), detector=SpikeDetector())
    with pytest.raises(RewindValueError, match="guard's log"):
        FaultTriage(rw, guard=NonFiniteGuard(rw), log=Trajectory())
    with pytest.raises(RewindValueError, match="grad_detector needs check_grads=True"):
        FaultTriage(rw, grad_detector=SpikeDetector(), check_grads=False)
    with pytest.raises(RewindTypeError, match="quarantine must be a file path or a Quarantine"):
        FaultTriage(rw, quarantine=5)
    t = FaultTriage(rw)
    with pytest.raises(RewindTypeError, match="takes a function"):
        t.step(torch.tensor(1.0))
    with pytest.raises(RewindTypeError, match="tensor that requires grad"):
        t.step(lambda: torch.tensor(1.0))
    with pytest.raises(RewindTypeError, match="JSON data"):
        t.step(lambda: model(torch.ones(2, D_IN)).sum(), batch_id=object())
    assert t.state_dict()["iteration"] == 1  # the failed iteration counted; state_dict() works after it


def test_no_fault_no_rerun_one_forward_per_iteration():
    data = make_data(15)
    r = Run(checksum=True).train(data)
    assert r.forwards == list(range(15)) and r.triage.reruns == 0 and r.triage.faults == []
    assert r.triage.log.counts()["accepted"] == 15
    assert_same(r.state(), plain(data))


# ============================================================================================ distributed


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo")
def test_ddp_fault_on_one_rank_transient_and_reproducible(tmp_path):
    pytest.importorskip("sklearn")
    import triage_workers
    from ranks import spawn

    spawn(triage_workers.fault_on_one_rank, str(tmp_path))
