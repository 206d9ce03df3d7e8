#!/usr/bin/env python
"""Sanity of the task suite (``benchmarks/suite``): every task trained with plain Adam and plain SGD (momentum 0.9) at
its suggested learning rate, over several seeds, so a reader sees that every task learns, that the near-zero-loss
task gets near zero, and what each run costs.

Usage::

    python benchmarks/bench_suite.py                  # 3 seeds, full-length runs (a few minutes on 2 cores)
    python benchmarks/bench_suite.py --quick          # CI smoke run (seconds): runs and data shrunk 10x, 2 seeds
    python benchmarks/bench_suite.py --json out.json  # also write every run (per-iteration losses included)
    python benchmarks/bench_suite.py --grid           # instead: how the suggested lrs were chosen (an lr grid per
                                                      # task and optimizer, judged on the validation split)
    python benchmarks/bench_suite.py --describe       # the tasks table (markdown)

Runs go through ``benchmarks.suite.run_many``: 2 worker processes, one torch thread each, denormals flushed to
zero. "time" is the median wall time of a run's training loop (evaluation excluded); under load it grows, so the
run also reports the time of a reference iteration (the digits MLP of ``bench_core.py``: 64-256-256-10, Adam,
batch 64) measured in this process just before the study, and each task's time in those reference iterations.
Nothing here asserts on a number: the verdicts are printed and stored in the JSON; the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.suite` from the repository root

import torch  # noqa: E402

from benchmarks.suite import Config, adam, run_many, sgd, tasks  # noqa: E402
from benchmarks.suite.runner import reference_ms  # noqa: E402
from benchmarks.suite.stats import fmt, group, table  # noqa: E402

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
SGD_GRID = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
IDLE_REFERENCE_MS = 1.92  # the reference iteration on an idle core of the 2-core machine (README's bench_core table)


def finite(xs: list[float]) -> bool:
    return all(math.isfinite(x) for x in xs)


def sanity(results: list[dict[str, Any]]) -> tuple[list[list[Any]], list[dict[str, Any]], dict[str, Any]]:
    rows, records = [], []
    learns: dict[str, list[str]] = {"adam": [], "sgd": []}
    for (task, config), rs in group(results, "task", "config").items():
        t = tasks.TASKS[task]
        init = [r["initial"]["train_loss"] for r in rs]
        final = [r["final"].get("train_loss", math.nan) for r in rs]
        val = [r["final"].get("val_metric", math.nan) for r in rs]
        test = [r["final"].get("test_metric", math.nan) for r in rs]
        wall = statistics.median(r["wall_s"] for r in rs)
        iters = rs[0]["iterations"]
        # each run's time per iteration over the reference iteration timed right after it, in the same worker
        ratio = statistics.median(r["wall_s"] / max(r["completed"], 1) * 1e3 / r["reference_ms"] for r in rs)
        idle = ratio * IDLE_REFERENCE_MS * iters / 1e3
        ok = finite(final) and all(f < 0.9 * i for f, i in zip(final, init)) and not any(r["error"] for r in rs)
        if ok:
            learns[config].append(task)
        rows.append([task, t.kind.split(" (")[0], t.split, config, fmt(init), fmt(final),
                     f"{rs[0]['metric']}: {fmt(val)}", fmt(test), f"{wall:.2f} s",
                     f"{ratio:.1f}×", f"{idle:.2f} s", "yes" if ok else "**no**"])  # fmt: skip
        records.append({"task": task, "kind": t.kind, "split": t.split, "config": config, "iterations": iters,
                        "initial_train_loss": init, "final_train_loss": final, "val_metric": val,
                        "test_metric": test, "metric": rs[0]["metric"], "wall_s_median": wall,
                        "per_iteration_in_reference": ratio, "idle_s": idle, "learns": ok})  # fmt: skip
    zero = [r for r in records if r["task"] == "wine_zero"]
    verdicts = {
        "every_task_learns_with_adam": len(learns["adam"]) == len(tasks.TASKS),
        "every_task_learns_with_sgd": len(learns["sgd"]) == len(tasks.TASKS),
        "not_learning": {c: sorted(set(tasks.TASKS) - set(v)) for c, v in learns.items()},
        "near_zero_task_final_train_loss": {r["config"]: max(r["final_train_loss"]) for r in zero},
        "slowest_run_s": max(r["wall_s_median"] for r in records),
        "slowest_run_at_idle_reference_s": max(r["idle_s"] for r in records),
    }
    return rows, records, verdicts


def grid(args: argparse.Namespace, scale: float) -> dict[str, Any]:
    configs = [Config(f"adam {lr:g}", adam(lr)) for lr in ADAM_GRID]
    configs += [Config(f"sgd {lr:g}", sgd(lr)) for lr in SGD_GRID]
    results = run_many(configs, args.tasks, range(args.seeds), workers=args.workers, scale=scale,
                       progress=not args.quiet)  # fmt: skip
    print("\n## lr grid, judged on the validation split\n")
    print(f"Mean over {args.seeds} seeds; best = highest mean validation metric (lowest for error metrics), ties "
          "(within 1e-9) broken by validation loss. Diverged runs (non-finite validation loss) are never best.\n")
    rows, best = [], {}
    for (task,), rs in group(results, "task").items():
        run = tasks.make(task, 0, scale)
        sign = 1 if run.higher_is_better else -1
        for opt, grid_ in (("adam", ADAM_GRID), ("sgd", SGD_GRID)):
            scores = []
            for lr in grid_:
                sel = [r for r in rs if r["config"] == f"{opt} {lr:g}"]
                vl = [r["final"].get("val_loss", math.nan) for r in sel]
                vm = [r["final"].get("val_metric", math.nan) for r in sel]
                if finite(vl) and finite(vm):
                    scores.append((round(sign * statistics.fmean(vm), 9), -statistics.fmean(vl), lr, vm))
            top = max(scores) if scores else None
            suggested = run.adam_lr if opt == "adam" else run.sgd_lr
            best[f"{task}/{opt}"] = top[2] if top else None
            rows.append([task, opt, f"{top[2]:g}" if top else "–", fmt(top[3]) if top else "–", f"{suggested:g}",
                         "" if top and top[2] == suggested else "differs"])  # fmt: skip
    print(table(["task", "optimizer", "best lr on validation", "its validation metric", "suggested lr", ""], rows))
    return {"best": best, "results": results}


def tasks_table() -> str:
    """The tasks table of benchmarks/suite/README.md."""
    rows = [[f"`{r['name']}`", r["kind"], r["split"], r["data"], r["model"], f"{r['params']:,}",
             r["train_examples"], r["batch"], r["iterations"], f"{r['sgd_lr']:g}", f"{r['adam_lr']:g}", r["metric"]]
            for r in tasks.describe()]  # fmt: skip
    return table(["name", "kind", "split", "data", "model", "params", "train examples", "batch", "iterations",
                  "SGD lr", "Adam lr", "metric"], rows)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: runs and data shrunk 10x, 2 seeds")
    p.add_argument("--json", type=Path, help="write the settings, table rows, verdicts and every run here")
    p.add_argument("--seeds", type=int, help="seeds per task and optimizer (default 3; --quick: 2)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--tasks", nargs="*", help="only these tasks (default: all)")
    p.add_argument("--grid", action="store_true", help="instead: the lr grid behind the suggested lrs (validation)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--describe", action="store_true", help="print the tasks table (markdown) and exit")
    args = p.parse_args()
    if args.describe:
        print(tasks_table())
        return
    args.seeds = args.seeds or (2 if args.quick else 3)
    scale = 0.1 if args.quick else 1.0

    torch.set_num_threads(1)  # this process only orchestrates; the reference is timed on one thread, as in workers
    ref = reference_ms()
    print("# torchrewind task suite: sanity run\n")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}; "
          f"{args.workers} worker processes x 1 thread; seeds {list(range(args.seeds))}; scale {scale:g}"
          f"{' (--quick)' if args.quick else ''}. Reference iteration (64-256-256-10 MLP, Adam, batch 64, one "
          f"thread): {ref:.2f} ms in this process before the study.\n")  # fmt: skip
    if args.grid:
        out_grid = grid(args, scale)
        if args.json:
            settings = {"seeds": list(range(args.seeds)), "scale": scale}
            args.json.write_text(json.dumps({"settings": settings, **out_grid}))
            print(f"\nWrote {args.json}")
        return
    t0 = time.perf_counter()
    configs = [Config("adam", adam()), Config("sgd", sgd())]
    results = run_many(configs, args.tasks, range(args.seeds), workers=args.workers, scale=scale,
                       progress=not args.quiet, reference=10 if args.quick else 50)  # fmt: skip
    elapsed = time.perf_counter() - t0
    rows, records, verdicts = sanity(results)
    print("## Suite sanity: plain Adam and plain SGD (momentum 0.9) at each task's suggested lr\n")
    print("Mean ± std over seeds. Train loss: on a fixed training subset, eval mode, before -> after training. "
          "Metrics: validation and test splits (lr choices are made on validation only). \"learns\": the final "
          "train loss is finite and below 0.9x the initial one for every seed. \"time\": median wall time of the "
          "training loop here. \"per iter\": median over seeds of a run's time per iteration / the reference "
          "iteration timed right after it in the same worker; \"at idle\": that x "
          f"{IDLE_REFERENCE_MS} ms (the reference on an idle core) x iterations, the run's cost on an unloaded "
          "core.\n")  # fmt: skip
    print(table(["task", "kind", "split", "optimizer", "train loss before", "train loss after", "val metric",
                 "test metric", "time", "per iter", "at idle", "learns"], rows))  # fmt: skip
    print(f"\nEvery task learns with Adam: {verdicts['every_task_learns_with_adam']}; with SGD: "
          f"{verdicts['every_task_learns_with_sgd']} (not learning: {verdicts['not_learning']})"
          + (" — --quick runs are 10x shorter: too short to judge." if args.quick else "."))
    print("Near-zero-loss task (wine_zero) final train loss, worst seed: "
          + ", ".join(f"{k} {v:.2e}" for k, v in verdicts["near_zero_task_final_train_loss"].items()) + ".")
    print(f"Slowest task (median run): {verdicts['slowest_run_s']:.2f} s here, "
          f"{verdicts['slowest_run_at_idle_reference_s']:.2f} s at the idle reference; whole study {elapsed:.1f} s "
          f"wall for {len(results)} runs.")
    out: dict[str, Any] = {
        "settings": {"seeds": list(range(args.seeds)), "scale": scale, "workers": args.workers, "quick": args.quick,
                     "torch": torch.__version__, "python": platform.python_version(), "reference_ms": ref,
                     "elapsed_s": elapsed},  # fmt: skip
        "rows": records,
        "verdicts": verdicts,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
