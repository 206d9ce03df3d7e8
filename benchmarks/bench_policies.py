#!/usr/bin/env python
"""Policies benchmark of torchrewind: what the guards (``NonFiniteGuard``, ``SpikeGuard``) and the step-size searches
(``LineSearch``, ``BoldDriver``) buy on a small real task, and what they cost.

Usage::

    python benchmarks/bench_policies.py                  # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_policies.py --quick          # CI smoke run (< 45 s): fewer epochs and seeds
    python benchmarks/bench_policies.py --json out.json  # also write every number as JSON

Task: scikit-learn's bundled 8x8 ``digits`` (1797 images, no download), pixels / 16, a fixed stratified 75/25
train/test split (``random_state=0``), an MLP 64-128-128-10 (ReLU), mini-batches of 64 (21 per epoch, reshuffled every
epoch by a private generator, so every method sees exactly the same batches for a given seed). Every configuration
is run over several seeds (seed = initial weights + batch order) and reported as mean ± std over seeds.

Sections:

1. **Fault injection** (SGD, momentum 0.9, lr 0.05): poisoned batches at known iterations (inputs x1e3, a burst of
   batches with shuffled labels), an LR spike (lr x50 for a few steps, set through the param group as a bad schedule
   would), and in scenario B additionally one batch with a NaN pixel (a corrupted record). Compares plain training
   without faults (the reference), plain training with faults, ``NonFiniteGuard``, ``clip_grad_norm_`` (max_norm 1
   and 2), clipping + ``NonFiniteGuard``, and ``SpikeGuard`` with all its defaults on a ``Rewind`` of capacity 8 (so a
   roll-back undoes up to 8 steps) and of capacity 1 (the ``Rewind`` default: only the last step).
2. **Line search**: ``LineSearch`` (default settings) around SGD (lr 1.0) and Adam (lr 1e-2) against plain SGD and
   plain Adam at the best learning rate of a grid, and ``BoldDriver`` started 10x too high and 100x too low, all for
   the same number of epochs; counts forward and backward passes.
3. **Overhead when nothing goes wrong**: per-iteration time of training under ``NonFiniteGuard`` and ``SpikeGuard``
   against plain training (Adam, batch 64), the three interleaved block by block in one process; the median of the
   per-round ratios is reported.

Runs with one intra-op thread and denormals flushed to zero (``torch.set_num_threads(1)``,
``torch.set_flush_denormal(True)``), as ``torchrewind demo`` does: the model is far too small to gain from threads,
and Adam's second moments underflow into denormal floats, which are ~20-30x slower on x86 CPUs. Nothing here asserts
on a number; the verdicts are printed and stored in the JSON, and the exit status is 0 whatever they say.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from torchrewind import BoldDriver, LineSearch, NonFiniteGuard, Rewind, RewindError, SpikeGuard

perf = time.perf_counter
BATCH = 64
HIDDEN = (128, 128)

# Section 1 settings
FAULT_LR = 0.05  # SGD, momentum 0.9: a good lr for this task (fault-free: ~97.4% test accuracy after 30 epochs)
CLIP_NORM = 1.0  # the customary max_norm (e.g. Hugging Face Trainer's max_grad_norm); between the fault-free gradient
# norm's median (~0.4) and 99th percentile (~1.6)
CLIP_NORM_LOOSE = 2.0  # above the fault-free 99th percentile: leaves every normal step alone
INPUT_SCALE = 1e3
LR_SPIKE = 50.0
LR_SPIKE_STEPS = 5
LABEL_BURST = 8
GUARD_CAPACITY = 8  # the capacity the SpikeGuard docstring uses; SpikeGuard's rollback defaults to it

# Section 2 settings
SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LS_SGD_LR = 1.0
LS_ADAM_LR = 1e-2


# ---------------------------------------------------------------------------------------------------------- helpers
def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    if not all(math.isfinite(x) for x in xs):
        return float("nan"), float("nan")
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], digits: int = 4, scale: float = 1.0) -> str:
    m, s = mean_std([x * scale for x in xs])
    if not math.isfinite(m):
        return "nan"
    if abs(m) >= 1e4:
        return f"{m:.3g} ± {s:.2g}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_loss(xs: list[float]) -> str:
    m, s = mean_std(xs)
    if not math.isfinite(m):
        n_bad = sum(not math.isfinite(x) for x in xs)
        return f"nan ({n_bad}/{len(xs)} runs)"
    if m >= 100:
        return f"{m:.3g} ± {s:.2g}"
    return f"{m:.4f} ± {s:.4f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def flush_denormal_enabled() -> bool:
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal
    return (tiny * 1.0).item() == 0.0


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- task
def load_data() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        d.data, d.target, test_size=0.25, random_state=0, stratify=d.target
    )  # fmt: skip
    as_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return {"x_train": as_x(x_tr), "y_train": as_y(y_tr), "x_test": as_x(x_te), "y_test": as_y(y_te)}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    n_in = 64
    for w in HIDDEN:
        layers += [torch.nn.Linear(n_in, w), torch.nn.ReLU()]
        n_in = w
    layers.append(torch.nn.Linear(n_in, 10))
    return torch.nn.Sequential(*layers)


def batch_indices(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Index tensors of ``epochs`` epochs of full mini-batches (last partial batch dropped), reshuffled per epoch by a
    private generator."""
    g = torch.Generator().manual_seed(1000 + seed)
    out: list[torch.Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out


def evaluate(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> tuple[float, float]:
    with torch.no_grad():
        loss = F.cross_entropy(model(data["x_train"]), data["y_train"]).item()
        acc = (model(data["x_test"]).argmax(1) == data["y_test"]).float().mean().item()
    return loss, acc


# ---------------------------------------------------------------------------------------------------------- 1. faults
def fault_plan(iterations: int, nan_batch: bool) -> dict[str, Any]:
    """Fault positions (iteration = position in the batch stream), as fractions of the run so --quick scales."""
    at = lambda f: int(round(f * iterations))  # noqa: E731
    plan = {
        "input_x1e3": [at(0.25), at(0.5), at(0.75)],
        "lr_x50": list(range(at(0.4), at(0.4) + LR_SPIKE_STEPS)),
        "shuffled_labels": list(range(at(0.6), at(0.6) + LABEL_BURST)),
        "nan_pixel": [at(0.3)] if nan_batch else [],
    }
    return plan


def fault_stream(
    data: dict[str, torch.Tensor], idxs: list[torch.Tensor], plan: dict[str, Any] | None, seed: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    x_all, y_all = data["x_train"], data["y_train"]
    scaled = set(plan["input_x1e3"]) if plan else set()
    shuffled = set(plan["shuffled_labels"]) if plan else set()
    nan = set(plan["nan_pixel"]) if plan else set()
    g = torch.Generator().manual_seed(5000 + seed)
    for i, idx in enumerate(idxs):
        x, y = x_all[idx], y_all[idx]
        if i in scaled:
            x = x * INPUT_SCALE
        if i in shuffled:
            y = y[torch.randperm(len(y), generator=g)]
        if i in nan:
            x = x.clone()
            x[0, 27] = float("nan")
        yield i, x, y


FAULT_METHODS = {
    "reference": "plain, no faults (reference)",
    "plain": "plain",
    "nonfinite": "NonFiniteGuard",
    "clip": f"clip_grad_norm_({CLIP_NORM:g})",
    "clip_loose": f"clip_grad_norm_({CLIP_NORM_LOOSE:g})",
    "clip_nonfinite": f"clip_grad_norm_({CLIP_NORM:g}) + NonFiniteGuard",
    "spike": f"SpikeGuard defaults (capacity={GUARD_CAPACITY})",
    "spike_cap1": "SpikeGuard defaults (capacity=1)",
}


def fault_free_grad_norms(data: dict[str, torch.Tensor], epochs: int, seed: int = 0) -> list[float]:
    """Global gradient norm of every iteration of a fault-free run (untimed; to choose clipping's max_norm)."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=FAULT_LR, momentum=0.9)
    x_all, y_all = data["x_train"], data["y_train"]
    out = []
    for idx in batch_indices(len(x_all), epochs, seed):
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        out.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()
    return out


def run_fault(method: str, seed: int, data: dict[str, torch.Tensor], epochs: int, plan: dict[str, Any]) -> dict:
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=FAULT_LR, momentum=0.9)
    idxs = batch_indices(len(data["x_train"]), epochs, seed)
    faulty = method != "reference"
    lr_spike = set(plan["lr_x50"]) if faulty else set()
    stream: Any = fault_stream(data, idxs, plan if faulty else None, seed)
    rw = guard = None
    if method in ("nonfinite", "clip_nonfinite"):
        rw = Rewind(model, opt, capacity=1)
        guard = NonFiniteGuard(rw)
    elif method == "spike":
        rw = Rewind(model, opt, capacity=GUARD_CAPACITY)
        guard = SpikeGuard(rw)
    elif method == "spike_cap1":
        rw = Rewind(model, opt)
        guard = SpikeGuard(rw)
    if isinstance(guard, SpikeGuard):
        stream = guard.wrap(stream)
    clip = {"clip": CLIP_NORM, "clip_nonfinite": CLIP_NORM, "clip_loose": CLIP_NORM_LOOSE}.get(method)
    error = ""
    seen = applied = 0
    positions: list[int] = []  # stream position of each batch the loop saw (the guards count these, not skips)
    gc.collect()
    t0 = perf()
    try:
        for i, x, y in stream:
            seen += 1
            positions.append(i)
            opt.param_groups[0]["lr"] = FAULT_LR * (LR_SPIKE if i in lr_spike else 1.0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if guard is None:
                opt.step()
                applied += 1
            else:
                applied += bool(guard.step(loss))
    except RewindError as e:
        error = str(e).splitlines()[0]
    wall = perf() - t0
    train_loss, acc = evaluate(model, data)
    out: dict[str, Any] = {
        "method": method, "seed": seed, "train_loss": train_loss, "test_acc": acc, "wall_s": wall,
        "iterations_seen": seen, "steps_applied": applied, "error": error,
    }  # fmt: skip
    if guard is not None:
        counts = guard.log.counts()
        out["skipped"] = counts["skipped"]
        out["rolled_back"] = counts["rolled_back"]
        # The guard counts its own iterations (batches it saw); map them back to stream positions.
        out["rollback_stream_pos"] = [positions[e.iteration] for e in guard.log.events if e.kind == "rolled_back"]
        out["skip_stream_pos"] = [positions[e.iteration] for e in guard.log.events if e.kind == "skipped"]
        if isinstance(guard, SpikeGuard):
            out["batches_skipped"] = stream.skipped
            out["steps_undone"] = sum(e.undone for e in guard.log.events if e.kind == "rolled_back")
    if rw is not None:
        rw.close()
    return out


# ---------------------------------------------------------------------------------------------------- 2. line search
def run_opt(
    kind: str, seed: int, data: dict[str, torch.Tensor], epochs: int, *, opt_name: str, lr: float, **kw: Any
) -> dict[str, Any]:
    """``kind``: "plain", "linesearch" or "bolddriver"."""
    model = make_model(seed)
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    idxs = batch_indices(len(data["x_train"]), epochs, seed)
    x_all, y_all = data["x_train"], data["y_train"]
    rw = None
    policy: LineSearch | BoldDriver | None = None
    if kind == "linesearch":
        rw = Rewind(model, opt)
        policy = LineSearch(rw, **kw)
    elif kind == "bolddriver":
        rw = Rewind(model, opt)
        policy = BoldDriver(rw, **kw)
    gc.collect()
    t0 = perf()
    for idx in idxs:
        x, y = x_all[idx], y_all[idx]
        if policy is None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            policy.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    wall = perf() - t0
    train_loss, acc = evaluate(model, data)
    n = len(idxs)
    out: dict[str, Any] = {
        "kind": kind, "opt": opt_name, "lr": lr, "seed": seed, "train_loss": train_loss, "test_acc": acc,
        "wall_s": wall, "iterations": n, "forwards": n, "backwards": n, "final_lr": opt.param_groups[0]["lr"],
    }  # fmt: skip
    if policy is not None:
        st = policy.stats
        for k in ("forwards", "backwards", "steps", "accepted", "rejected", "exhausted", "skipped"):
            out[k] = st[k]
        ev = policy.log.events
        nd = "not a descent direction"
        out["rejected_nondescent"] = sum(e.kind == "rejected" and e.reason.startswith(nd) for e in ev)
        out["exhausted_nondescent"] = sum(e.kind == "exhausted" and e.reason.startswith(nd) for e in ev)
        accepted_lrs = [e.lrs[0] for e in ev if e.kind == "accepted"]
        out["median_accepted_lr"] = statistics.median(accepted_lrs) if accepted_lrs else float("nan")
    if rw is not None:
        rw.close()
    return out


# ---------------------------------------------------------------------------------------------------------- 3. overhead
def bench_overhead(data: dict[str, torch.Tensor], rounds: int, per_block: int) -> dict[str, Any]:
    x_all, y_all = data["x_train"], data["y_train"]
    idxs = batch_indices(len(x_all), 400, seed=0)
    batches = [(x_all[i], y_all[i]) for i in idxs]
    nb = len(batches)

    class Runner:
        def __init__(self, name: str) -> None:
            self.name = name
            self.model = make_model(0)
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
            self.rw: Rewind | None = None
            self.guard: NonFiniteGuard | None = None
            if name == "NonFiniteGuard":
                self.rw = Rewind(self.model, self.opt, capacity=1)
                self.guard = NonFiniteGuard(self.rw)
            elif name.startswith("SpikeGuard"):
                self.rw = Rewind(self.model, self.opt, capacity=GUARD_CAPACITY)
                self.guard = SpikeGuard(self.rw)
            self.pos = 0
            self.times: list[float] = []
            self.errors = 0

        def block(self, n: int) -> float:
            model, opt, guard = self.model, self.opt, self.guard
            gc.collect()
            t0 = perf()
            for _ in range(n):
                x, y = batches[self.pos % nb]
                self.pos += 1
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                if guard is None:
                    opt.step()
                else:
                    try:
                        guard.step(loss)
                    except RewindError:  # too many roll-backs: counted and reported, training goes on
                        self.errors += 1
            return perf() - t0

    runners = [Runner("plain"), Runner("NonFiniteGuard"), Runner(f"SpikeGuard (capacity={GUARD_CAPACITY})")]
    for r in runners:  # warm-up round, untimed
        r.block(per_block)
    for k in range(rounds):
        order = runners[k % 3 :] + runners[: k % 3]
        for r in order:
            r.times.append(r.block(per_block) / per_block)
    plain = runners[0]
    out: dict[str, Any] = {"rounds": rounds, "per_block": per_block, "variants": {}}
    for r in runners:
        ratios = [t / p for t, p in zip(r.times, plain.times)]
        g = r.guard
        out["variants"][r.name] = {
            "median_ms_per_iter": statistics.median(r.times) * 1e3,
            "best_ms_per_iter": min(r.times) * 1e3,
            "median_ratio": statistics.median(ratios),
            "iterations": r.pos,
            "rolled_back": g.log.counts()["rolled_back"] if g is not None else 0,
            "skipped": g.log.counts()["skipped"] if g is not None else 0,
            "errors": r.errors,
            "samples_ms": [t * 1e3 for t in r.times],
        }
        if r.rw is not None:
            r.rw.close()
    return out


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run: fewer epochs, seeds and repetitions")
    ap.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 5; 3 with --quick)")
    args = ap.parse_args(argv)
    quick = args.quick
    seeds = list(range(args.seeds or (3 if quick else 5)))
    fault_epochs = 10 if quick else 30
    ls_epochs = 4 if quick else 20
    oh_rounds, oh_block = (8, 25) if quick else (40, 50)

    threads, flushing = torch.get_num_threads(), flush_denormal_enabled()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t_start = perf()
    data = load_data()
    run_opt("plain", 0, data, 1, opt_name="adam", lr=1e-3)  # warm-up: the first optimizer imports torch._dynamo
    gc.collect()
    gc.freeze()  # keep the per-run gc.collect() cheap: torch's own objects are never collected again
    results: dict[str, Any] = {
        "settings": {
            "quick": quick, "seeds": seeds, "batch": BATCH, "hidden": HIDDEN, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "num_threads": 1, "flush_denormal": True, "fault_epochs": fault_epochs, "ls_epochs": ls_epochs,
        },  # fmt: skip
    }
    print(f"# torchrewind policies benchmark{' (--quick)' if quick else ''}")
    print()
    print(
        f"digits (sklearn, 1347 train / 450 test), MLP 64-128-128-10, batch {BATCH}, seeds {seeds} (mean ± std over "
        f"seeds). torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        "torch.set_num_threads(1) and torch.set_flush_denormal(True) as in `torchrewind demo` (Adam's second "
        "moments go denormal on CPU and would slow training ~30x)."
    )
    try:
        fault_section(results, data, seeds, fault_epochs)
        linesearch_section(results, data, seeds, ls_epochs, quick)
        overhead_section(results, data, oh_rounds, oh_block)
    finally:
        gc.unfreeze()
        torch.set_flush_denormal(flushing)
        torch.set_num_threads(threads)
    total = perf() - t_start
    results["total_s"] = total
    print()
    print("## Verdicts")
    print()
    for v in results["verdicts"]:
        print(f"- {v}")
    print()
    print(f"Total time: {total:.0f} s.")
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_jsonable(results), f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


def fault_section(results: dict[str, Any], data: dict[str, torch.Tensor], seeds: list[int], epochs: int) -> None:
    iterations = epochs * (len(data["x_train"]) // BATCH)
    scenarios = {"A": fault_plan(iterations, nan_batch=False), "B": fault_plan(iterations, nan_batch=True)}
    runs: dict[str, dict[str, list[dict]]] = {}
    t0 = perf()
    ref = [run_fault("reference", s, data, epochs, scenarios["A"]) for s in seeds]
    for sc, plan in scenarios.items():
        runs[sc] = {"reference": ref}
        for m in FAULT_METHODS:
            if m != "reference":
                runs[sc][m] = [run_fault(m, s, data, epochs, plan) for s in seeds]
        progress(f"faults, scenario {sc} ({perf() - t0:.0f} s)")
    gn = sorted(fault_free_grad_norms(data, epochs))
    gn_med, gn_p99 = statistics.median(gn), gn[int(0.99 * (len(gn) - 1))]

    print()
    print(f"## 1. Fault injection (SGD momentum 0.9, lr {FAULT_LR:g}, {epochs} epochs = {iterations} iterations)")
    print()
    plan = scenarios["B"]
    print(
        "Faults, by position in the batch stream: inputs x1e3 at iterations "
        f"{plan['input_x1e3']}; lr x{LR_SPIKE:g} (param group) at {_span(plan['lr_x50'])}; shuffled labels at "
        f"{_span(plan['shuffled_labels'])}; scenario B adds a batch with one NaN pixel at {plan['nan_pixel']}. "
        f"Fault-free gradient norm: median {gn_med:.2f}, p99 {gn_p99:.2f} (seed 0); clipping at max_norm={CLIP_NORM:g} "
        f"(the customary value) and {CLIP_NORM_LOOSE:g} (above p99). "
        "Every SpikeGuard runs with its defaults."
    )
    ref_acc = [r["test_acc"] for r in ref]
    ref_loss = [r["train_loss"] for r in ref]
    summary: dict[str, Any] = {}
    for sc in scenarios:
        print()
        print(f"### Scenario {sc}{' (with a NaN batch)' if sc == 'B' else ''}")
        print()
        rows = []
        for m, label in FAULT_METHODS.items():
            rs = runs[sc][m]
            accs, losses = [r["test_acc"] for r in rs], [r["train_loss"] for r in rs]
            d_acc = statistics.fmean(accs) - statistics.fmean(ref_acc)
            noise = 2 * statistics.stdev(ref_acc) if len(ref_acc) > 1 else 0.0
            errors = sum(bool(r["error"]) for r in rs)
            # A run that raised did not finish training: it cannot count as ending within noise.
            within = abs(d_acc) <= noise and all(math.isfinite(x) for x in losses) and not errors
            guard_info = "-"
            if "rolled_back" in rs[0]:
                guard_info = (
                    f"{statistics.fmean(r['rolled_back'] for r in rs):.1f} rb / "
                    f"{statistics.fmean(r['skipped'] for r in rs):.1f} skip"
                )
                if "steps_undone" in rs[0]:
                    lost = statistics.fmean(r["steps_undone"] + r["batches_skipped"] for r in rs)
                    guard_info += f" / {lost:.0f} lost"
            rows.append([
                label, fmt_loss(losses), fmt(accs, 2, 100.0), f"{d_acc * 100:+.2f}",
                "-" if m == "reference" else ("yes" if within else ("no (raised)" if errors else "no")), guard_info,
                f"{errors}/{len(rs)}" if errors else "0", fmt([r["wall_s"] for r in rs], 2),
            ])  # fmt: skip
            summary.setdefault(sc, {})[m] = {
                "train_loss": mean_std(losses), "test_acc": mean_std(accs), "d_acc_vs_reference": d_acc,
                "within_noise": within, "errors": errors, "wall_s": mean_std([r["wall_s"] for r in rs]),
            }  # fmt: skip
        print(table(
            ["method", "final train loss", "test acc %", "Δacc vs ref (pp)", "within noise", "guard: roll-backs / "
             "skips / batches lost", "RewindError", "wall s"], rows))  # fmt: skip
    # False positives: roll-backs of the default guard that no fault explains.
    fp = []
    for sc, plan in scenarios.items():
        bad = set(plan["input_x1e3"]) | set(plan["shuffled_labels"]) | set(plan["nan_pixel"])
        bad |= {i + k for i in plan["lr_x50"] for k in (1, 2)}
        for m in ("spike", "spike_cap1"):
            for r in runs[sc][m]:
                r["unexplained_rollbacks"] = [p for p in r["rollback_stream_pos"] if p not in bad]
                fp.append((sc, m, r["seed"], len(r["unexplained_rollbacks"])))
    print()
    print(
        "Within noise: |mean test acc − reference| ≤ 2 × the reference's std over seeds, and no non-finite loss. "
        "'batches lost' = steps undone by roll-backs + batches skipped. A RewindError (too many roll-backs) ends the "
        "run there; the model is evaluated as it was then. Roll-backs not within 2 iterations of a fault "
        "(false positives), per seed: "
        + "; ".join(
            f"{sc}/{m}: {[n for s2, m2, _, n in fp if s2 == sc and m2 == m]}"
            for sc in scenarios
            for m in ("spike", "spike_cap1")
        )
        + "."
    )
    results["faults"] = {
        "plan": scenarios, "clip_norm": CLIP_NORM, "clip_norm_loose": CLIP_NORM_LOOSE,
        "grad_norm_median": gn_med, "grad_norm_p99": gn_p99, "summary": summary, "runs": runs,
    }  # fmt: skip

    def say(m: str) -> str:
        parts = []
        for sc, sm in summary.items():
            v = sm[m]
            state = "within noise" if v["within_noise"] else "outside noise"
            if v["errors"]:
                state = f"raised RewindError in {v['errors']}/{len(seeds)} runs"
            loss = v["train_loss"][0]
            parts.append(f"{sc}: {v['d_acc_vs_reference'] * 100:+.2f} pp, {state}, train loss {loss:.3g}")
        return "; ".join(parts)

    verdict = (
        f"Faults (vs fault-free: test acc {100 * statistics.fmean(ref_acc):.2f}%, train loss "
        f"{statistics.fmean(ref_loss):.3g}): "
        f"SpikeGuard defaults [{say('spike')}]; "
        f"SpikeGuard defaults, capacity 1 [{say('spike_cap1')}]; clip_grad_norm_({CLIP_NORM:g}) [{say('clip')}]; "
        f"clip_grad_norm_({CLIP_NORM_LOOSE:g}) [{say('clip_loose')}]; clip + NonFiniteGuard "
        f"[{say('clip_nonfinite')}]; NonFiniteGuard alone [{say('nonfinite')}]; plain [{say('plain')}]."
    )
    results.setdefault("verdicts", []).append(verdict)
    print()
    print(f"**Verdict:** {verdict}")


def _jsonable(o: Any) -> Any:
    """Strict JSON: non-finite floats become strings, tuples lists, other objects their str()."""
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def _span(xs: list[int]) -> str:
    return f"{xs[0]}-{xs[-1]}" if len(xs) > 1 else str(xs)


def _agg(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(float(r[key]) for r in rs)


def linesearch_section(
    results: dict[str, Any], data: dict[str, torch.Tensor], seeds: list[int], epochs: int, quick: bool
) -> None:
    iterations = epochs * (len(data["x_train"]) // BATCH)
    t0 = perf()
    grid: dict[str, dict[float, list[dict]]] = {"sgd": {}, "adam": {}}
    for name, lrs_ in (("sgd", SGD_GRID), ("adam", ADAM_GRID)):
        for lr in lrs_:
            grid[name][lr] = [run_opt("plain", s, data, epochs, opt_name=name, lr=lr) for s in seeds]
    progress(f"line search: grids ({perf() - t0:.0f} s)")

    def best(name: str) -> float:  # lowest mean final train loss (the quantity the optimizers minimise)
        return min(grid[name], key=lambda lr: (_agg(grid[name][lr], "train_loss"), -_agg(grid[name][lr], "test_acc")))

    best_sgd, best_adam = best("sgd"), best("adam")
    bd_high, bd_low = 10 * best_sgd, best_sgd / 100
    configs: list[tuple[str, str, str, float, dict[str, Any]]] = [
        (f"plain SGD, best grid lr {best_sgd:g}", "plain", "sgd", best_sgd, {}),
        (f"SGD + LineSearch (defaults), lr {LS_SGD_LR:g}", "linesearch", "sgd", LS_SGD_LR, {}),
        (f"SGD + BoldDriver (defaults), lr {bd_high:.3g} (10x best)", "bolddriver", "sgd", bd_high, {}),
        (f"SGD + BoldDriver (defaults), lr {bd_low:.3g} (best/100)", "bolddriver", "sgd", bd_low, {}),
        (f"plain Adam, best grid lr {best_adam:g}", "plain", "adam", best_adam, {}),
        (f"Adam + LineSearch (defaults), lr {LS_ADAM_LR:g}", "linesearch", "adam", LS_ADAM_LR, {}),
    ]
    if not quick:  # non-default settings, for the discussion of the defaults
        configs += [
            (f"SGD + LineSearch(c=0.1, as SLS), lr {LS_SGD_LR:g}", "linesearch", "sgd", LS_SGD_LR, {"c": 0.1}),
            (f"Adam + LineSearch(c=0.1, as SLS), lr {LS_ADAM_LR:g}", "linesearch", "adam", LS_ADAM_LR, {"c": 0.1}),
            (f"Adam + LineSearch(max_tries=2), lr {LS_ADAM_LR:g}", "linesearch", "adam", LS_ADAM_LR,
             {"max_tries": 2}),
        ]  # fmt: skip
    runs: dict[str, list[dict]] = {}
    for label, kind, name, lr, kw in configs:
        if kind == "plain":
            runs[label] = grid[name][lr]
        else:
            runs[label] = [run_opt(kind, s, data, epochs, opt_name=name, lr=lr, **kw) for s in seeds]
    progress(f"line search: policies ({perf() - t0:.0f} s)")

    print()
    print(f"## 2. Line search ({epochs} epochs = {iterations} iterations of batch {BATCH}, same batches for all)")
    print()
    print(
        f"Starting lr for LineSearch: SGD {LS_SGD_LR:g}, Adam {LS_ADAM_LR:g}. Backtracking only shrinks the lr, and "
        "LineSearch's default lr_max='initial' caps the growth at the starting lr, so the start must sit at or "
        "above the useful range: 1.0 is the usual SLS start for SGD (Vaswani et al. 2019), here "
        f"{'above' if LS_SGD_LR >= best_sgd else 'BELOW'} the best plain-SGD lr ({best_sgd:g}); 1e-2 is 10x Adam's "
        f"customary 1e-3, here {'above' if LS_ADAM_LR >= best_adam else 'BELOW'} the best plain-Adam lr "
        f"({best_adam:g}). Best grid lr = lowest mean final train loss."
    )
    print()
    print("### Grids (plain training, 1 forward + 1 backward per iteration)")
    print()
    rows = []
    for name in ("sgd", "adam"):
        for lr, rs in grid[name].items():
            mark = " **(best)**" if lr == (best_sgd if name == "sgd" else best_adam) else ""
            label = f"{'SGD' if name == 'sgd' else 'Adam'} lr {lr:g}{mark}"
            rows.append([label, fmt_loss([r["train_loss"] for r in rs]), fmt([r["test_acc"] for r in rs], 2, 100.0)])
    print(table(["optimizer", "final train loss", "test acc %"], rows))
    print()
    print("### Policies vs the best grid lr")
    print()
    rows = []
    summary: dict[str, Any] = {}
    for label, kind, name, lr, kw in configs:
        rs = runs[label]
        fw, bw = _agg(rs, "forwards"), _agg(rs, "backwards")
        is_policy = kind != "plain"
        rej = f"{_agg(rs, 'rejected'):.0f}" if is_policy else "-"
        exh = f"{_agg(rs, 'exhausted'):.0f} ({100 * _agg(rs, 'exhausted') / iterations:.1f}%)" if is_policy else "-"
        lr_info = f"{statistics.median(r['median_accepted_lr'] for r in rs):.3g}" if is_policy else f"{lr:g}"
        rows.append([
            label, fmt_loss([r["train_loss"] for r in rs]), fmt([r["test_acc"] for r in rs], 2, 100.0),
            f"{fw:.0f}", f"{bw:.0f}", f"{(fw + 2 * bw) / (3 * iterations):.2f}x", rej, exh, lr_info,
            fmt([r["wall_s"] for r in rs], 2),
        ])  # fmt: skip
        summary[label] = {
            "kind": kind, "opt": name, "lr": lr, "kwargs": kw, "train_loss": mean_std([r["train_loss"] for r in rs]),
            "test_acc": mean_std([r["test_acc"] for r in rs]), "forwards": fw, "backwards": bw,
            "exhausted": _agg(rs, "exhausted") if is_policy else 0,
            "rejected": _agg(rs, "rejected") if is_policy else 0,
        }  # fmt: skip
    print(table(
        ["configuration", "final train loss", "test acc %", "forwards", "backwards", "cost vs plain", "rejected",
         "exhausted (% of iterations)", "lr (median accepted)", "wall s"], rows))  # fmt: skip
    print()
    print(
        f"Forwards/backwards: totals over the run, mean over seeds (plain: {iterations} + {iterations}); LineSearch's "
        "extra forwards are no-grad evaluations of the trial step on the same batch. 'exhausted': iterations where "
        "every try failed and the step was dropped. 'cost vs plain' = (forwards + 2 x backwards) / (3 x iterations), "
        "counting a backward as two forwards. The grids themselves cost "
        f"{len(SGD_GRID)} and {len(ADAM_GRID)} full runs."
    )
    for label, kind, name, lr, kw in configs:
        rs = runs[label]
        if kind == "linesearch" and name == "adam":
            rej, exh = sum(r["rejected"] for r in rs), sum(r["exhausted"] for r in rs)
            print(
                f"{label}: {100 * sum(r['rejected_nondescent'] for r in rs) / max(rej, 1):.0f}% of rejected tries and "
                f"{100 * sum(r['exhausted_nondescent'] for r in rs) / max(exh, 1):.0f}% of exhausted iterations had "
                "a step that was not a descent direction for the batch (∇f·Δ ≥ 0: Adam's momentum), where "
                "LineSearch falls back to 'no increase', which a smaller lr cannot fix to first order."
            )
    results["linesearch"] = {
        "grid": {n: {str(lr): {"train_loss": mean_std([r["train_loss"] for r in rs]),
                               "test_acc": mean_std([r["test_acc"] for r in rs])} for lr, rs in g.items()}
                 for n, g in grid.items()},
        "best_sgd": best_sgd, "best_adam": best_adam, "summary": summary,
        "runs": {k: v for k, v in runs.items()},
    }  # fmt: skip
    s = summary
    lab = [c[0] for c in configs]
    ls_sgd, ls_adam, bd_hi, bd_lo, p_sgd, p_adam = s[lab[1]], s[lab[5]], s[lab[2]], s[lab[3]], s[lab[0]], s[lab[4]]
    d = lambda a, b: f"{(a['test_acc'][0] - b['test_acc'][0]) * 100:+.2f} pp"  # noqa: E731
    verdict = (
        f"Line search: SGD+LineSearch (no lr tuning) {d(ls_sgd, p_sgd)} test acc vs the best of {len(SGD_GRID)} SGD "
        f"lrs (train loss {ls_sgd['train_loss'][0]:.4f} vs {p_sgd['train_loss'][0]:.4f}) at "
        f"{(ls_sgd['forwards'] + 2 * ls_sgd['backwards']) / (3 * iterations):.2f}x the cost of one run; "
        f"Adam+LineSearch {d(ls_adam, p_adam)} vs the best Adam lr at "
        f"{(ls_adam['forwards'] + 2 * ls_adam['backwards']) / (3 * iterations):.2f}x, dropping "
        f"{100 * ls_adam['exhausted'] / iterations:.1f}% of its steps (exhausted); BoldDriver from 10x too high "
        f"{d(bd_hi, p_sgd)}, from 100x too low {d(bd_lo, p_sgd)} vs the best SGD lr."
    )
    results.setdefault("verdicts", []).append(verdict)
    print()
    print(f"**Verdict:** {verdict}")


def overhead_section(results: dict[str, Any], data: dict[str, torch.Tensor], rounds: int, per_block: int) -> None:
    t0 = perf()
    oh = bench_overhead(data, rounds, per_block)
    progress(f"overhead ({perf() - t0:.0f} s)")
    print()
    print(
        f"## 3. Overhead when nothing goes wrong (MLP, batch {BATCH}, Adam lr 1e-3, no faults; {rounds} rounds of "
        f"{per_block} iterations per variant, interleaved, order rotated each round)"
    )
    print()
    rows = []
    plain_ms = oh["variants"]["plain"]["median_ms_per_iter"]
    for name, v in oh["variants"].items():
        rows.append([
            name, f"{v['median_ms_per_iter']:.3f}", f"{v['best_ms_per_iter']:.3f}",
            "1.00" if name == "plain" else f"{v['median_ratio']:.3f}",
            "-" if name == "plain" else f"{v['median_ms_per_iter'] - plain_ms:+.3f}",
            f"{v['rolled_back']} / {v['skipped']}" if name != "plain" else "-",
            str(v["errors"]) if name != "plain" else "-",
        ])  # fmt: skip
    print(table(
        ["variant", "median ms / iteration", "best ms / iteration", "median of per-round ratios vs plain", "extra ms",
         "roll-backs / skips", "RewindErrors"], rows))  # fmt: skip
    print()
    print(
        "One iteration = zero_grad + forward + backward + step (or guard.step). NonFiniteGuard on a Rewind of "
        f"capacity 1, SpikeGuard (defaults) on capacity {GUARD_CAPACITY}; both snapshot the state before every step "
        "and compute the global gradient norm (one sync). Each variant trains its own model on the same batches."
    )
    results["overhead"] = oh
    v = oh["variants"]
    nf = v["NonFiniteGuard"]["median_ratio"]
    sg = v[f"SpikeGuard (capacity={GUARD_CAPACITY})"]
    verdict = (
        f"Overhead: NonFiniteGuard costs {100 * (nf - 1):+.0f}% and SpikeGuard {100 * (sg['median_ratio'] - 1):+.0f}% "
        f"per iteration over plain training ({v['plain']['median_ms_per_iter']:.2f} ms/iteration; median of paired "
        f"ratios; about {sg['median_ms_per_iter'] - v['plain']['median_ms_per_iter']:.2f} ms of fixed cost per "
        f"iteration), with {sg['rolled_back']} false-positive roll-backs in {sg['iterations']} fault-free iterations."
    )
    results.setdefault("verdicts", []).append(verdict)
    print()
    print(f"**Verdict:** {verdict}")


if __name__ == "__main__":
    sys.exit(main())
