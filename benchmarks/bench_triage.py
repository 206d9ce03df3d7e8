#!/usr/bin/env python
"""Fault-triage benchmark of torchrewind: what ``FaultTriage`` costs when nothing goes wrong, what a diagnosis
costs, whether it gets the diagnosis right and the training exact on the suite's tasks, and how nondeterministic
the kernels are (the determinism report).

Usage::

    python benchmarks/bench_triage.py                  # full run (~5 min on 2 CPU cores)
    python benchmarks/bench_triage.py --quick          # CI smoke run (< 1 min)
    python benchmarks/bench_triage.py --json out.json  # also write every number as JSON
    python benchmarks/bench_triage.py --device cuda    # section 4 on a GPU (the other sections stay on CPU)

Sections (tasks from ``benchmarks/suite``: offline, CPU-sized, different kinds of models; Adam at the task's lr):

1. **Overhead when nothing goes wrong**: time per iteration of plain training (``zero_grad``, forward, backward,
   ``step``), of ``Rewind`` + ``NonFiniteGuard`` (what a user would otherwise put there: skip non-finite steps), of
   ``FaultTriage`` with its defaults, and of ``FaultTriage(report_every=100)`` (1% of iterations rerun for the
   determinism report). The variants run interleaved, block by block, in one process; the median over rounds of
   each block's time / the plain block's time of the same round is reported.
2. **Time to attribute a fault**: the wall time of an iteration with a transient fault (a NaN in the first layer's
   output, first run only: restore, rerun, compare, step) and with a reproducible one (the NaN in every run: restore,
   rerun, compare, restore, skip), over the median fault-free iteration of the same run.
3. **Diagnoses on the suite**: each task and seed with three faults — a transient NaN in the first layer's output
   (30% of the run), a transient infinite gradient (60%), and a batch whose inputs hold a NaN (45%, the suite's
   ``nan`` fault: reproducible). ``FaultTriage`` must call the first two transient and the third reproducible, and
   end with parameters bitwise equal to a fault-free run that skipped that one batch. Compared side by side with
   plain training and ``NonFiniteGuard`` on the same faults (test metric of the task).
4. **Determinism report**: ``FaultTriage(report_every=1)``: every iteration rerun from the same exact state; the
   largest difference per quantity (loss, gradient norm, every gradient element). On CPU it must be 0.

One intra-op thread, denormals flushed (as the other benchmarks). Nothing asserts on a number; the verdicts are
printed and stored in the JSON, and the exit status is 0 whatever they say.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.suite` from the repository root

import torch  # noqa: E402

from benchmarks.bench_core import frozen_gc  # noqa: E402
from benchmarks.suite import tasks  # noqa: E402
from benchmarks.suite.faults import Fault, FaultPlan, Injector  # noqa: E402
from benchmarks.suite.runner import adam  # noqa: E402
from torchrewind import FaultInjector, FaultTriage, NonFiniteGuard, Rewind  # noqa: E402

perf = time.perf_counter
NEVER = 10**9  # max_transient / max_consecutive for the benchmark: count, never raise


# ---------------------------------------------------------------------------------------------------------- helpers
def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def to(b: Any, device: torch.device) -> Any:
    if isinstance(b, torch.Tensor):
        return b.to(device)
    if isinstance(b, (list, tuple)):
        return type(b)(to(x, device) for x in b)
    return b


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Variant:
    """One training loop on its own copy of a task: plain, NonFiniteGuard, or FaultTriage(**kw)."""

    def __init__(self, name: str, task: str, seed: int, scale: float, kind: str, device: str = "cpu", **kw: Any):
        self.name, self.kind = name, kind
        self.run = tasks.make(task, seed, scale)
        self.device = torch.device(device)
        self.model = self.run.model.to(self.device)
        self.opt = adam()(self.run)
        self.rw = self.guard = self.triage = None
        if kind == "guard":
            self.rw = Rewind(self.model, self.opt)
            self.guard = NonFiniteGuard(self.rw, max_consecutive=NEVER)
        elif kind == "triage":
            self.rw = Rewind(self.model, self.opt)
            self.triage = FaultTriage(self.rw, max_transient=NEVER, max_consecutive=NEVER, **kw)
        self.stream = self.run.batches()
        self.times: list[float] = []

    def iteration(self, batch: Any) -> None:
        model, opt, run = self.model, self.opt, self.run
        batch = to(batch, self.device)
        if self.triage is not None:
            self.triage.step(lambda: run.loss(model, batch))
            return
        opt.zero_grad(set_to_none=True)
        loss = run.loss(model, batch)
        loss.backward()
        if self.guard is not None:
            self.guard.step(loss)
        else:
            opt.step()

    def block(self, n: int) -> float:
        gc.collect()
        t0 = perf()
        for _ in range(n):
            self.iteration(next(self.stream))
        return perf() - t0

    def close(self) -> None:
        if self.rw is not None:
            self.rw.close()


# ---------------------------------------------------------------------------------------------------------- 1. overhead
def overhead_section(res: dict[str, Any], task_names: list[str], rounds: int, per_block: int) -> None:
    print("## 1. Overhead when nothing goes wrong\n")
    specs = [("plain", "plain", {}), ("Rewind + NonFiniteGuard", "guard", {}),
             ("FaultTriage (defaults)", "triage", {}), ("FaultTriage(report_every=100)", "triage",
                                                        {"report_every": 100})]  # fmt: skip
    out: dict[str, Any] = {}
    rows = []
    for task in task_names:
        progress(f"overhead: {task}")
        vs = [Variant(n, task, 0, 1.0, k, **kw) for n, k, kw in specs]
        for v in vs:
            v.block(per_block)  # warm-up, untimed
        with frozen_gc():
            for r in range(rounds):
                for v in vs[r % len(vs) :] + vs[: r % len(vs)]:
                    v.times.append(v.block(per_block) / per_block)
        plain = vs[0].times
        out[task] = {}
        for v in vs:
            ratios = [t / p for t, p in zip(v.times, plain)]
            out[task][v.name] = {"median_ms": statistics.median(v.times) * 1e3, "median_ratio": statistics.median(ratios),
                                 "reruns": v.triage.reruns if v.triage else 0}  # fmt: skip
            v.close()
        run = vs[0].run
        n_params = sum(p.numel() for p in run.model.parameters())
        rows.append([f"`{task}` ({n_params:,} params)", f"{out[task]['plain']['median_ms']:.2f} ms"]
                    + [f"x{out[task][n]['median_ratio']:.3f}" for n, _, _ in specs[1:]])  # fmt: skip
    print(table(["task", "plain"] + [n for n, _, _ in specs[1:]], rows))
    print(f"\n{rounds} interleaved rounds of {per_block} iterations per variant; ratio = median over rounds of the "
          "variant's block time / the plain block's time in the same round.\n")  # fmt: skip
    res["overhead"] = out


# ---------------------------------------------------------------------------------------------------------- 2. fault cost
def attribution_section(res: dict[str, Any], task_names: list[str], iters: int, every: int) -> None:
    print("## 2. Time to attribute a fault\n")
    out: dict[str, Any] = {}
    rows = []
    for task in task_names:
        progress(f"attribution cost: {task}")
        row: dict[str, Any] = {}
        for mode in ("transient", "reproducible"):
            v = Variant("triage", task, 0, 1.0, "triage")
            inj = FaultInjector(v.run.first_layer, kind="scale", factor=float("nan"))
            normal, faulty = [], []
            for i in range(iters):
                batch = next(v.stream)
                hit = i >= every and i % every == 0
                if hit:
                    inj.arm(1 if mode == "transient" else None)
                t0 = perf()
                v.iteration(batch)
                dt = perf() - t0
                inj.disarm()
                if i >= every:  # after a warm-up
                    (faulty if hit else normal).append(dt)
            verdicts = {f["verdict"] for f in v.triage.faults}
            row[mode] = {"normal_ms": statistics.median(normal) * 1e3, "fault_ms": statistics.median(faulty) * 1e3,
                         "ratio": statistics.median(faulty) / statistics.median(normal), "faults": len(faulty),
                         "verdicts": sorted(verdicts)}  # fmt: skip
            v.close()
        out[task] = row
        rows.append([f"`{task}`", f"{row['transient']['normal_ms']:.2f} ms",
                     f"{row['transient']['fault_ms']:.2f} ms (x{row['transient']['ratio']:.2f})",
                     f"{row['reproducible']['fault_ms']:.2f} ms (x{row['reproducible']['ratio']:.2f})",
                     f"{row['transient']['faults']} + {row['reproducible']['faults']}",
                     " / ".join(row[m]["verdicts"][0] if row[m]["verdicts"] else "-" for m in row)])  # fmt: skip
    print(table(["task", "fault-free iteration", "transient fault iteration", "reproducible fault iteration",
                 "faults timed", "diagnosed as"], rows))  # fmt: skip
    print("\nMedians. A fault iteration = the first run + restore + rerun + gradient checksums of both runs (+ one "
          "more restore when the batch is skipped).\n")
    res["attribution"] = out


# ---------------------------------------------------------------------------------------------------------- 3. suite
def suite_run(task: str, seed: int, scale: float, method: str, plan: FaultPlan, transient: tuple[int, int],
              skip: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One training run with the plan's data faults and two transient faults (NaN activation, inf gradient)."""
    torch.manual_seed(0)
    v = Variant(method, task, seed, scale, {"plain": "plain", "NonFiniteGuard": "guard", "FaultTriage": "triage",
                                           "reference": "plain"}[method])  # fmt: skip
    run = v.run
    torch.manual_seed(run.train_seed)
    inj = Injector(run, plan)
    act = FaultInjector(run.first_layer, kind="scale", factor=float("nan"))
    grad = FaultInjector(next(p for p in run.model.parameters() if p.requires_grad), kind="scale", factor=math.inf)
    stream = inj.batches(run.batches())
    t0 = perf()
    for i in range(run.iterations):
        batch = next(stream)
        if i == skip:
            continue
        if method != "reference":
            if i == transient[0]:
                act.arm()
            if i == transient[1]:
                grad.arm()
        with inj.step(i, v.opt):
            v.iteration(batch)
    wall = perf() - t0
    inj.close()
    act.remove()
    grad.remove()
    final = run.evaluate(run.model)
    out = {"test_metric": final["test_metric"], "train_loss": final["train_loss"], "wall_s": wall,
           "higher_is_better": run.higher_is_better, "model": v.model}  # fmt: skip
    if v.triage is not None:
        out["diagnoses"] = [(f["iteration"], f["verdict"], f["action"]) for f in v.triage.faults]
    if v.guard is not None:
        out["skipped"] = v.guard.log.counts()["skipped"]
    v.close()
    return out


