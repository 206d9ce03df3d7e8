#!/usr/bin/env python
"""Could a guard see an lr spike in the size of the step? A probe on the task suite, not a feature.

The suite's ``lr`` fault (every lr x50 for 5 steps) is the one ``SpikeGuard`` misses on the two Transformers
(``transformer_lm``, ``vit_digits``): the loss after it rises by less than a spike. The step itself is 50x larger, so
this measures, after every Adam step, the largest relative change of any parameter's norm (``BufferWatch`` over the
parameters: ``max |Δ log‖p‖|``, one fused norm per step) and its ratio to the median of the previous 50 steps — on
clean runs (how large it gets by itself) and at the first faulted step of the ``lr`` plan.

Usage::

    python benchmarks/probe_updates.py                   # 14 tasks, 3 seeds, half-length runs (~3 min)
    python benchmarks/probe_updates.py --tasks vit_digits,matrix_factorisation --seeds 5

A watch with a fixed ratio threshold separates the fault from healthy training on a task when the smallest faulted
ratio is above the largest clean one. Nothing is asserted; the exit status is 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.suite import Config, adam, run_many, stats, tasks  # noqa: E402
from benchmarks.suite.runner import Step  # noqa: E402
from torchrewind.policies.buffers import BufferWatch  # noqa: E402

WINDOW = 50  # as SpikeDetector's default window
WARMUP = 20


def watched(run: Any, opt: torch.optim.Optimizer) -> Step:
    """Plain training that logs each step's largest relative change of a parameter's norm."""
    watch = BufferWatch([p for g in opt.param_groups for p in g["params"]], "probe")
    watch.rebase()  # the reference: the parameters before the first step (then after each step: only steps move them)
    changes: list[float] = []

    def after_backward(loss: torch.Tensor) -> None:
        opt.step()
        changes.append(watch.change())
        watch.accept()

    return Step(after_backward=after_backward, info=lambda: {"changes": changes})


def ratio(changes: list[float], i: int) -> float:
    """Step ``i``'s change over the median of the previous ``WINDOW``."""
    med = statistics.median(changes[max(0, i - WINDOW) : i])
    return changes[i] / med if med > 0 else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", help="comma-separated (default: all 14)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    names = args.tasks.split(",") if args.tasks else tasks.names()
    plans = ("none", "lr")
    cfgs = [Config(f"probe/{plan}", adam(), watched, faults=None if plan == "none" else plan) for plan in plans]
    res = run_many(cfgs, tasks=names, seeds=range(args.seeds), scale=args.scale, workers=args.workers, progress=False)
    rows, separated = [], 0
    for t in names:
        clean, hit = [], []
        for r in (r for r in res if r["task"] == t):
            ch = r["step_info"]["changes"]
            if r["config"] == "probe/none":
                clean.append(max(ratio(ch, i) for i in range(WARMUP, len(ch))))
            else:  # at the first faulted step
                hit.append(ratio(ch, next(f["at"] for f in r["faults"]["faults"] if f["kind"] == "lr")))
        ok = min(hit) > max(clean)
        separated += ok
        rows.append([f"`{t}`", tasks.TASKS[t].split, f"{max(clean):.1f}", f"{min(hit):.1f}", "yes" if ok else "no"])
    print(f"Largest relative change of a parameter's norm per Adam step, over the median of the previous {WINDOW} "
          f"steps ({args.seeds} seeds, scale {args.scale:g}):\n")  # fmt: skip
    print(stats.table(["task", "split", "clean: largest", "lr x50: smallest at the fault", "separated"], rows))
    print(f"\nseparated on {separated} of {len(names)} tasks")


if __name__ == "__main__":
    main()
