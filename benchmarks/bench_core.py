#!/usr/bin/env python
"""Core benchmark of torchrewind: snapshot / restore cost against a plain memcpy, the usual
``copy.deepcopy(state_dict())`` recipe and a ``torch._foreach_copy_`` baseline, plus the per-iteration overhead
of ``Rewind`` on small real training loops.

Usage::

    python benchmarks/bench_core.py                 # full run (< 3 min on 2 CPU cores)
    python benchmarks/bench_core.py --quick         # smoke run (~20 s on a 2-core machine): small models, few repeats
    python benchmarks/bench_core.py --json out.json # also write every number as JSON

Everything is measured in one process, with the methods interleaved round by round (so slow drift of the machine
hits them alike); each timed region is preceded by ``gc.collect()``. Times are reported as best-of and median.
The targets are printed as PASS/FAIL and stored in the JSON; nothing here asserts on a timing, and the exit
status is 0 whatever the numbers.

Targets (judged on the median over rounds of the ratio measured within one round, so a slow drift of the machine or
one lucky sample does not decide; best / best is shown too):
  * snapshot <= 1.3x bound and restore <= 1.3x bound, on both models, where *bound* is one ``copy_`` of an int64
    tensor as large as the training state (params + Adam exp_avg + exp_avg_sq + step, arena ``used`` bytes);
  * torchrewind round trip (snapshot + restore) >= 10x faster than the deepcopy/load_state_dict recipe on the
    many-small-tensors model.

The compiled-step part (skipped with ``--quick``) times ``torch.compile(opt.step)`` with and without a Rewind and
counts Dynamo's graphs: the step hooks are kept out of tracing, so both compile the same number of graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchrewind import Rewind

SNAP_TARGET = 1.3  # snapshot and restore: at most this many times the bound (one flat memcpy)
ROUND_TRIP_TARGET = 10.0  # torchrewind round trip: at least this many times faster than the seed recipe

perf = time.perf_counter


# ---------------------------------------------------------------------------------------------------- helpers
def summary(samples: list[float]) -> dict[str, Any]:
    """Seconds in, milliseconds out."""
    ms = [s * 1e3 for s in samples]
    return {"best_ms": min(ms), "median_ms": statistics.median(ms), "n": len(ms), "samples_ms": ms}


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Everything alive now (the imports, torch's lazily imported compiler modules, the models just built) leaves the
    cyclic collector's view while measuring, so each ``gc.collect()`` before a timed region takes milliseconds rather
    than ~0.1-0.3 s (``--quick`` spent 24 of its 37 s collecting)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t0 = perf()
    fn()
    return perf() - t0


def fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------- models
class Stack(torch.nn.Module):
    """``n`` Linear(d, d) layers with bias: 2n parameter tensors. Never run forward in the core benchmark:
    gradients are set directly, which is all ``Adam.step`` needs."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))


CORE_MODELS = {
    # name: (layers, width) full run, (layers, width) quick run
    "few large tensors": ((8, 1120), (8, 280)),  # 8 x (1120^2 + 1120) = 10.04M params in 16 tensors
    "many small tensors": ((800, 46), (200, 46)),  # 800 x (46^2 + 46) = 1.73M params in 1600 tensors
}


