#!/usr/bin/env python
"""Policies study of torchrewind on the task suite (``benchmarks/suite``): what the guards (``NonFiniteGuard``,
``SpikeGuard``) and the step-size searches (``LineSearch``, ``BoldDriver``) do with their defaults on 14 diverse
tasks nobody tuned them on, side by side with what users would pick instead.

Usage::

    python benchmarks/bench_policies.py                  # the study (3 seeds, runs at half length: ~30-40 min on
                                                         # the shared 2-core machine; resumes from its cache)
    python benchmarks/bench_policies.py --quick          # CI smoke run (< 1 min): 2 tasks, 3 seeds, tiny runs,
                                                         # no drift plan, a 3-point grid
    python benchmarks/bench_policies.py --json out.json  # also write the settings, tables, verdicts and every run
    python benchmarks/bench_policies.py --cache f.json   # where finished runs are kept (default: benchmarks/.cache/)
    python benchmarks/bench_policies.py --split tune     # only the tune half (how the defaults were chosen)
    python benchmarks/bench_policies.py --section guards --plans scale,burst,lr,nan --tasks cnn_bn,recommender
                                                         # which single fault costs what (plain, SpikeGuard
                                                         # before and now)
    python benchmarks/bench_policies.py --section guards --split tune --plans mixed --seeds 10 \
        --guard-variant lr_factor=0.1 --guard-variant detector.threshold=3
                                                         # SpikeGuard with other settings, side by side
    python benchmarks/bench_policies.py --section search --split tune --seeds 5 --search-variant uphill=take
                                                         # LineSearch(SGD) with other settings, side by side

Every configuration runs on every task of the chosen halves (``tune`` and ``report``; the defaults were chosen on
``tune`` alone) for several seeds through ``run_many`` (2 worker processes, one torch thread each, denormals
flushed, a JSON cache so an interrupted study resumes). Numbers are mean ± std over seeds; a verdict (win / tie /
loss) is the ±2 standard-error rule of ``stats.compare``.

1. **Guards** (Adam at each task's suggested lr): on clean runs, the false roll-backs and skips per 1000 iterations
   and any exception; on faulted runs (the suite's ``mixed`` plan: inputs x1e3 three times, a NaN input, the lr x50
   for 5 steps, a burst of 8 batches of shuffled labels; and ``drift``: inputs slowly scaled 1x -> 3x, which is no
   spike) the final test metric against the fault-free plain run. Side by side: plain training,
   ``clip_grad_norm_(1.0)``, clipping + ``NonFiniteGuard``, ``NonFiniteGuard``, Lightning's ``SpikeDetection``
   (the real class; its ``on_train_batch_end`` is driven with a minimal Fabric stand-in, and its documented
   recovery — resume from a checkpoint, skipping the batch it names and the one before — is emulated at no cost by
   undoing those two steps), ``SpikeGuard`` with its defaults (capacity 8) watching the model's buffers
   (``buffers=model``), the same with ``drop_first=False`` (every spike rolled back at once), SpikeGuard as it was
   before both (no buffers, ``drop_first=False``), and with ``buffers=model``: with ``SpikeDetector(noise="level")``
   (noise measured by the spread of the window's log-losses rather than their batch-to-batch differences) and with
   its previous detector (median/MAD of raw losses, min_rel 0.2).
2. **Step sizes** (no faults): ``LineSearch`` and ``BoldDriver`` with defaults and no grid (around SGD with
   momentum 0.9 started at lr 1 on every task, and around Adam at the task's suggested lr), against SGD (momentum
   0.9) and Adam each at the best of a 6-point lr grid (x0.03..x10 the task's suggested lr, chosen per task on the
   validation metric), the real SLS (``github.com/IssamLaradji/sls``, which has no license: it is never part of this
   repository; put its ``sls/`` folder in ``benchmarks/.peers/sls/`` to include it, else its row is skipped) and
   full-batch ``LBFGS(line_search_fn="strong_wolfe")`` given as many examples as the mini-batch runs see. "passes"
   counts a backward as two forwards, relative to plain training's 3 per iteration.
3. **Cost**: the wall time of the guarded runs relative to plain runs of the same task and seed (medians; noisy under
   load; only runs timed in the same session compare), the passes of the searches, and what watching buffers costs
   per iteration (``buffer_watch_cost``: interleaved, on one thread).

Nothing here asserts on a number: the verdicts are printed and stored in the JSON; the exit status is 0.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.suite` from the repository root

import torch  # noqa: E402

from benchmarks.suite import Config, adam, optimizer, policy, run_many, sgd, stats, tasks  # noqa: E402
from benchmarks.suite.runner import Step  # noqa: E402
from torchrewind import NonFiniteGuard, Rewind, SpikeDetector, SpikeGuard  # noqa: E402

CLIP = 1.0  # the customary max_norm (Hugging Face Trainer's max_grad_norm default)
GUARD_CAPACITY = 8  # SpikeGuard's roll-back reaches 8 steps back (rollback defaults to the capacity)
GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # x the task's suggested lr: 6 points around it
SEARCH_SGD_LR = 1.0  # LineSearch / BoldDriver / SLS start here on every task: no grid
PEERS = ROOT / "benchmarks" / ".peers"


# ---------------------------------------------------------------------------------------------------- step factories
def _events(log: Any) -> list[tuple[int, str]]:
    return [(e.iteration, e.kind) for e in log.events if e.kind != "accepted"]


def _guard_info(guard: Any) -> dict[str, Any]:
    return {**guard.log.counts(), "iterations": guard.iteration, "steps": guard.steps, "events": _events(guard.log)}


def spike_guard(run: Any, opt: torch.optim.Optimizer, previous: bool = False, level: bool = False,
                buffers: bool = True, detector: dict[str, Any] | None = None, **settings: Any) -> Step:
    """SpikeGuard with its defaults, watching the model's buffers (``buffers=model``), on a Rewind of capacity 8; or
    with the previous default detector, or with the noise measured from the spread of the log-losses instead of
    their batch-to-batch differences; ``buffers=False, drop_first=False``: SpikeGuard as it was before it watched
    buffers and dropped a first spike's batch (every spike rolled back). ``detector``: the loss detector's settings;
    ``settings``: SpikeGuard's (a ``--guard-variant``)."""
    det = SpikeDetector(space="linear", min_scale=0.0, min_abs=0.0, min_rel=0.2) if previous else \
        SpikeDetector(noise="level") if level else SpikeDetector(**detector) if detector else None  # fmt: skip
    guard = SpikeGuard(Rewind(run.model, opt, capacity=GUARD_CAPACITY), detector=det,
                       buffers=run.model if buffers else None, **settings)  # fmt: skip
    return Step(after_backward=guard.step, wrap=guard.wrap, info=lambda: _guard_info(guard))


