"""CUDA paths: fused/capturable optimizers, GradScaler with fp16 autocast, CUDA RNG, mixed-device models.

Skipped cleanly without a CUDA device (CI has none)."""

from __future__ import annotations

import pytest
import torch
from statecheck import assert_same, full_state

from torchrewind import Rewind

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model(device="cuda"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 8),
    ).to(device)  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True, foreach=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
    ],
    ids=["adam-fused", "adamw-fused-amsgrad", "adam-capturable", "sgd-fused", "adagrad-fused"],
)
def test_cuda_optimizers_exact(make):
    g = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(16, 32, device="cuda", generator=g), torch.randn(16, 8, device="cuda", generator=g))
            for _ in range(5)]  # fmt: skip

    def run(undo_at):
        model = _model()
        opt = make(model.parameters())
        rw = Rewind(model, opt, capacity=2) if undo_at else None
        torch.cuda.manual_seed(3)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            if i in undo_at:
                rw.undo()
                opt.step()
        torch.cuda.synchronize()
        return full_state(model, opt)

    assert_same(run(set()), run({0, 2, 4}))


def test_gradscaler_fp16_autocast_with_overflow():
    g = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randn(16, 32, device="cuda", generator=g), torch.randn(16, 8, device="cuda", generator=g))
            for _ in range(6)]  # fmt: skip

    def run(rollback):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=2)
        rw = Rewind(model, opt, scaler=scaler, capacity=2, auto=False) if rollback else None
        torch.cuda.manual_seed(3)
        for i, (x, y) in enumerate(data):
            for attempt in range(2 if rollback and i % 2 else 1):
                t = rw.trial().__enter__() if rw else None
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = ((model(x) - y) ** 2).mean()
                if i == 3:
                    loss = loss * 1e30  # fp16 overflow -> inf grads -> skipped step, scale backoff
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if t is not None:
                    if attempt == 0 and i % 2:
                        t.rollback()
                    t.__exit__(None, None, None)
        torch.cuda.synchronize()
        st = full_state(model, opt)
        st["scale"] = (scaler._scale.clone(), scaler._growth_tracker.clone())
        st["cuda_rng"] = torch.cuda.get_rng_state()
        return st

    assert_same(run(False), run(True))


def test_cuda_dropout_repeats_after_rollback():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rw = Rewind(model, opt)
    x = torch.randn(16, 32, device="cuda")
    with rw.trial() as t:
        a = model(x)
        t.rollback()
    b = model(x)
    assert torch.equal(a, b)


def test_mixed_devices_one_arena_each():
    torch.manual_seed(0)
    cpu_part = torch.nn.Linear(8, 8)
    gpu_part = torch.nn.Linear(8, 8).cuda()
    opt = torch.optim.Adam([*cpu_part.parameters(), *gpu_part.parameters()], lr=0.1)
    rw = Rewind([cpu_part, gpu_part], opt, capacity=2)
    devices = {a.device.type for a in rw._tracker.arenas.values()}
    assert devices == {"cpu", "cuda"}
    x = torch.randn(4, 8)
    before = None
    for i in range(3):
        opt.zero_grad()
        (gpu_part(cpu_part(x).cuda()).sum()).backward()
        if i == 2:
            before = full_state(None, opt)
        opt.step()
    rw.undo()
    after = full_state(None, opt)
    after["rng"] = before["rng"]
    assert_same(before, after)
    assert all(w.device.type == k[0].type for s in rw._ring.slots for k, w in s.words.items())


@pytest.mark.parametrize("redo", [True, False])
def test_overlap_side_stream_matches_blocking(redo):
    """overlap=True on CUDA: the side-stream copy of the next undo point gives the same history as blocking."""
    runs = []
    for overlap in (False, True):
        m = _model()
        o = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
        runs.append((m, o, Rewind(m, o, capacity=2, redo=redo, overlap=overlap)))
    torch.manual_seed(1)
    cuda_rng = torch.cuda.get_rng_state()
    states = []
    for m, o, rw in runs:
        torch.cuda.set_rng_state(cuda_rng)
        g = torch.Generator(device="cuda").manual_seed(3)
        for k in range(4):
            x = torch.randn(16, 32, device="cuda", generator=g)
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
            if k == 2:
                rw.undo()
        rw.undo(2)
        states.append(full_state(m, o))
    assert_same(states[0], states[1])


@pytest.mark.parametrize("overlap", [False, True])
def test_host_storage_pinned_slots_are_exact(overlap):
    """storage="host": the ring of a CUDA model lives in pinned CPU memory; undo/redo and the host archive exact."""
    from torchrewind import HostArchive, Tiers

    m = _model()
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    rw = Rewind(m, o, storage="host", overlap=overlap, tiers=Tiers(device=2, host=HostArchive(keep=8, compress=False)))
    before = {}
    o.register_step_pre_hook(lambda *a: before.__setitem__(rw.step, full_state(m, o)))
    g = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(6):
        x = torch.randn(16, 32, device="cuda", generator=g)
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert all(v.device.type == "cpu" and v.is_pinned() for s in rw._ring.slots for v in s.views.values())
    rw.undo()
    assert_same(full_state(m, o), before[5])
    assert rw.rollback_to(2) == 2
    assert_same(full_state(m, o), before[2])