def build(n: int, d: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = Stack(n, d)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2  # kept for the whole run: every step() is a real step
    return m, opt


def state_tensors(m: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(m.parameters())
    for p in m.parameters():
        out.extend(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    return out


# ---------------------------------------------------------------------------------------------------- core
def bench_core(name: str, n: int, d: int, repeats: int) -> dict[str, Any]:
    # Four identical copies of the model: A for snapshot/restore (redo=False), B for undo with redo kept,
    # C plain (seed recipe and foreach baseline). Rewinds are built before the warm-up step, as a user would.
    mA, oA = build(n, d, 0)
    mB, oB = build(n, d, 0)
    mC, oC = build(n, d, 0)
    rwA = Rewind(mA, oA, capacity=1, redo=False, auto=True, grads=False)
    rwB = Rewind(mB, oB, capacity=1, redo=True, auto=True, grads=False)
    for o in (oA, oB, oC):
        o.step()  # warm-up: Adam moments exist from here on
        o.step()
    rwA.snapshot()  # steady state: slot buffers allocated, optimizer state re-homed
    oA.step()
    rwA.undo()
    oB.step()
    rwB.undo()
    oB.step()
    rwB.undo()

    live = state_tensors(mC, oC)
    n_tensors = len(live)
    state_bytes = sum(t.numel() * t.element_size() for t in live)
    used = sum(a.used for a in rwA._tracker.arenas.values())
    homed = sum(len(a.entries) for a in rwA._tracker.arenas.values())
    notes = []
    if homed != n_tensors:
        notes.append(f"arena holds {homed} tensors, expected {n_tensors}: not measuring the flat path")

    # Sanity (not timed, not asserted): undo really brings the bits back.
    before = [t.clone() for t in state_tensors(mA, oA)]
    oA.step()
    rwA.undo()
    if not all(torch.equal(a, b) for a, b in zip(before, state_tensors(mA, oA))):
        notes.append("undo did not restore the state bit for bit")
    del before

    # Bound: one flat copy of exactly the arena's used bytes.
    src = torch.randint(-(2**62), 2**62, (used // 8,), dtype=torch.int64)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages

    # Foreach baseline buffers, and one seed-recipe warm-up.
    clones = [t.detach().clone() for t in live]
    torch._foreach_copy_(clones, live)
    sd = (copy.deepcopy(mC.state_dict()), copy.deepcopy(oC.state_dict()))
    mC.load_state_dict(sd[0])
    oC.load_state_dict(sd[1])
    live = state_tensors(mC, oC)  # load_state_dict may replace optimizer-state tensors
    del sd

    names = [
        "bound", "snapshot", "restore", "undo_redo_kept", "seed_snapshot", "seed_restore", "seed_round_trip",
        "foreach_snapshot", "foreach_restore", "rewind_round_trip",
    ]  # fmt: skip
    t: dict[str, list[float]] = {k: [] for k in names}

    def run_bound() -> None:
        t["bound"].append(timed(lambda: dst.copy_(src)))

    def run_rewind() -> None:
        # snapshot, a real step (not timed; the pre-step hook sees the fresh snapshot and skips its own), restore
        s = timed(rwA.snapshot)
        oA.step()
        r = timed(rwA.undo)
        t["snapshot"].append(s)
        t["restore"].append(r)
        t["rewind_round_trip"].append(s + r)

    def run_redo_kept() -> None:
        oB.step()  # the pre-step hook records the state (not timed)
        t["undo_redo_kept"].append(timed(rwB.undo))

    def run_seed() -> None:
        nonlocal live
        box: dict[str, Any] = {}

        def snap() -> None:
            box["m"] = copy.deepcopy(mC.state_dict())
            box["o"] = copy.deepcopy(oC.state_dict())

        def load() -> None:
            mC.load_state_dict(box["m"])
            oC.load_state_dict(box["o"])

        s = timed(snap)
        oC.step()
        r = timed(load)
        t["seed_snapshot"].append(s)
        t["seed_restore"].append(r)
        t["seed_round_trip"].append(s + r)
        box.clear()
        live = state_tensors(mC, oC)

    @torch.no_grad()
    def run_foreach() -> None:
        t["foreach_snapshot"].append(timed(lambda: torch._foreach_copy_(clones, live)))
        oC.step()
        t["foreach_restore"].append(timed(lambda: torch._foreach_copy_(live, clones)))

    methods = [run_bound, run_rewind, run_redo_kept, run_seed, run_foreach]
    with frozen_gc():
        for i in range(repeats):
            k = i % len(methods)
            for fn in methods[k:] + methods[:k]:  # rotate the order every round
                fn()

    res = {k: summary(v) for k, v in t.items()}
    out: dict[str, Any] = {
        "model": name,
        "layers": n,
        "width": d,
        "params": sum(p.numel() for p in mC.parameters()),
        "param_tensors": sum(1 for _ in mC.parameters()),
        "tensors": n_tensors,
        "state_bytes": state_bytes,
        "arena_used_bytes": used,
        "arena_tensors": homed,
        "repeats": repeats,
        "times": res,
        "notes": notes,
    }

    def ratio(a: str, b: str, stat: str) -> float:
        return res[a][stat] / res[b][stat]

    def paired(a: str) -> float:
        """Median over rounds of (a / bound) within the same round: robust to slow drift of the machine."""
        return statistics.median(x / b for x, b in zip(t[a], t["bound"]))

    out["paired_median_ratio_to_bound"] = {
        k: paired(k) for k in ("snapshot", "restore", "undo_redo_kept", "foreach_snapshot", "foreach_restore")
    }
    out["ratios"] = {
        stat: {
            "snapshot_vs_bound": ratio("snapshot", "bound", stat),
            "restore_vs_bound": ratio("restore", "bound", stat),
            "undo_redo_kept_vs_bound": ratio("undo_redo_kept", "bound", stat),
            "round_trip_speedup_vs_seed": ratio("seed_round_trip", "rewind_round_trip", stat),
            "round_trip_speedup_vs_foreach": (
                (res["foreach_snapshot"][stat] + res["foreach_restore"][stat]) / res["rewind_round_trip"][stat]
            ),
        }
        for stat in ("best_ms", "median_ms")
    }
    return out


# ---------------------------------------------------------------------------------------------------- training
def digits_task(batch: int) -> tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    batches = [(X[perm[i : i + batch]], y[perm[i : i + batch]]) for i in range(0, len(X) - batch + 1, batch)]

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )  # fmt: skip

    return model, lambda i: batches[i % len(batches)]


def transformer_task(
    d_model: int, layers: int, seq: int, batch: int, nbatches: int = 8
) -> tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]:
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(
                d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True
            )
            self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d_model, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x).mean(1))

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, seq, d_model, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(nbatches)
    ]
    return Encoder, lambda i: batches[i % len(batches)]