def clipped(run: Any, opt: torch.optim.Optimizer, nonfinite: bool = False) -> Step:
    """clip_grad_norm_(CLIP), then the step (or NonFiniteGuard's decision)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    guard = NonFiniteGuard(Rewind(run.model, opt)) if nonfinite else None

    def after_backward(loss: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()

    if guard is None:
        return Step(after_backward=after_backward)
    return Step(after_backward=after_backward, wrap=guard.wrap, info=lambda: _guard_info(guard))


class _Strategy:
    """What SpikeDetection.on_train_batch_end asks of a Fabric strategy, for one process."""

    root_device = torch.device("cpu")

    def barrier(self) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Fabric's name
        return decision


class _Fabric:
    global_rank = 0
    strategy = _Strategy()


def lightning_detector(run: Any, opt: torch.optim.Optimizer) -> Step:
    """Lightning's SpikeDetection (defaults: mode min, window 10, warmup 1, rtol 2, finite_only) judging each
    iteration's loss after the step, as its callback does. It raises TrainingSpikeException and names the batch and the
    one before as bad; Lightning's recovery is a restart from a checkpoint skipping them: emulated here for free by
    undoing those two steps (a checkpoint before every step) and carrying on with the next batch."""
    from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    rw = Rewind(run.model, opt, capacity=2)
    tmp = tempfile.mkdtemp(prefix="spike-")
    det = SpikeDetection(exclude_batches_path=tmp)
    fabric = _Fabric()
    state = {"i": 0, "events": []}

    def after_backward(loss: torch.Tensor) -> None:
        i = state["i"]
        state["i"] += 1
        opt.step()
        try:
            det.on_train_batch_end(fabric, loss.detach(), None, i)
        except TrainingSpikeException:
            n = min(2, len(rw))
            if n:
                rw.undo(n)
            state["events"].append((i, "rolled_back"))

    def info() -> dict[str, Any]:
        return {"rolled_back": len(state["events"]), "iterations": state["i"], "events": state["events"]}

    return Step(after_backward=after_backward, info=info)


def sls_optimizer(run: Any) -> torch.optim.Optimizer:
    sys.path.insert(0, str(PEERS))
    from sls import Sls  # the real SLS, from benchmarks/.peers/sls (never committed: no license)

    per_epoch = max(1, run.info["train_examples"] // run.info["batch"])
    opt = Sls(run.model.parameters(), n_batches_per_epoch=per_epoch, init_step_size=SEARCH_SGD_LR)
    for g in opt.param_groups:  # SLS keeps its step size in its state; "lr" is only what the runner records
        g["lr"] = SEARCH_SGD_LR
    return opt


def sls_step(run: Any, opt: torch.optim.Optimizer) -> Step:
    def closure(loss_fn: Any) -> None:
        opt.zero_grad(set_to_none=True)
        opt.step(loss_fn)  # SLS does the backward, the trials and its own step-size bookkeeping
        for g in opt.param_groups:
            g["lr"] = float(opt.state["step_size"])

    return Step(closure=closure, info=lambda: {"step_size": float(opt.state["step_size"])})


def lbfgs_optimizer(run: Any) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(run.model.parameters(), lr=1.0, line_search_fn="strong_wolfe")


def lbfgs_step(run: Any, opt: torch.optim.Optimizer) -> Step:
    """Full-batch LBFGS given as many examples as the mini-batch runs see (evaluations x training set = iterations x
    batch), all of it at the first iteration (the later iterations do nothing)."""
    per_epoch = max(1, run.info["train_examples"] // run.info["batch"])
    stream = run.batches()
    batches = [next(stream) for _ in range(per_epoch)]  # one epoch: every training example once
    x = torch.cat([b[0] for b in batches])
    y0 = batches[0][1]
    y = tuple(torch.cat([b[1][k] for b in batches]) for k in range(len(y0))) if isinstance(y0, tuple) else \
        torch.cat([b[1] for b in batches])  # fmt: skip
    evals = max(1, round(run.iterations * run.info["batch"] / len(x)))
    state = {"done": False, "evals": 0}

    def full() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = run.loss(run.model, (x, y))
        loss.backward()
        state["evals"] += 1
        return loss

    def closure(loss_fn: Any) -> None:
        if state["done"]:
            return
        state["done"] = True
        opt.param_groups[0]["max_iter"] = evals
        opt.param_groups[0]["max_eval"] = evals
        opt.step(full)

    return Step(closure=closure, info=lambda: {"full_batch_evaluations": state["evals"], "budget": evals})


def _search(kind: str, run: Any, opt: torch.optim.Optimizer, **settings: Any) -> Step:
    import torchrewind as tr

    ls = getattr(tr, kind)(tr.Rewind(run.model, opt), **settings)
    lr0 = max(g["lr"] for g in opt.param_groups)

    def info() -> dict[str, Any]:
        lrs = [e.lrs[0] for e in ls.log.events]
        noop = sum(1 for e in ls.log.events if e.kind == "accepted" and e.loss_after is not None
                   and e.loss_after == e.loss)  # fmt: skip
        return {**ls.stats, "lr0": lr0, "lr_min": min(lrs, default=lr0), "lr_max": max(lrs, default=lr0),
                "lr_end": max(g["lr"] for g in opt.param_groups), "accepted_noops": noop}  # fmt: skip

    return Step(closure=ls.step, info=info)


def search(kind: str, **settings: Any) -> Any:
    return functools.partial(_search, kind, **settings)


# ---------------------------------------------------------------------------------------------------- variants
def parse_settings(text: str) -> dict[str, Any]:
    """``"lr_factor=0.1,detector.threshold=3"`` -> ``{"lr_factor": 0.1, "detector.threshold": 3}`` (values are Python
    literals; a bare word is a string)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"a variant is key=value[,key=value...], got {text!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def add_guard_variant(text: str, plans: tuple[str, ...]) -> str:
    """A SpikeGuard column as the study runs it (capacity 8, the model's buffers) with these settings
    (``--guard-variant``; ``detector.X``: the loss detector's setting X), run under ``plans``; returns its method
    name."""
    kw = parse_settings(text)
    det = {k.split(".", 1)[1]: kw.pop(k) for k in [k for k in kw if k.startswith("detector.")]}
    name = f"v[{text}]"
    GUARD_METHODS[name] = (f"SpikeGuard, `{text}`", functools.partial(spike_guard, detector=det, **kw), plans)
    return name


