"""The disk tier: bitwise round trips, atomic completion (a real kill -9 mid-save), retention, checksums, and a
loader that refuses to unpickle anything but checkpoint metadata."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from statecheck import assert_same, full_state

from torchrewind import DiskCheckpoints, Rewind, RewindError, Tiers
from torchrewind.core.values import values_equal


def tree() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 3, generator=g),
        "special": torch.tensor([float("nan"), -0.0, float("inf"), 1e-40]),
        "bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).half(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.tensor(7),
        "empty": torch.empty(0, 3),
        "strided": torch.randn(4, 6, generator=g).t(),
        "py": {"int": 3, "float": 0.1, "inf": float("inf"), "none": None, "s": "x", "b": True, 5: "int key"},
        "betas": (0.9, 0.999),
        "list": [1, (2, [3.5, None]), {"dtype": torch.float16}],
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise(tmp_path, async_save):
    ck = DiskCheckpoints(tmp_path, every=1, async_save=async_save)
    t = tree()
    ck.save(3, t)
    ck.wait()
    back = ck.load(3)
    assert values_equal(back, t)  # raw bits for tensors, exact Python values and types (tuples stay tuples)
    assert isinstance(back["betas"], tuple) and 5 in back["py"] and back["list"][2]["dtype"] is torch.float16
    assert ck.steps() == [3] and ck.nbytes > 0


def test_retention_keep_last_and_keep_every(tmp_path):
    ck = DiskCheckpoints(tmp_path, every=10, keep_last=2, keep_every=30, async_save=False)
    assert ck.due(20) and not ck.due(25)
    for s in range(0, 100, 10):
        ck.save(s, {"x": torch.tensor(float(s))})
    assert ck.steps() == [0, 30, 60, 80, 90]
    assert ck.latest_at_or_before(75) == 60 and ck.latest_at_or_before(-1) is None
    ck.discard_after(60)
    assert ck.steps() == [0, 30, 60]


def test_discarding_an_older_branch_does_not_wait_for_a_save_in_flight(tmp_path, monkeypatch):
    ck = DiskCheckpoints(tmp_path, every=1)
    ck.save(1, {"x": torch.zeros(1)})
    ck.wait()
    gate = threading.Event()
    real = ck._write

    def slow_write(*a):
        gate.wait(10)
        real(*a)

    monkeypatch.setattr(ck, "_write", slow_write)
    ck.save(5, {"x": torch.ones(1)})
    ck.discard_after(5)  # nothing newer than 5 anywhere: returns at once, the save still in flight
    assert ck._thread is not None and ck._thread.is_alive()
    gate.set()
    ck.discard_after(3)  # the save in flight (step 5) belongs to the discarded branch: waited for, then deleted
    assert ck.steps() == [1]


def test_corruption_and_leftovers(tmp_path):
    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, {"x": torch.arange(1000.0)})
    (tmp_path / "step_000000002.tmp-999").mkdir()  # a crashed save
    assert ck.steps() == [1]
    data = next(p for p in (tmp_path / "step_000000001").iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(RewindError, match="corrupt"):
        ck.load(1)
    with pytest.raises(RewindError, match=r"no complete checkpoint for step 7; available: \[1\]"):
        ck.load(7)
    ck.save(2, {"x": torch.zeros(1)})
    assert not (tmp_path / "step_000000002.tmp-999").exists()  # cleaned up by the next save


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_to_unpickle_foreign_metadata(tmp_path):
    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, {"x": torch.zeros(2)})
    d = tmp_path / "step_000000001"
    (d / ".metadata").write_bytes(pickle.dumps(_Evil()))
    # an attacker who can write the directory can also rewrite the manifest: the unpickler must still refuse
    import hashlib
    import json

    man = json.loads((d / "manifest.json").read_text())
    raw = (d / ".metadata").read_bytes()
    man["files"][".metadata"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RewindError, match="posix.system|os.system|refusing"):
        ck.load(1)


def _proto4_global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling module.name(arg): STACK_GLOBAL resolves dotted names attribute by attribute."""

    def unicode(x: str) -> bytes:
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE

    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93" + unicode(arg) + b"\x85R."


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.mkdir"),  # a dotted name through an allowed module's imports
    ("torch", "load"),
    ("builtins", "eval"),
])  # fmt: skip
def test_refuses_dotted_and_foreign_globals(tmp_path, module, name):
    import hashlib
    import json

    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, {"x": torch.zeros(2)})
    d = tmp_path / "step_000000001"
    marker = tmp_path / "pwned"
    raw = _proto4_global_call(module, name, str(marker))
    (d / ".metadata").write_bytes(raw)
    man = json.loads((d / "manifest.json").read_text())
    man["files"][".metadata"] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RewindError, match="refusing"):
        ck.load(1)
    assert not marker.exists()