def cnn_task(
    width: int, size: int, batch: int, nbatches: int = 8
) -> tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]:
    def model() -> torch.nn.Module:
        c = width

        def block(i: int, o: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

        return torch.nn.Sequential(
            *block(3, c), torch.nn.MaxPool2d(2),
            *block(c, 2 * c), torch.nn.MaxPool2d(2),
            *block(2 * c, 4 * c), *block(4 * c, 4 * c), torch.nn.MaxPool2d(2),
            *block(4 * c, 8 * c), *block(8 * c, 8 * c),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8 * c, 10),
        )  # fmt: skip

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(nbatches)
    ]
    return model, lambda i: batches[i % len(batches)]


def bench_training(
    name: str,
    make_model: Callable[[], torch.nn.Module],
    batch_at: Callable[[int], tuple],
    blocks: int,
    per_block: int,
    budget_s: float,
) -> dict[str, Any]:
    """Median time of one full iteration (zero_grad, forward, backward, step) without and with Rewind.

    Runs ``blocks`` rounds of ``per_block`` iterations per variant (rotating which variant goes first), but stops
    after ``budget_s`` seconds once at least two rounds are done, so a loaded machine cannot stretch the run."""
    torch.manual_seed(0)
    base = make_model()
    variants: dict[str, dict[str, Any]] = {}
    for key, cap, overlap in (
        ("plain", None, False), ("rewind", 1, False), ("rewind_cap8", 8, False), ("rewind_overlap", 1, True)
    ):  # fmt: skip
        m = copy.deepcopy(base)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        rw = Rewind(m, opt, capacity=cap, overlap=overlap) if cap is not None else None
        variants[key] = {"model": m, "opt": opt, "rw": rw, "it": 0, "samples": []}
    loss_fn = torch.nn.CrossEntropyLoss()

    def iteration(v: dict[str, Any]) -> float:
        x, y = batch_at(v["it"])
        v["it"] += 1
        m, opt = v["model"], v["opt"]
        t0 = perf()
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        opt.step()
        return perf() - t0

    warm = max(3, per_block // 4)
    for v in variants.values():  # warm-up: Adam state exists, Rewind has re-homed it and filled its ring
        for _ in range(warm + 8):
            iteration(v)
    keys = list(variants)
    t0 = perf()
    done = 0
    with frozen_gc():
        for b in range(blocks):
            if done >= 2 and perf() - t0 > budget_s:
                break
            k = b % len(keys)
            for key in keys[k:] + keys[:k]:
                v = variants[key]
                gc.collect()
                v["samples"].extend(iteration(v) for _ in range(per_block))
            done += 1

    res = {key: summary(v["samples"]) for key, v in variants.items()}
    for r in res.values():
        del r["samples_ms"]  # too many to be useful in the JSON
    plain = res["plain"]["median_ms"]
    m = variants["rewind"]["model"]
    opt = variants["rewind"]["opt"]
    rw = variants["rewind"]["rw"]
    return {
        "task": name,
        "params": sum(p.numel() for p in m.parameters()),
        "tensors": len(state_tensors(m, opt)) + sum(1 for _ in m.buffers()),
        "state_bytes": rw.state_nbytes,
        "blocks": done,
        "iterations_per_block": per_block,
        "times": res,
        "overhead_pct": {
            "rewind": (res["rewind"]["median_ms"] / plain - 1) * 100,
            "rewind_cap8": (res["rewind_cap8"]["median_ms"] / plain - 1) * 100,
            "rewind_overlap": (res["rewind_overlap"]["median_ms"] / plain - 1) * 100,
        },
    }


def bench_compiled(
    name: str, make_model: Callable[[], torch.nn.Module], batch_at: Callable[[int], Any], blocks: int, per_block: int
) -> dict[str, Any]:
    """A compiled ``optimizer.step`` (``torch.compile(opt.step)``) with and without a Rewind: the median iteration,
    the time of the first 10 iterations (compilation included) and the number of graphs Dynamo built."""
    import torch._dynamo

    torch.manual_seed(0)
    base = make_model()
    loss_fn = torch.nn.CrossEntropyLoss()
    out: dict[str, Any] = {"task": name}
    variants = {}
    for key in ("compiled", "compiled_rewind"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m = copy.deepcopy(base)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        rw = Rewind(m, opt, capacity=1) if key == "compiled_rewind" else None
        step = torch.compile(opt.step)
        v = {"m": m, "opt": opt, "rw": rw, "step": step, "it": 0, "samples": []}

        def iteration(v: dict[str, Any] = v) -> float:
            x, y = batch_at(v["it"])
            v["it"] += 1
            t0 = perf()
            v["opt"].zero_grad()
            loss_fn(v["m"](x), y).backward()
            v["step"]()
            return perf() - t0

        v["iteration"] = iteration
        t0 = perf()
        for _ in range(10):
            iteration()
        out[f"{key}_first10_s"] = perf() - t0
        out[f"{key}_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        variants[key] = v
    keys = list(variants)
    with frozen_gc():
        for b in range(blocks):
            for key in keys[b % 2 :] + keys[: b % 2]:
                gc.collect()
                variants[key]["samples"].extend(variants[key]["iteration"]() for _ in range(per_block))
    times = {key: summary(v["samples"]) for key, v in variants.items()}
    for t in times.values():
        del t["samples_ms"]
    out["times"] = times
    out["ratio"] = times["compiled_rewind"]["median_ms"] / times["compiled"]["median_ms"]
    return out


# ---------------------------------------------------------------------------------------------------- report
def core_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | tensors: params (+ Adam state) | MiB | bound ms best (med) | snapshot ms (ratio) | restore ms (ratio) "
        "| undo+redo-kept ms (ratio) | seed recipe snapshot / restore / round trip ms "
        "| round-trip speed-up vs seed | foreach snapshot / restore ms |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        T, R = r["times"], r["ratios"]

        def cell(key: str, rk: str | None = None, target: float | None = None) -> str:
            b, m = T[key]["best_ms"], T[key]["median_ms"]
            s = f"{fmt_ms(b)} ({fmt_ms(m)})"
            if rk:
                pm = r["paired_median_ratio_to_bound"][key]
                s += f" **{pm:.2f}x** (best/best {R['best_ms'][rk]:.2f}x)"
                if target is not None:
                    s += " " + verdict(pm <= target)
            return s

        sp_b = R["best_ms"]["round_trip_speedup_vs_seed"]
        sp_m = R["median_ms"]["round_trip_speedup_vs_seed"]
        sp = f"**{sp_m:.1f}x** (best/best {sp_b:.1f}x)"
        if r["model"] == "many small tensors":
            sp += " " + verdict(sp_m >= ROUND_TRIP_TARGET)
        seed = " / ".join(fmt_ms(T[k]["median_ms"]) for k in ("seed_snapshot", "seed_restore", "seed_round_trip"))
        fe = " / ".join(fmt_ms(T[k]["median_ms"]) for k in ("foreach_snapshot", "foreach_restore"))
        lines.append(
            f"| {r['model']} ({r['params'] / 1e6:.2f}M params) | {r['param_tensors']} ({r['tensors']}) "
            f"| {r['arena_used_bytes'] / 2**20:.1f} "
            f"| {cell('bound')} | {cell('snapshot', 'snapshot_vs_bound', SNAP_TARGET)} "
            f"| {cell('restore', 'restore_vs_bound', SNAP_TARGET)} | {cell('undo_redo_kept', 'undo_redo_kept_vs_bound')} "
            f"| {seed} | {sp} | {fe} |"
        )
    return "\n".join(lines)


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | params | state MiB | plain ms/iter | Rewind(cap=1) ms/iter (overhead) | Rewind(cap=8) ms/iter (overhead) "
        "| Rewind(cap=1, overlap=True) ms/iter (overhead) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        T, O = r["times"], r["overhead_pct"]
        lines.append(
            f"| {r['task']} | {r['params'] / 1e6:.2f}M | {r['state_bytes'] / 2**20:.1f} "
            f"| {fmt_ms(T['plain']['median_ms'])} "
            f"| {fmt_ms(T['rewind']['median_ms'])} ({O['rewind']:+.1f}%) "
            f"| {fmt_ms(T['rewind_cap8']['median_ms'])} ({O['rewind_cap8']:+.1f}%) "
            f"| {fmt_ms(T['rewind_overlap']['median_ms'])} ({O['rewind_overlap']:+.1f}%) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small models, few repeats (~20 s on a 2-core machine)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per core measurement (default 25; quick 5)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-iteration overhead part")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled-step part (always skipped with --quick)")
    args = ap.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (5 if quick else 25)
    t_start = perf()

    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "quick": quick,
        "repeats": repeats,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(
        f"# torchrewind core benchmark ({'quick' if quick else 'full'}): torch {meta['torch']}, python "
        f"{meta['python']}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads, load average at start "
        f"{meta['loadavg_start'][0]:.2f}" if meta["loadavg_start"] else "?",
        flush=True,
    )

    core = []
    for name, (full, small) in CORE_MODELS.items():
        n, d = small if quick else full
        core.append(bench_core(name, n, d, repeats))
        print(f"  measured: {name} ({perf() - t_start:.1f} s)", file=sys.stderr, flush=True)

    train = []
    if not args.no_train:
        if quick:
            tasks = [
                ("MLP 64-256-256-10, digits, batch 64", *digits_task(64), 4, 15, 1.5),
                ("Transformer encoder d64x2, synthetic", *transformer_task(64, 2, 16, 8), 4, 6, 1.5),
            ]
        else:
            tasks = [
                ("MLP 64-256-256-10, digits, batch 64", *digits_task(64), 8, 60, 10),
                ("Transformer encoder d256x4 (seq 32, batch 16), synthetic", *transformer_task(256, 4, 32, 16), 6, 8, 20),
                ("CNN 6 conv+BN (c=32, 32x32, batch 16), synthetic", *cnn_task(32, 32, 16), 6, 8, 20),
            ]
        for name, mk, batch_at, blocks, per, budget in tasks:
            train.append(bench_training(name, mk, batch_at, blocks, per, budget))
            print(f"  measured: {name} ({perf() - t_start:.1f} s)", file=sys.stderr, flush=True)

    compiled = []
    if not quick and not args.no_compile:
        compiled.append(bench_compiled("MLP 64-256-256-10, digits, batch 64", *digits_task(64), 8, 60))
        print(f"  measured: compiled step ({perf() - t_start:.1f} s)", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ targets
    targets = []
    for r in core:
        for key, what in (("snapshot_vs_bound", "snapshot"), ("restore_vs_bound", "restore")):
            v = r["paired_median_ratio_to_bound"][what]
            targets.append({
                "target": f"{what} <= {SNAP_TARGET}x bound ({r['model']})",
                "value": v,
                "best_over_best": r["ratios"]["best_ms"][key],
                "pass": v <= SNAP_TARGET,
            })  # fmt: skip
    for r in core:
        if r["model"] == "many small tensors":
            v = r["ratios"]["median_ms"]["round_trip_speedup_vs_seed"]
            targets.append({
                "target": f"round trip >= {ROUND_TRIP_TARGET:g}x faster than seed recipe ({r['model']})",
                "value": v,
                "best_over_best": r["ratios"]["best_ms"]["round_trip_speedup_vs_seed"],
                "pass": v >= ROUND_TRIP_TARGET,
            })  # fmt: skip

    print()
    print(
        "## Snapshot / restore (ms: best of %d (median); ratios to the bound: **median of the per-round ratios** "
        "(best / best))" % repeats
    )
    print()
    print(core_table(core))
    print()
    print(
        "bound = one int64 copy_ of the arena's used bytes (params + exp_avg + exp_avg_sq + step); restore = "
        "undo() with redo=False right after a step (one copy); undo+redo-kept = undo() with redo=True (two "
        "copies); seed recipe = deepcopy(state_dict()) x2 / load_state_dict() x2; foreach = "
        "torch._foreach_copy_ into/out of preallocated clones."
    )
    for r in core:
        for note in r["notes"]:
            print(f"WARNING ({r['model']}): {note}")
    if train:
        print()
        print("## Training-iteration overhead (median ms per iteration: zero_grad + forward + backward + step)")
        print()
        print(train_table(train))
    if compiled:
        print()
        print("## Compiled step: torch.compile(opt.step), with and without Rewind(capacity=1)")
        print()
        print("| task | compiled ms/iter | + Rewind ms/iter (ratio) | first 10 iterations s (compile incl.) | graphs |")
        print("|---|---|---|---|---|")
        for c in compiled:
            T = c["times"]
            print(
                f"| {c['task']} | {fmt_ms(T['compiled']['median_ms'])} | {fmt_ms(T['compiled_rewind']['median_ms'])} "
                f"(**{c['ratio']:.2f}x**) | {c['compiled_first10_s']:.1f} / {c['compiled_rewind_first10_s']:.1f} "
                f"| {c['compiled_graphs']} / {c['compiled_rewind_graphs']} |"
            )
    print()
    print("## Targets (judged on the median of per-round ratios; best / best in brackets)")
    print()
    for tg in targets:
        print(f"- {verdict(tg['pass'])}: {tg['target']}: {tg['value']:.2f}x ({tg['best_over_best']:.2f}x)")
    elapsed = perf() - t_start
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(
        f"total {elapsed:.1f} s; load average at end " + (f"{load_end[0]:.2f}" if load_end else "?")
        + (
            f" (> {meta['cpu_count']} CPUs: other processes competed for the cores; expect noisy medians)"
            if load_end and meta["cpu_count"] and max(load_end[0], meta["loadavg_start"][0]) > meta["cpu_count"]
            else ""
        )
    )

    if args.json:
        meta["loadavg_end"] = load_end
        meta["elapsed_s"] = elapsed
        doc = {"meta": meta, "core": core, "training": train, "compiled": compiled, "targets": targets}
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