def add_search_variant(text: str) -> str:
    """A LineSearch row around SGD (momentum 0.9, lr 1, as the default row) with these settings
    (``--search-variant``; ``momentum=X`` goes to the optimizer instead); returns its method name."""
    kw = parse_settings(text)
    momentum = kw.pop("momentum", 0.9)
    name = f"linesearch-sgd[{text}]"
    SEARCH_METHODS[name] = (f"`LineSearch`, SGD lr={SEARCH_SGD_LR}, `{text}`",
                            optimizer("SGD", lr=SEARCH_SGD_LR, momentum=momentum), search("LineSearch", **kw))
    return name


# ---------------------------------------------------------------------------------------------------- configs
GUARD_METHODS = {  # name: (label, step factory, plans)
    "plain": ("plain", None, ("none", "mixed", "drift")),
    "clip": (f"clip_grad_norm_({CLIP})", clipped, ("none", "mixed", "drift")),
    "clip+nf": (f"clip_grad_norm_({CLIP}) + NonFiniteGuard", functools.partial(clipped, nonfinite=True),
                ("none", "mixed", "drift")),
    "nonfinite": ("NonFiniteGuard", policy("NonFiniteGuard"), ("none", "mixed")),
    "lightning": ("Lightning SpikeDetection (+ free restart)", lightning_detector, ("none", "mixed", "drift")),
    "spike-before": ("SpikeGuard before (no buffers, every spike rolled back)",
                     functools.partial(spike_guard, buffers=False, drop_first=False, recheck=0),
                     ("none", "mixed", "drift")),
    "spike-norecheck": ("SpikeGuard, `recheck=0` (no probation after a roll-back)",
                        functools.partial(spike_guard, recheck=0), ("none", "mixed", "drift")),
    "spike-nodrop": ("SpikeGuard, `drop_first=False`", functools.partial(spike_guard, drop_first=False),
                     ("none", "mixed")),
    "spike": ("**SpikeGuard** (defaults)", spike_guard, ("none", "mixed", "drift")),
    "spike-level": ("SpikeGuard, noise=\"level\"", functools.partial(spike_guard, level=True),
                    ("none", "mixed", "drift")),
    "spike-prev": ("SpikeGuard, previous detector", functools.partial(spike_guard, previous=True),
                   ("none", "mixed", "drift")),
}
# The run cache is keyed by a config's name: a method whose behaviour changed gets a new revision, so its runs are
# redone (rev 2: SpikeGuard watches the model's buffers and drops a first spike's batch; rev 3: probation after a
# roll-back, ``recheck``). "spike-before" is rev 1's "spike" exactly and "spike-norecheck" rev 2's (same code
# paths), so their cached runs stand.
REVISION = {"spike": 3, "spike-level": 3, "spike-prev": 3, "spike-nodrop": 3, "spike-norecheck": 2}
CACHE_NAME = {"spike-before": "spike", "spike-norecheck": "spike"}