def test_bad_input(tmp_path):
    with pytest.raises(RewindError, match="every must be an int >= 1"):
        DiskCheckpoints(tmp_path, every=0)
    with pytest.raises(RewindError, match="keep_last must be"):
        DiskCheckpoints(tmp_path, keep_last=0)
    ck = DiskCheckpoints(tmp_path, async_save=False)
    with pytest.raises(RewindError, match=r"tree\['sched'\]\['fn'\] is a function"):
        ck.save(1, {"sched": {"fn": lambda e: 1.0}})
    with pytest.raises(RewindError, match="only str and int keys"):
        ck.save(1, {(1, 2): 3})
    assert ck.steps() == []  # nothing half-written


@pytest.mark.parametrize("state", ["kept", "cleared"], ids=["in-place", "load_state_dict"])
def test_rewind_rollback_from_disk_is_exact(tmp_path, state):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    s = torch.optim.lr_scheduler.StepLR(o, 3, 0.5)
    rw = Rewind(m, o, schedulers=[s], rng="all", tiers=Tiers(device=2, disk=DiskCheckpoints(tmp_path, every=5)))
    before = {}
    o.register_step_pre_hook(lambda *a: before.__setitem__(rw.step, full_state(m, o, s)))
    for _ in range(23):
        o.zero_grad()
        m(torch.randn(8, 6)).square().mean().backward()
        o.step()
        s.step()
    if state == "cleared":  # no state tensors to copy into: the load_state_dict path, then re-binding
        o.state.clear()
    assert rw.rollback_to(17) == 15
    assert_same(full_state(m, o, s), before[15])
    o.zero_grad()
    m(torch.randn(8, 6)).square().mean().backward()
    o.step()  # a new branch from step 15: later checkpoints are discarded
    rw.tiers.disk.wait()
    assert rw.tiers.disk.steps() == [0, 5, 10, 15] and len(rw) == 1
    rw.close()


CHILD = textwrap.dedent(
    """
    import sys, torch
    from torchrewind import DiskCheckpoints
    ck = DiskCheckpoints(sys.argv[1], async_save=False)
    ck.save(1, {"x": torch.arange(10.0), "n": 1})
    print("saved 1", flush=True)
    big = {f"w{i}": torch.ones(25_000_000) for i in range(12)}   # 1.2 GB: the write takes a while
    print("saving 2", flush=True)
    ck.save(2, big)
    print("saved 2", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_kill_9_during_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    assert proc.stdout.readline().strip() == "saving 2"
    deadline = time.time() + 60
    tmp = None
    while time.time() < deadline:  # wait until step 2's data file is being written
        tmp = next((p for p in tmp_path.iterdir() if ".tmp-" in p.name), None)
        if tmp is not None and any(f.stat().st_size > 0 for f in tmp.iterdir()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp is not None and tmp.exists()  # killed mid-write: the half-written directory is there ...
    assert not (tmp / "manifest.json").exists()
    ck = DiskCheckpoints(tmp_path)
    assert ck.steps() == [1]  # ... but only the complete checkpoint counts
    back = ck.load(1)
    assert torch.equal(back["x"], torch.arange(10.0)) and back["n"] == 1