def suite_section(res: dict[str, Any], task_names: list[str], seeds: list[int], scale: float) -> None:
    print("## 3. Diagnoses on the suite\n")
    out: dict[str, Any] = {}
    rows = []
    right = exact = total = 0
    for task in task_names:
        iters = tasks.make(task, 0, scale).iterations
        t_act, nan_at, t_grad = int(0.3 * iters), int(0.45 * iters), int(0.6 * iters)
        plan = FaultPlan("one-nan", (Fault("nan", nan_at),))
        per: dict[str, list[dict[str, Any]]] = {m: [] for m in ("reference", "plain", "NonFiniteGuard", "FaultTriage")}
        for seed in seeds:
            progress(f"suite: {task} seed {seed}")
            ref = suite_run(task, seed, scale, "reference", FaultPlan("none"), (t_act, t_grad), skip=nan_at)
            per["reference"].append(ref)
            for m in ("plain", "NonFiniteGuard", "FaultTriage"):
                per[m].append(suite_run(task, seed, scale, m, plan, (t_act, t_grad)))
            tr = per["FaultTriage"][-1]
            want = [(t_act, "transient", "continued"), (nan_at, "reproducible", "skipped"),
                    (t_grad, "transient", "continued")]  # fmt: skip
            ok = tr["diagnoses"] == want
            same = params_equal(tr["model"], ref["model"])
            right += ok
            exact += same
            total += 1
            tr["right"], tr["exact"] = ok, same
        def metric(m: str) -> str:  # noqa: E306
            xs = [r["test_metric"] for r in per[m]]
            if any(not math.isfinite(x) for x in xs):
                return f"nan in {sum(not math.isfinite(x) for x in xs)}/{len(xs)}"
            return f"{statistics.mean(xs):.4g}" + (f" ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else "")
        rows.append([f"`{task}`", metric("reference"), metric("plain"), metric("NonFiniteGuard"),
                     metric("FaultTriage"), f"{sum(r['right'] for r in per['FaultTriage'])}/{len(seeds)}",
                     f"{sum(r['exact'] for r in per['FaultTriage'])}/{len(seeds)}"])  # fmt: skip
        out[task] = {m: [{k: v for k, v in r.items() if k != "model"} for r in rs] for m, rs in per.items()}
    print(table(["task", "fault-free (batch skipped)", "plain", "NonFiniteGuard", "FaultTriage",
                 "diagnoses right", "bitwise = fault-free"], rows))  # fmt: skip
    print(f"\nTest metric of the task (mean ± std over seeds {seeds}; scale {scale}). `NonFiniteGuard` skips all three "
          "faulty iterations (two good batches lost to the machine); `FaultTriage` reruns them, continues with the "
          "two transient ones and skips only the bad batch, ending bit for bit where a fault-free run that skipped "
          "that batch ends.\n")  # fmt: skip
    res["suite"] = {"tasks": out, "right": right, "exact": exact, "runs": total}


# ---------------------------------------------------------------------------------------------------------- 4. determinism
def determinism_section(res: dict[str, Any], task_names: list[str], iters: int, device: str) -> None:
    print(f"## 4. Determinism report ({device})\n")
    out: dict[str, Any] = {}
    rows = []
    for task in task_names:
        progress(f"determinism: {task} on {device}")
        v = Variant("triage", task, 0, 1.0, "triage", device=device, report_every=1)
        for _ in range(iters):
            v.iteration(next(v.stream))
        rep = v.triage.determinism
        out[task] = rep.as_dict()
        for q, s in rep.stats.items():
            rows.append([f"`{task}`", q, s["runs"], s["identical"], f"{s['max_abs']:.3g}", f"{s['max_rel']:.3g}"])
        v.close()
    print(table(["task", "quantity", "reruns", "bitwise identical", "max abs diff", "max rel diff"], rows))
    print()
    res["determinism"] = {"device": device, "tasks": out,
                          "max_rel": max(s["max_rel"] for t in out.values() for s in t.values())}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run: fewer tasks, seeds and iterations")
    ap.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    ap.add_argument("--device", default="cpu", help="device for section 4 (the determinism report)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here; section 4 runs on cpu", file=sys.stderr)
        args.device = "cpu"
    if args.quick:
        over_tasks, rounds, per_block = ["label_noise", "cnn_bn"], 5, 10
        attr_tasks, attr_iters, every = ["label_noise"], 60, 10
        suite_tasks, seeds, scale = ["wine_zero", "cnn_bn"], [0], 0.2
        det_tasks, det_iters = ["cnn_bn"], 10
    else:
        over_tasks, rounds, per_block = ["label_noise", "cnn_bn", "transformer_lm"], 15, 20
        attr_tasks, attr_iters, every = ["label_noise", "cnn_bn", "transformer_lm"], 200, 10
        suite_tasks, seeds, scale = tasks.names(), [0, 1, 2], 0.5
        det_tasks, det_iters = ["cnn_bn", "transformer_lm", "gru_forecast", "recommender"], 30
    print("# torchrewind fault-triage benchmark\n")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, 1 thread{', quick' if args.quick else ''}\n")  # fmt: skip
    res: dict[str, Any] = {"settings": {"quick": args.quick, "seeds": seeds, "scale": scale, "device": args.device}}
    overhead_section(res, over_tasks, rounds, per_block)
    attribution_section(res, attr_tasks, attr_iters, every)
    suite_section(res, suite_tasks, seeds, scale)
    determinism_section(res, det_tasks, det_iters, args.device)
    s = res["suite"]
    worst = max(r["FaultTriage (defaults)"]["median_ratio"] for r in res["overhead"].values())
    res["verdicts"] = {
        "diagnoses_right": f"{s['right']}/{s['runs']}",
        "bitwise_exact": f"{s['exact']}/{s['runs']}",
        "worst_overhead_ratio": worst,
        "cpu_determinism_zero": res["determinism"]["max_rel"] == 0.0 if args.device == "cpu" else None,
    }
    print("## Verdicts\n")
    print(f"* diagnoses right in {s['right']}/{s['runs']} runs; final parameters bitwise equal to the fault-free run "
          f"(bad batch skipped) in {s['exact']}/{s['runs']}")  # fmt: skip
    print(f"* overhead of FaultTriage without faults: at most x{worst:.3f} per iteration")
    print(f"* determinism report on {res['determinism']['device']}: largest relative difference "
          f"{res['determinism']['max_rel']:.3g}")  # fmt: skip
    if args.json:
        Path(os.path.abspath(args.json)).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