def cname(method: str, plan: str) -> str:
    """The config (and cache) name of a guard method under a fault plan."""
    rev = REVISION.get(method)
    return f"guard/{CACHE_NAME.get(method, method)}{f'@{rev}' if rev else ''}/{plan}"


# what runs under the single-fault plans (--plans)
SINGLE_FAULT_METHODS = ("plain", "spike-before", "spike-norecheck", "spike")


def guard_configs(only: tuple[str, ...] = ("none", "mixed", "drift")) -> list[Config]:
    """The guard configs of the plans in ``only``; a plan outside the study's three (``scale``, ``burst``, ``lr``,
    ``nan``: one kind of fault each) runs plain training and SpikeGuard before and now, to see which fault costs
    what."""
    return [Config(cname(m, plan), adam(), step, faults=None if plan == "none" else plan)
            for m, (_, step, plans) in GUARD_METHODS.items() for plan in only
            if plan in plans or (plan not in ("none", "mixed", "drift") and m in SINGLE_FAULT_METHODS)]  # fmt: skip


SEARCH_METHODS = {  # name: (label, optimizer factory, step factory)
    "linesearch-sgd": (f"`LineSearch`, SGD lr={SEARCH_SGD_LR}", optimizer("SGD", lr=SEARCH_SGD_LR, momentum=0.9),
                       search("LineSearch")),
    "linesearch-adam": ("`LineSearch`, Adam at the suggested lr", adam(), search("LineSearch")),
    "bolddriver-sgd": (f"`BoldDriver`, SGD lr={SEARCH_SGD_LR}", optimizer("SGD", lr=SEARCH_SGD_LR, momentum=0.9),
                       search("BoldDriver")),
    "sls": (f"SLS (real, Armijo, init_step_size={SEARCH_SGD_LR})", sls_optimizer, sls_step),
    "lbfgs": ("LBFGS full batch, strong Wolfe", lbfgs_optimizer, lbfgs_step),
}


# rev 2: a trial that leaves the loss as it was ends the search; around SGD with momentum a trial whose direction goes
# uphill restarts the momentum (uphill="auto"); rev 3 (SGD only): c="auto" is 0.3 around SGD. These runs are redone.
SEARCH_REVISION = {"linesearch-sgd": 3, "linesearch-adam": 2, "bolddriver-sgd": 2}


