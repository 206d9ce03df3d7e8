"""The disk tier: bitwise round trips, atomic completion (a real kill -9 mid-save), retention, checksums, clear
errors for damaged checkpoints, and resuming in a second process."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("async_save", [False, True])
def test_pipelined_save_of_large_and_small_tensors(tmp_path, async_save):
    """A tensor larger than a checksum block is copied, checksummed and written in pieces while the rest is still
    being copied; the file is the same bytes every time (gaps and padding zeroed), and reads back bitwise."""
    from torchrewind.tiers.disk import BLOCK

    g = torch.Generator().manual_seed(0)
    t = {"big": torch.randn(BLOCK // 4 * 2 + 1000, generator=g), "odd": torch.randn(3, 5, generator=g).t(),
         "small": [torch.randn(7, generator=g) for _ in range(50)], "half": torch.randn(BLOCK // 2 + 1).half()}
    ck = DiskCheckpoints(tmp_path, every=1, async_save=async_save)
    ck.save(1, t)
    ck.save(2, t)
    ck.wait()
    assert _data_file(tmp_path, 1).read_bytes() == _data_file(tmp_path, 2).read_bytes()
    import json

    man = json.loads((tmp_path / "step_000000001" / "manifest.json").read_text())
    assert man["block"] == BLOCK and len(man["files"]["tensors.bin"]["blocks"]) >= 3
    assert values_equal(ck.load(1), t)


def test_a_failed_copy_abandons_the_save_cleanly(tmp_path, monkeypatch):
    """If copying into the staging buffer fails half-way, the background writer is stopped, no checkpoint appears,
    the error is raised once (not again at the next wait), and the next save works."""
    import torchrewind.tiers.disk as disk_mod

    ck = DiskCheckpoints(tmp_path, every=1)
    real, calls = disk_mod._Checksums.feed, []

    def failing(self, ready):
        calls.append(ready)
        if len(calls) == 2:
            raise RuntimeError("copy failed")
        real(self, ready)

    monkeypatch.setattr(disk_mod._Checksums, "feed", failing)
    big = {"x": torch.randn(disk_mod.BLOCK // 4 * 3)}
    with pytest.raises(RuntimeError, match="copy failed"):
        ck.save(1, big)
    ck.wait()
    assert ck.steps() == [] and not ck.saving
    monkeypatch.setattr(disk_mod._Checksums, "feed", real)
    ck.save(2, big)
    assert values_equal(ck.load(2), big) and ck.steps() == [2]


def test_checksum_block_size_comes_from_the_manifest(tmp_path, monkeypatch):
    """A checkpoint written with another block size (e.g. 64 MiB by the first format-2 release) reads back; a
    manifest with an impossible block size is refused."""
    import torchrewind.tiers.disk as disk_mod

    x = {"x": torch.arange(300_000.0)}
    monkeypatch.setattr(disk_mod, "BLOCK", 8192)
    DiskCheckpoints(tmp_path, async_save=False).save(1, x)
    monkeypatch.undo()
    ck = DiskCheckpoints(tmp_path, resume=True)
    assert values_equal(ck.load(1), x)
    raw = bytearray(_data_file(tmp_path).read_bytes())
    raw[600_000] ^= 4  # in the 74th 8 KiB block: located by its block
    _data_file(tmp_path).write_bytes(bytes(raw))
    with pytest.raises(RewindError, match="checksum mismatch at byte 598016"):
        ck.load(1)
    _rewrite_manifest(tmp_path / "step_000000001", lambda m: m.__setitem__("block", 1000))
    with pytest.raises(RewindError, match="malformed"):
        ck.load(1)


def test_arena_images_are_written_whole_and_restored_in_place(tmp_path):
    """Tensors living in an arena are saved as one image of it and found at their place in it; a restore into the
    same arena layout copies the image back whole and loads every tensor into itself; another layout is refused
    (then the tree loads tensor by tensor)."""
    from torchrewind.tiers import copy_images, restore_plan

    arena = torch.zeros(4096, dtype=torch.int64)  # 32 KiB of "arena": two tensors at 64-byte aligned places
    raw = arena.view(torch.uint8)
    w, b = raw[128 : 128 + 4000].view(torch.float32), raw[8192 : 8192 + 20].view(torch.bfloat16)
    w.copy_(torch.randn(1000))
    b.copy_(torch.randn(10))
    loose = torch.randn(3)  # not in the arena: stored after the image
    live = {"w": w, "b": b, "loose": loose, "lr": 0.1}
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in live.items()}
    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, live, arenas=[arena])
    arena.fill_(-1)
    loose.zero_()
    got = ck.read(1)
    assert got.images == [(0, arena.numel() * 8)]
    assert [off for *_, off, _ in got.specs] == [128, 8192, 32768]  # in the image, in the image, after it
    assert values_equal(got.tree, saved)
    copies, tree = restore_plan(got, live, [arena])
    assert len(copies) == 1
    copy_images(copies)
    assert copies == []  # emptied: no view of the arena is left behind
    same = {k: tree[k].data_ptr() == live[k].data_ptr() for k in ("w", "b", "loose")}
    assert same == {"w": True, "b": True, "loose": False}  # image tensors: the live ones (aliases)
    assert torch.equal(w, saved["w"]) and torch.equal(b.view(torch.int16), saved["b"].view(torch.int16))
    assert restore_plan(got, live, [arena[:-8]]) is None  # the arena has another size
    assert restore_plan(got, {**live, "extra": torch.zeros(1)}, [arena]) is None  # the tree has another structure
    moved = {**live, "w": raw[192 : 192 + 4000].view(torch.float32)}
    assert restore_plan(got, moved, [arena]) is None  # a tensor at another place


def test_rollback_from_disk_copies_arena_images_back(tmp_path, monkeypatch):
    """Within a run the arenas keep their layout: rollback_to restores from disk by copying each arena image whole
    (checked through the plan it used), bit for bit."""
    import torchrewind.rewind as rewind_mod

    plans = []  # how many arena images each restore copied (None: tensor by tensor)
    real = rewind_mod.restore_plan

    def spy(*a):
        plan = real(*a)
        plans.append(None if plan is None else len(plan[0]))
        return plan

    monkeypatch.setattr(rewind_mod, "restore_plan", spy)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3)).to(torch.bfloat16)
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rw = Rewind(m, o, rng="all", tiers=Tiers(device=1, disk=DiskCheckpoints(tmp_path, every=4)))
    before = {}
    o.register_step_pre_hook(lambda *a: before.__setitem__(rw.step, full_state(m, o)))
    for _ in range(10):
        o.zero_grad()
        m(torch.randn(8, 6).to(torch.bfloat16)).float().square().mean().backward()
        o.step()
    assert rw.rollback_to(7) == 4  # the device ring holds step 9 only: from disk
    assert plans == [2]  # one copy for the parameters' arena, one for the optimizer state's
    restored = full_state(m, o)
    assert_same(restored, before[4])
    o.zero_grad()
    m(torch.randn(8, 6).to(torch.bfloat16)).float().square().mean().backward()
    o.step()
    rw.undo()  # the restarted device history holds the restored point
    assert_same(full_state(m, o), restored)
    rw.close()


def _data_file(tmp_path, step=1):
    return tmp_path / f"step_{step:09d}" / "tensors.bin"


def test_corruption_and_leftovers(tmp_path):
    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, {"x": torch.arange(1000.0)})
    (tmp_path / "step_000000002.tmp-999").mkdir()  # a crashed save
    assert ck.steps() == [1]
    data = _data_file(tmp_path)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(RewindError, match="corrupt"):
        ck.load(1)
    with pytest.raises(RewindError, match=r"no complete checkpoint for step 7; available: \[1\]"):
        ck.load(7)
    ck.save(2, {"x": torch.zeros(1)})
    assert not (tmp_path / "step_000000002.tmp-999").exists()  # cleaned up by the next save


def _rewrite_manifest(d, edit):
    import json

    man = json.loads((d / "manifest.json").read_text())
    edit(man)
    (d / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("damage", ["truncated", "longer", "skeleton", "manifest", "no-manifest-entry", "old-format",
                                    "bad-dtype", "out-of-range"])  # fmt: skip
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage):
    import json

    ck = DiskCheckpoints(tmp_path, async_save=False)
    ck.save(1, {"x": torch.arange(100_000.0), "n": 1})
    d = tmp_path / "step_000000001"
    if damage == "truncated":
        raw = _data_file(tmp_path).read_bytes()
        _data_file(tmp_path).write_bytes(raw[: len(raw) // 3])
        want = "torn write|does not match"
    elif damage == "longer":
        with open(_data_file(tmp_path), "ab") as f:
            f.write(b"\0" * 10)
        want = "torn write"
    elif damage == "skeleton":
        (d / "skeleton.json").write_text((d / "skeleton.json").read_text().replace('"n"', '"m"'))
        want = "corrupt"
    elif damage == "manifest":
        (d / "manifest.json").write_text("{not json")
        want = "manifest.json is unreadable"
    elif damage == "no-manifest-entry":
        _rewrite_manifest(d, lambda m: m["files"].pop("tensors.bin"))
        want = "malformed"
    elif damage == "old-format":  # a torchrewind 0.1 (DCP) checkpoint: refused by version, nothing unpickled
        _rewrite_manifest(d, lambda m: m.pop("format"))
        want = "checkpoint format 1"
    else:  # a consistent manifest around a skeleton that lies (checksums are not signatures): still refused
        from torchrewind.tiers.disk import _digest

        head = json.loads((d / "skeleton.json").read_text())
        if damage == "bad-dtype":
            head["tensors"][0][0] = "os.system"
            want = "unknown dtype"
        else:
            head["tensors"][0][2] = 1 << 40
            want = "out of range"
        raw = json.dumps(head).encode()
        (d / "skeleton.json").write_bytes(raw)
        _rewrite_manifest(d, lambda m: m["files"].__setitem__("skeleton.json", {"size": len(raw), "blocks": [
            _digest(m["hash"], raw)]}))  # fmt: skip
    with pytest.raises(RewindError, match=want):
        ck.load(1)


def test_corrupt_checkpoint_leaves_the_live_state_untouched(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    o = torch.optim.Adam(m.parameters(), lr=0.1)
    rw = Rewind(m, o, tiers=Tiers(device=1, disk=DiskCheckpoints(tmp_path, every=2, async_save=False)))
    for _ in range(5):
        o.zero_grad()
        m(torch.randn(2, 4)).sum().backward()
        o.step()
    before = full_state(m, o)
    raw = bytearray(_data_file(tmp_path, 2).read_bytes())
    raw[7] ^= 1
    _data_file(tmp_path, 2).write_bytes(bytes(raw))
    assert rw.held_steps() == {"device": [3, 4], "disk": [0, 2, 4]}
    with pytest.raises(RewindError, match="corrupt"):
        rw.rollback_to(2)
    assert_same(full_state(m, o), before)
    assert rw.step == 5


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path):
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    rw = Rewind(a, oa, tiers=Tiers(device=1, disk=DiskCheckpoints(tmp_path, every=1, async_save=False)))
    rw.snapshot()
    rw.close()
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))  # the last layer differs
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    rb = Rewind(b, ob, tiers=Tiers(device=1, disk=DiskCheckpoints(tmp_path, every=1, resume=True)))
    before = full_state(b, ob)
    with pytest.raises(RewindError, match=r"model 0 key '1.weight' is \(4, 4\)"):
        rb.rollback_to(0)
    assert_same(full_state(b, ob), before)


def test_bad_input(tmp_path):
    with pytest.raises(RewindError, match="every must be an int >= 1"):
        DiskCheckpoints(tmp_path, every=0)
    with pytest.raises(RewindError, match="keep_last must be"):
        DiskCheckpoints(tmp_path, keep_last=0)
    with pytest.raises(RewindError, match="contradict"):
        DiskCheckpoints(tmp_path, resume=True, overwrite=True)
    with pytest.raises(TypeError, match="resume must be True or False"):
        DiskCheckpoints(tmp_path, resume="yes")
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
    ck = DiskCheckpoints(tmp_path, resume=True)
    assert ck.steps() == [1]  # ... but only the complete checkpoint counts
    back = ck.load(1)
    assert torch.equal(back["x"], torch.arange(10.0)) and back["n"] == 1


# ------------------------------------------------------------------------------------------ restart in a new process
TRAIN = textwrap.dedent(
    """
    import sys, time, torch, torch.nn.functional as F
    sys.path.insert(0, sys.argv[4])
    from statecheck import full_state
    from torchrewind import DiskCheckpoints, Rewind, Tiers
    import torchrewind.tiers.disk as disk_mod

    directory, total, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                            torch.nn.Linear(16, 3))
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    s = torch.optim.lr_scheduler.StepLR(o, 4, 0.5)
    ck = DiskCheckpoints(directory, every=5, keep_last=10, resume=True)
    rw = Rewind(m, o, schedulers=[s], rng="all", tiers=Tiers(device=1, disk=ck))
    print("held", rw.held_steps()["disk"], flush=True)
    start = rw.rollback_to(ck.latest or 0)         # the one-line resume: 0 in a fresh directory
    print("start", start, rw.step, flush=True)
    if mode == "hang-at-15":                        # a save that never finishes: the parent kills us mid-write
        real = disk_mod._stream_file
        def slow(path, *args, **kw):
            if "step_000000015" in str(path):
                print("saving 15", flush=True)
                time.sleep(60)
            return real(path, *args, **kw)
        disk_mod._stream_file = slow
    while rw.step < total:
        g = torch.Generator().manual_seed(rw.step)  # the batch of each step, whichever process takes it
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        rw.snapshot()  # the point (and checkpoint) at the top of the iteration: before forward's dropout and BN
        o.zero_grad()
        F.mse_loss(m(x), y).backward()
        o.step()
        s.step()
    ck.wait()
    torch.save(full_state(m, o, s), directory + f"/../final-{mode}.pt")
    print("done", rw.step, flush=True)
    """
)
TESTS = os.path.dirname(os.path.abspath(__file__))


def _train(directory, total, mode, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(directory), str(total), mode, TESTS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_resume_after_kill_9_mid_save_continues_bitwise(tmp_path):
    """Run 1 is killed (-9) while writing step 15's checkpoint; run 2, the same script, resumes from step 10 with one
    line and ends bitwise where an uninterrupted run ends (parameters, optimizer, scheduler, RNG)."""
    ref = _train(tmp_path / "ref", 22, "ref")  # the uninterrupted run, alongside the one that is killed
    crash = tmp_path / "crash"
    p = _train(crash, 22, "hang-at-15")
    while (line := p.stdout.readline()) and line.strip() != "saving 15":
        pass
    assert line.strip() == "saving 15"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    assert "start 0 0" in out  # a fresh directory: rollback_to(0) is the live state
    assert sorted(x.name for x in crash.iterdir() if ".tmp-" in x.name)  # the torn save is there ...

    again = _train(crash, 22, "resumed")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "held [0, 5, 10]" in out and "start 10 10" in out  # ... and ignored: resumed at the newest complete one
    assert_same(torch.load(tmp_path / "final-resumed.pt"), torch.load(tmp_path / "final-ref.pt"))
    assert DiskCheckpoints(crash, resume=True).steps() == [0, 5, 10, 15, 20]


def _small(tmp_path, **kw):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    o = torch.optim.Adam(m.parameters(), lr=0.1)
    ck = DiskCheckpoints(tmp_path, every=5, async_save=False, **kw)
    return m, o, ck, Rewind(m, o, tiers=Tiers(device=1, disk=ck))


def _steps(m, o, n):
    for _ in range(n):
        o.zero_grad()
        m(torch.randn(2, 3)).sum().backward()
        o.step()


def test_a_directory_with_checkpoints_is_never_reused_silently(tmp_path):
    m, o, ck, rw = _small(tmp_path)
    _steps(m, o, 15)
    saved15 = full_state(m, o)  # what the point recorded before step 16 holds
    _steps(m, o, 1)
    rw.close()
    assert ck.steps() == [0, 5, 10, 15]
    with pytest.raises(RewindError, match=r"already holds checkpoints of steps \[0, 5, 10, 15\].*resume=True.*"
                                          r"overwrite=True"):  # fmt: skip
        DiskCheckpoints(tmp_path)
    # resume=True but training starts without restoring: refused at the first step, nothing deleted
    m2, o2, ck2, rw2 = _small(tmp_path, resume=True)
    assert rw2.held_steps()["disk"] == [0, 5, 10, 15]
    with pytest.raises(RewindError, match=r"earlier run .* rw.rollback_to\(ck.latest\)"):
        _steps(m2, o2, 1)
    assert ck2.steps() == [0, 5, 10, 15]
    rw2.close()
    # resume=True in a fresh Rewind: every listed step is reachable, forward from the live step 0
    m3, o3, ck3, rw3 = _small(tmp_path, resume=True)
    assert rw3.step == 0 and ck3.latest == 15
    assert rw3.rollback_to(15) == 15 and rw3.step == 15
    assert_same(full_state(m3, o3)["model"], saved15["model"])
    assert_same(full_state(m3, o3)["opt_state"], saved15["opt_state"])
    assert rw3.rollback_to(7) == 5  # and backward, as in the first run
    _steps(m3, o3, 1)  # a new branch from step 5: the earlier run's later checkpoints go, as an undone branch would
    assert ck3.steps() == [0, 5]
    rw3.close()
    # overwrite=True: an explicit fresh start
    m4, o4, ck4, rw4 = _small(tmp_path, overwrite=True)
    assert ck4.steps() == []
    _steps(m4, o4, 1)
    assert ck4.steps() == [0]