def sname(method: str) -> str:
    """The config (and cache) name of a search method."""
    rev = SEARCH_REVISION.get(method.split("[", 1)[0])
    return f"search/{method}{f'@{rev}' if rev else ''}"


def search_configs(with_sls: bool, grid: tuple[float, ...] = GRID) -> list[Config]:
    out = [Config(f"grid/{o}/x{s:g}", f(lr_scale=s)) for o, f in (("sgd", sgd), ("adam", adam)) for s in grid]
    out += [Config(sname(m), o, st) for m, (_, o, st) in SEARCH_METHODS.items() if m != "sls" or with_sls]
    return out


# ---------------------------------------------------------------------------------------------------- analysis
def metric(r: dict[str, Any], key: str = "test_metric") -> float:
    v = r.get("final", {}).get(key, math.nan)
    return float(v) if v is not None else math.nan


def by(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in stats.group(results, "config", "task").items()}


def false_rate(r: dict[str, Any]) -> float:
    """Non-accepted decisions per 1000 iterations (clean runs: all of them are false)."""
    ev = (r.get("step_info") or {}).get("events", [])
    return 1000.0 * len(ev) / max(r.get("completed", 0) or r["iterations"], 1)


# columns of the false-alarm table
FALSE_METHODS = ("spike", "spike-norecheck", "spike-before", "spike-level", "spike-prev", "lightning")


def false_methods() -> tuple[str, ...]:
    """The false-alarm table's columns: the fixed ones and any ``--guard-variant``."""
    return FALSE_METHODS + tuple(m for m in GUARD_METHODS if m.startswith("v["))


def guard_analysis(results: list[dict[str, Any]], task_names: list[str],
                   plans: tuple[str, ...] = ("none", "mixed", "drift")) -> dict[str, Any]:  # fmt: skip
    g = by(results)
    rows_false, rows_fault, verdicts, records = [], [], {}, []
    for t in task_names:
        split = tasks.TASKS[t].split
        ref = g.get((cname("plain", "none"), t), [])
        hib = bool(ref and ref[0]["higher_is_better"])
        row = [f"`{t}`", split]
        for m in false_methods():
            rs = g.get((cname(m, "none"), t), [])
            if not rs:
                continue
            rates = [false_rate(r) for r in rs]
            errs = sum(1 for r in rs if r.get("error"))
            row.append(f"{stats.mean(rates):.1f}" + (f" ({errs} raised)" if errs else ""))
            records.append({"table": "false", "task": t, "method": m, "per_1000": rates, "errors": errs})
        rows_false.append(row)
        for plan in plans:
            frow = [f"`{t}`", split, plan]
            for m in GUARD_METHODS:
                rs = g.get((cname(m, plan), t), [])
                if not rs:
                    frow.append("–")
                    continue
                xs = [metric(r) for r in rs]
                v = stats.compare(xs, [metric(r) for r in ref], lower_is_better=not hib) if ref else "?"
                errs = sum(1 for r in rs if r.get("error"))
                rb = stats.mean([len((r.get("step_info") or {}).get("events", [])) for r in rs])
                extra = f", {rb:.1f} ev" if m not in ("plain", "clip") else ""
                frow.append(f"{stats.fmt(xs)} ({v}{extra})" + (f" [{errs} raised]" if errs else ""))
                verdicts.setdefault(f"{m}/{plan}", {}).setdefault(v, []).append(t)
                records.append({"table": "faults", "task": t, "plan": plan, "method": m, "test_metric": xs,
                                "vs_fault_free_plain": v, "errors": errs})  # fmt: skip
            rows_fault.append(frow)
    return {"false": rows_false, "faults": rows_fault, "verdicts": verdicts, "records": records}


def passes(r: dict[str, Any]) -> float:
    """Forward-equivalents per iteration (a backward counts two), relative to plain training's 3."""
    info = r.get("step_info") or {}
    if "full_batch_evaluations" in info:  # LBFGS: its budget of full-batch evaluations is the runs' examples
        return info["full_batch_evaluations"] / max(info["budget"], 1)
    return (r.get("forwards", 0) + 2 * r.get("backwards", 0)) / (3.0 * max(r.get("completed", 1), 1))


def search_analysis(results: list[dict[str, Any]], task_names: list[str], with_sls: bool) -> dict[str, Any]:
    g = by(results)
    rows, verdicts, records, best = [], {}, [], {}
    for t in task_names:
        split = tasks.TASKS[t].split
        any_r = next((rs for (c, tt), rs in g.items() if tt == t), None)
        if not any_r:
            continue
        hib = bool(any_r[0]["higher_is_better"])
        for o in ("sgd", "adam"):  # best of the grid on the validation metric (ties: validation loss)
            cands = []
            for s in GRID:
                rs = g.get((f"grid/{o}/x{s:g}", t), [])
                if not rs:
                    continue
                val = stats.mean([metric(r, "val_metric") for r in rs])
                vloss = stats.mean([metric(r, "val_loss") for r in rs])
                key = (-val if hib else val) if math.isfinite(val) else math.inf
                cands.append((key, vloss if math.isfinite(vloss) else math.inf, s))
            if cands:
                best[(o, t)] = min(cands)[2]
        def cell(rs: list[dict[str, Any]], ref: list[dict[str, Any]] | None, key: str, lower: bool) -> str:
            xs = [metric(r, key) for r in rs]
            v = f" ({stats.compare(xs, [metric(r, key) for r in ref], lower_is_better=lower)})" if ref else ""
            return stats.fmt(xs) + v

        sgd_best = g.get((f"grid/sgd/x{best.get(('sgd', t), 1.0):g}", t), [])
        adam_best = g.get((f"grid/adam/x{best.get(('adam', t), 1.0):g}", t), [])
        adam_start = g.get(("grid/adam/x1", t), [])
        entries = [("SGD, best of grid (x%g)" % best.get(("sgd", t), math.nan), sgd_best, None),
                   ("Adam, best of grid (x%g)" % best.get(("adam", t), math.nan), adam_best, None)]  # fmt: skip
        for m, (label, _, _) in SEARCH_METHODS.items():
            if m == "sls" and not with_sls:
                continue
            ref = adam_start if m == "linesearch-adam" else sgd_best
            entries.append((label, g.get((sname(m), t), []), ref))
        for label, rs, ref in entries:
            if not rs:
                continue
            info = [r.get("step_info") or {} for r in rs]
            p = statistics.median(passes(r) for r in rs)
            extra = ""
            if "lr_min" in info[0]:
                lo = min(i["lr_min"] / i["lr0"] for i in info)
                hi = max(i["lr_max"] / i["lr0"] for i in info)
                extra = f"{lo:.2g}..{hi:.2g}"
            row = [f"`{t}`", split, label, cell(rs, ref, "train_loss", True), cell(rs, ref, "test_metric", not hib),
                   f"{p:.2f}x" if math.isfinite(p) else "–", extra]  # fmt: skip
            rows.append(row)
            if ref:
                v_train = stats.compare([metric(r, "train_loss") for r in rs], [metric(r, "train_loss") for r in ref],
                                        lower_is_better=True)  # fmt: skip
                v_test = stats.compare([metric(r) for r in rs], [metric(r) for r in ref], lower_is_better=not hib)
                verdicts.setdefault(label, {"train": {}, "test": {}})
                verdicts[label]["train"].setdefault(v_train, []).append(t)
                verdicts[label]["test"].setdefault(v_test, []).append(t)
            records.append({"task": t, "split": split, "method": label, "train_loss": [metric(r, "train_loss")
                            for r in rs], "test_metric": [metric(r) for r in rs], "passes": p,
                            "info": info, "errors": sum(1 for r in rs if r.get("error"))})  # fmt: skip
    return {"rows": rows, "verdicts": verdicts, "records": records, "best_grid": {f"{o}/{t}": s
            for (o, t), s in best.items()}}  # fmt: skip


def cost_analysis(results: list[dict[str, Any]]) -> dict[str, Any]:
    g = {(r["config"], r["task"], r["seed"]): r for r in results}
    out = {}
    for m in GUARD_METHODS:
        p = cname("plain", "none")
        ratios = [r["wall_s"] / g[(p, t, s)]["wall_s"] for (c, t, s), r in g.items()
                  if c == cname(m, "none") and (p, t, s) in g and g[(p, t, s)]["wall_s"] > 0]  # fmt: skip
        if ratios:
            out[m] = statistics.median(ratios)
    return out


def buffer_watch_cost(quick: bool = False) -> dict[str, Any]:
    """What watching buffers (``SpikeGuard(..., buffers=model)``) costs per iteration, on one thread: the watch alone
    (``BufferWatch.change()`` + ``accept()``) for ``cnn_bn``'s 4 buffers and for the 98 BatchNorm buffers of
    ResNet-50's channel widths, and whole ``cnn_bn`` iterations with the buffers watched / not, in interleaved blocks
    (medians)."""
    import torch.nn.functional as F

    from torchrewind.policies import BufferWatch

    widths = [64] + [64, 64, 256] * 3 + [128, 128, 512] * 4 + [256, 256, 1024] * 6 + [512, 512, 2048] * 3
    resnet_bn = torch.nn.Sequential(*[torch.nn.BatchNorm2d(c) for c in widths])
    reps, blocks = (50, 3) if quick else (300, 9)

    def watch_ms(model: torch.nn.Module) -> tuple[float, int]:
        w = BufferWatch(model)
        w.change()
        w.accept()
        ts = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(reps):
                w.change()
                w.accept()
            ts.append((time.perf_counter() - t0) / reps * 1e3)
        return statistics.median(ts), w.count

    runs = {}
    for watched in (False, True):
        run = tasks.make("cnn_bn", 0, 0.5)
        opt = torch.optim.Adam(run.model.parameters(), lr=run.adam_lr)
        guard = SpikeGuard(Rewind(run.model, opt, capacity=GUARD_CAPACITY), buffers=run.model if watched else None)
        runs[watched] = (run, opt, guard, iter(guard.wrap(run.batches())))

    def block(watched: bool, n: int) -> float:
        run, opt, guard, it = runs[watched]
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = next(it)
            loss = F.cross_entropy(run.model(x), y)
            opt.zero_grad()
            loss.backward()
            guard.step(loss)
        return (time.perf_counter() - t0) / n * 1e3

    ratios = []
    for _ in range(blocks):
        a = block(False, 10 if quick else 50)
        b = block(True, 10 if quick else 50)
        ratios.append(b / a)
    cnn_ms, cnn_n = watch_ms(runs[True][0].model)
    res_ms, res_n = watch_ms(resnet_bn)
    return {"cnn_bn_watch_ms": cnn_ms, "cnn_bn_buffers": cnn_n, "resnet50_bn_watch_ms": res_ms,
            "resnet50_bn_buffers": res_n, "cnn_bn_iteration_ratio": statistics.median(ratios),
            "cnn_bn_iteration_ratios": ratios}  # fmt: skip


def verdict_line(v: dict[str, list[str]]) -> str:
    return ", ".join(f"{k} {len(v.get(k, []))}" for k in stats.VERDICTS)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, tiny runs, 3 seeds, fewer configs")
    p.add_argument("--json", type=Path, help="write settings, tables, verdicts and every run here")
    p.add_argument("--cache", type=Path, help="JSON cache of finished runs (default: benchmarks/.cache/policies*.json)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3)")
    p.add_argument("--scale", type=float, help="run length and data as a fraction of the suite's (default 0.5)")
    p.add_argument("--split", choices=("tune", "report", "both"), default="both", help="which halves (default both)")
    p.add_argument("--section", choices=("guards", "search", "both"), default="both")
    p.add_argument("--plans", help="guard section: fault plans, comma-separated (default none,mixed,drift; the "
                   "single-fault plans scale, burst, lr, nan run plain and SpikeGuard before/now)")
    p.add_argument("--tasks", help="only these tasks, comma-separated (default: those of --split)")
    p.add_argument("--guard-variant", action="append", default=[], metavar="K=V,...",
                   help="guard section: also run SpikeGuard with these settings (repeatable), e.g. lr_factor=0.1 or "
                   "detector.threshold=3")
    p.add_argument("--search-variant", action="append", default=[], metavar="K=V,...",
                   help="search section: also run LineSearch around SGD with these settings (repeatable), e.g. "
                   "uphill=take, grow=1.05 or momentum=0 (the optimizer's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args()

    torch.set_num_threads(1)
    seeds = list(range(args.seeds if args.seeds else 3))
    scale = args.scale if args.scale else (0.06 if args.quick else 0.5)
    if args.tasks:  # also with --quick (it used to be overridden there)
        task_names = args.tasks.split(",")
    elif args.quick:
        task_names = ["wine_zero", "gru_forecast"]  # one per half
    else:
        task_names = tasks.names(None if args.split == "both" else args.split)
    with_sls = (PEERS / "sls" / "sls.py").exists()
    cache = args.cache or ROOT / "benchmarks" / ".cache" / f"policies{'-quick' if args.quick else ''}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    settings = {"seeds": seeds, "scale": scale, "tasks": task_names, "workers": args.workers, "clip": CLIP,
                "guard_capacity": GUARD_CAPACITY, "grid": GRID, "search_sgd_lr": SEARCH_SGD_LR, "sls": with_sls,
                "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    t0 = time.time()
    out: dict[str, Any] = {"settings": settings}
    print("# torchrewind policies study (benchmarks/bench_policies.py)\n")
    print(f"{len(task_names)} tasks ({', '.join(task_names)}), seeds {seeds}, runs at scale {scale:g} of the suite's "
          f"length, torch {torch.__version__}, {args.workers} workers x 1 thread; mean ± std over seeds, verdicts by "
          "±2 standard errors.\n")  # fmt: skip

    results: list[dict[str, Any]] = []
    if args.section in ("guards", "both"):
        plans = tuple(args.plans.split(",")) if args.plans else ("none", "mixed") if args.quick else \
            ("none", "mixed", "drift")  # fmt: skip
        if "none" not in plans:
            plans = ("none", *plans)  # the fault-free reference
        for text in args.guard_variant:
            add_guard_variant(text, plans)
        res = run_many(guard_configs(plans), tasks=task_names, seeds=seeds, scale=scale, cache=cache,
                       workers=args.workers, progress=not args.quiet)  # fmt: skip
        results += res
        ga = guard_analysis(res, task_names, plans)
        out["faults"] = ga
        print("## 1. Fault injection and false alarms (Adam, suggested lr)\n")
        print("False roll-backs and skips per 1000 clean iterations (goal 0; \"raised\": the guard stopped a healthy "
              "run):\n")  # fmt: skip
        print(stats.table(["task", "split", *[GUARD_METHODS[m][0] for m in false_methods()]], ga["false"]))
        print("\nFinal test metric; the verdict compares with plain training without faults (\"ev\": non-accepted "
              "decisions per run):\n")  # fmt: skip
        print(stats.table(["task", "split", "plan", *[GUARD_METHODS[m][0] for m in GUARD_METHODS]], ga["faults"]))
        print("\nVerdicts against fault-free plain training (tasks):")
        for k, v in ga["verdicts"].items():
            print(f"  {k:24s} {verdict_line(v)}" + (f"  (losses: {', '.join(v['loss'])})" if v.get("loss") else ""))
        print()
    if args.section in ("search", "both"):
        if not with_sls:
            print(f"(SLS skipped: no {PEERS / 'sls'}; see the module docstring)\n")
        grid = (0.3, 1.0, 3.0) if args.quick else GRID
        for text in args.search_variant:
            add_search_variant(text)
        res = run_many(search_configs(with_sls, grid), tasks=task_names, seeds=seeds, scale=scale, cache=cache,
                       workers=args.workers, progress=not args.quiet)  # fmt: skip
        results += res
        sa = search_analysis(res, task_names, with_sls)
        out["linesearch"] = sa
        print("## 2. Step sizes without a grid (no faults)\n")
        print("Verdicts: `LineSearch`(Adam) against Adam at its starting lr, every other row against SGD at the best "
              "of its grid; \"lr range\": lowest..highest lr over the run / the starting lr.\n")  # fmt: skip
        print(stats.table(["task", "split", "method", "train loss", "test metric", "passes", "lr range"], sa["rows"]))
        print("\nVerdicts on train loss / test metric (tasks):")
        for k, v in sa["verdicts"].items():
            print(f"  {k:44s} train: {verdict_line(v['train'])}; test: {verdict_line(v['test'])}")
        print()
    cost = cost_analysis(results)
    out["overhead"] = cost
    print("## 3. Overhead\n")
    print("Median wall time of a clean run relative to plain training, same task and seed (only meaningful for runs "
          "timed in the same session: cached runs keep the load of theirs): " +
          ", ".join(f"{k} {v:.2f}x" for k, v in cost.items()) + "\n")  # fmt: skip
    if args.section in ("guards", "both"):
        bw = buffer_watch_cost(args.quick)
        out["overhead_buffers"] = bw
        print(f"Watching buffers (`SpikeGuard(..., buffers=model)`, 1 thread, medians): {bw['cnn_bn_watch_ms']:.3f} ms "
              f"per iteration for cnn_bn's {bw['cnn_bn_buffers']} buffers, {bw['resnet50_bn_watch_ms']:.3f} ms for "
              f"the {bw['resnet50_bn_buffers']} BatchNorm buffers of ResNet-50's widths; a whole cnn_bn iteration "
              f"watched / not: {bw['cnn_bn_iteration_ratio']:.2f}x (interleaved blocks)\n")  # fmt: skip
    out["verdicts"] = {"guards": out.get("faults", {}).get("verdicts", {}),
                       "search": out.get("linesearch", {}).get("verdicts", {})}  # fmt: skip
    out["total_s"] = time.time() - t0
    print(f"study: {out['total_s']:.0f} s (cached runs are not rerun)")
    if args.json:
        out["results"] = [{k: v for k, v in r.items() if k not in ("losses", "lrs", "batch_index")} for r in results]
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
