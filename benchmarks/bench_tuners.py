#!/usr/bin/env python
"""Tuners benchmark of torchrewind: ``lr_find`` side by side with torch-lr-finder and Lightning's ``Tuner.lr_find``.

Usage::

    python benchmarks/bench_tuners.py                  # full run (~10-15 minutes on 2 CPU cores)
    python benchmarks/bench_tuners.py --quick          # CI smoke run (< 2 min): 2 tasks, short sweeps and grids
    python benchmarks/bench_tuners.py --json out.json  # also write every number as JSON

Sections:

1. **Suggestions vs the grid's best lr.** Six tasks: an MLP 64-128-128-10 on scikit-learn's digits with SGD
   (momentum 0.9) and with Adam, a small CNN with BatchNorm on the digits as 8x8 images (SGD, Adam), a GRU and a
   2-layer Transformer character language model on Python's own ``argparse.py`` source text (Adam, AdamW). For each
   task and seed, every finder sweeps the same model, optimizer and shuffled DataLoader from the same state over the
   same range (1e-7 to 10, 100 steps, each finder's own smoothing and divergence rule): ours (one sweep, three
   rules: valley, steepest, minimum/10), torch-lr-finder (``range_test`` + ``plot(suggest_lr=True)``: steepest) and
   Lightning (``Tuner.lr_find`` + ``suggestion()``: steepest against the lr itself). The reference is a grid of
   constant learning rates, half a decade apart, each trained for a short run from the same start on the same
   batches; the best is the lowest held-out loss at the end. Reported: distance of each suggestion from the best
   grid lr in decades, and the held-out loss of a run trained at the suggestion, relative to the best grid run.
2. **Leaves no trace?** After each finder, compared bit for bit with before: parameters and buffers, optimizer state
   and param_groups, the torch RNG, the DataLoader's generator (its shuffle position) and, end to end, whether
   training afterwards equals training without the finder.
3. **Wall time.** Each finder's whole call against 100 plain training steps on the same batches, interleaved per
   seed (median of ratios); and the hold/restore itself on bigger states (10M parameters in 16 tensors; 1600 small
   tensors), Adam state included: torchrewind's in-memory hold (one memcpy per arena) against torch-lr-finder's
   state caching in memory (``deepcopy`` of the ``state_dict``s + ``load_state_dict``) and on disk (``torch.save`` +
   ``torch.load`` + ``load_state_dict``, what Lightning's checkpoint file amounts to), as ratios to a flat memcpy of
   the same bytes measured in the same round.

Runs with one intra-op thread and denormals flushed (``torch.set_num_threads(1)``, ``torch.set_flush_denormal``). Peers
that are not installed are skipped with a message. Nothing here asserts on a number.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchrewind import lr_find
from torchrewind.tuners import StateHold

perf = time.perf_counter
warnings.filterwarnings("ignore")

LR_MIN, LR_MAX = 1e-7, 10.0


# ---------------------------------------------------------------------------------------------------------- data
def digits() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.75 * len(x))
    return TensorDataset(x[:n], y[:n]), (x[n:], y[n:])


def text(seq: int = 32) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor], int]:
    """Character windows of Python's own argparse.py (shipped with Python: no download)."""
    import argparse as mod

    with open(mod.__file__, encoding="utf-8") as f:
        raw = f.read()
    codes = torch.tensor([min(ord(c), 127) for c in raw], dtype=torch.long)
    n = (len(codes) - 1) // (seq + 1)
    win = codes[: n * (seq + 1)].view(n, seq + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    win = win[perm]
    cut = int(0.9 * n)
    tr, va = win[:cut], win[cut:]
    return TensorDataset(tr[:, :-1], tr[:, 1:]), (va[:, :-1], va[:, 1:]), 128


# ---------------------------------------------------------------------------------------------------------- models
class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, 8, 8))


class GRULM(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 32)
        self.rnn = torch.nn.GRU(32, 96, batch_first=True)
        self.out = torch.nn.Linear(96, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.emb(x))[0])


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int, seq: int = 32, d: int = 64) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 128, dropout=0.1, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return self.out(self.enc(self.emb(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True))


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Task:
    name: str
    make_model: Callable[[], torch.nn.Module]
    make_opt: Callable[[Any, float], torch.optim.Optimizer]
    train: TensorDataset
    val: tuple[torch.Tensor, torch.Tensor]
    batch: int
    steps: int  # length of the grid's short trainings (full run)


def tasks(quick: bool) -> list[Task]:
    dtr, dva = digits()
    ttr, tva, vocab = text()
    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                   torch.nn.ReLU(), torch.nn.Linear(128, 10))  # fmt: skip

    sgd = lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)  # noqa: E731
    adam = lambda p, lr: torch.optim.Adam(p, lr=lr)  # noqa: E731
    adamw = lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)  # noqa: E731
    out = [
        Task("MLP digits SGD", mlp, sgd, dtr, dva, 64, 200),
        Task("CNN+BN digits Adam", CNN, adam, dtr, dva, 64, 200),
        Task("MLP digits Adam", mlp, adam, dtr, dva, 64, 200),
        Task("CNN+BN digits SGD", CNN, sgd, dtr, dva, 64, 200),
        Task("GRU char-LM Adam", lambda: GRULM(vocab), adam, ttr, tva, 32, 150),
        Task("Transformer char-LM AdamW", lambda: TinyTransformer(vocab), adamw, ttr, tva, 32, 150),
    ]
    return out[:2] if quick else out


# ---------------------------------------------------------------------------------------------------------- helpers
def setup(task: Task, seed: int, lr: float = 1e-3) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = task.make_opt(model.parameters(), lr)
    g = torch.Generator().manual_seed(1000 + seed)
    loader = DataLoader(task.train, batch_size=task.batch, shuffle=True, generator=g, drop_last=True)
    return model, opt, loader


def batches(loader: DataLoader):
    while True:
        yield from loader


def train_steps(model, opt, loader, steps: int) -> None:
    model.train()
    it = batches(loader)
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()


@torch.no_grad()
def val_loss(model, task: Task) -> float:
    model.eval()
    x, y = task.val
    v = float(ce(model(x), y))
    model.train()
    return v if math.isfinite(v) else math.inf


def trained_val(task: Task, seed: int, lr: float, steps: int) -> float:
    model, opt, loader = setup(task, seed, lr)
    try:
        train_steps(model, opt, loader, steps)
    except RuntimeError:
        return math.inf
    return val_loss(model, task)


def snapshot(model, opt, loader) -> dict[str, Any]:
    """What "leaves no trace" compares: clones of everything, bitwise."""
    st = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if opt is not None:
        sd = opt.state_dict()
        st["opt"] = (copy.deepcopy(sd["state"]), copy.deepcopy(sd["param_groups"]))
    st["rng"] = torch.get_rng_state()
    st["loader"] = loader.generator.get_state()
    return st


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        # bits, not values: -0.0 == 0.0 and nan != nan would mislead (0-dim tensors too: reshape first)
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def compare(before: dict, after: dict) -> dict[str, bool | None]:
    keys = ("params", "opt", "rng", "loader")
    return {k: (same(before[k], after[k]) if k in before and k in after else None) for k in keys}


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------------------- finders
def ours(model, opt, loader, steps: int, lr_max: float = LR_MAX, stop: bool = True) -> tuple[dict, float, float]:
    t = perf()
    res = lr_find(model, opt, lambda b: ce(model(b[0]), b[1]), loader, lr_min=LR_MIN, lr_max=lr_max, num_steps=steps,
                  diverge=4.0 if stop else None)  # fmt: skip
    return res.suggestions, perf() - t, res.hold_seconds


def torch_lr_finder(model, opt, loader, steps: int, lr_max: float = LR_MAX,
                    stop: bool = True) -> tuple[float | None, float, float]:  # fmt: skip
    from torch_lr_finder import LRFinder

    import matplotlib

    matplotlib.use("Agg")
    t = perf()
    with quiet():
        f = LRFinder(model, opt, ce, device="cpu")
        t_cache = perf() - t
        f.range_test(loader, start_lr=LR_MIN, end_lr=lr_max, num_iter=steps, diverge_th=5 if stop else math.inf)
        try:
            ax, lr = f.plot(suggest_lr=True)
            import matplotlib.pyplot as plt

            plt.close("all")
        except RuntimeError:  # too few points
            lr = None
        t1 = perf()
        f.reset()
        t_cache += perf() - t1
    return lr, perf() - t, t_cache


def lightning_module(task: Task, model: torch.nn.Module):
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return ce(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return task.make_opt(self.parameters(), 1e-3)

    return Lit()


def lightning_trainer(root: str, steps: int = 1):
    import lightning.pytorch as pl

    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                      limit_val_batches=0)  # fmt: skip


def lightning_tuner(lit, loader, steps: int, root: str, trainer=None, lr_max: float = LR_MAX,
                    stop: bool = True) -> tuple[float | None, float]:  # fmt: skip
    from lightning.pytorch.tuner import Tuner

    t = perf()
    trainer = trainer or lightning_trainer(root)
    with quiet():
        f = Tuner(trainer).lr_find(lit, train_dataloaders=loader, min_lr=LR_MIN, max_lr=lr_max, num_training=steps,
                                   update_attr=False, early_stop_threshold=4.0 if stop else None)  # fmt: skip
        lr = f.suggestion() if f is not None else None
    return lr, perf() - t


def ours_lightning(lit, loader, steps: int, lr_max: float = LR_MAX, stop: bool = True) -> tuple[dict, float]:
    from torchrewind.integrations.lightning_tuners import lr_find as pl_lr_find

    t = perf()
    with quiet():
        res = pl_lr_find(lit, loader, lr_min=LR_MIN, lr_max=lr_max, num_steps=steps, diverge=4.0 if stop else None)
    return res.suggestions, perf() - t


def finite(v: Any) -> Any:
    """JSON without inf/nan (None instead), keys as strings."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def have(mod: str) -> bool:
    try:
        __import__(mod)
    except ImportError:
        return False
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):  # set after import: it sets INFO
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


# ---------------------------------------------------------------------------------------------------------- sections
def section_suggestions(ts: list[Task], seeds: list[int], grid: list[float], quick_len: int | None, sweep: int,
                        peers: dict[str, bool], root: str) -> dict[str, Any]:  # fmt: skip
    rows = []
    for task in ts:
        train_len = quick_len or task.steps
        for seed in seeds:
            t0 = perf()
            vals = {lr: trained_val(task, seed, lr, train_len) for lr in grid}
            best_lr = min(grid, key=lambda lr: vals[lr])
            sugg: dict[str, float | None] = {}
            times: dict[str, float] = {}
            model, opt, loader = setup(task, seed)
            s, times["ours"], hold_s = ours(model, opt, loader, sweep)
            sugg.update({f"ours/{k}": v for k, v in s.items()})
            if peers["torch-lr-finder"]:
                model, opt, loader = setup(task, seed)
                sugg["torch-lr-finder"], times["torch-lr-finder"], _ = torch_lr_finder(model, opt, loader, sweep)
            if peers["lightning"]:
                model, opt, loader = setup(task, seed)
                lit = lightning_module(task, model)
                sugg["lightning"], times["lightning"] = lightning_tuner(lit, loader, sweep, root)
            # the plain-loop baseline for the wall-time ratio: the same number of steps, same batches
            model, opt, loader = setup(task, seed)
            t = perf()
            train_steps(model, opt, loader, sweep)
            times["plain"] = perf() - t
            at = {k: (trained_val(task, seed, v, train_len) if v is not None else None) for k, v in sugg.items()}
            rows.append(dict(task=task.name, seed=seed, grid=vals, best_lr=best_lr, best_val=vals[best_lr],
                             suggestions=sugg, val_at_suggestion=at, times=times, hold_seconds=hold_s,
                             seconds=perf() - t0))  # fmt: skip
            print(f"  {task.name:28s} seed {seed}: best grid lr {best_lr:.3g} (val {vals[best_lr]:.3f}); "
                  + ", ".join(f"{k} {v:.3g}" if v else f"{k} -" for k, v in sugg.items()), flush=True)  # fmt: skip
    return {"rows": rows}


def summarize_suggestions(rows: list[dict]) -> dict[str, dict[str, float]]:
    names = list(rows[0]["suggestions"]) if rows else []
    out = {}
    for n in names:
        dist, ratio, none = [], [], 0
        for r in rows:
            s = r["suggestions"][n]
            if s is None:
                none += 1
                continue
            dist.append(abs(math.log10(s) - math.log10(r["best_lr"])))
            v = r["val_at_suggestion"][n]
            ratio.append(v / r["best_val"] if v is not None and math.isfinite(v) else math.inf)
        out[n] = {
            "mean_decades": statistics.mean(dist) if dist else math.nan,
            "median_decades": statistics.median(dist) if dist else math.nan,
            "within_half_decade": sum(d <= 0.5 + 1e-9 for d in dist) / len(rows) if rows else math.nan,
            "median_val_ratio": statistics.median(ratio) if ratio else math.nan,
            "worst_val_ratio": max(ratio) if ratio else math.nan,
            "none": none,
            "n": len(rows),
        }
    return out


def section_trace(task: Task, seed: int, sweep: int, after: int, peers: dict[str, bool], root: str) -> dict:
    """Bitwise before/after of each finder, and training afterwards vs training without it."""
    out = {}

    def end_to_end(run_finder) -> bool:
        ref = setup(task, seed)
        train_steps(*ref, 3)
        train_steps(*ref, after)
        model, opt, loader = setup(task, seed)
        train_steps(model, opt, loader, 3)
        run_finder(model, opt, loader)
        train_steps(model, opt, loader, after)
        return same(snapshot(*ref), snapshot(model, opt, loader))

    finders = {"torchrewind lr_find": lambda m, o, l: ours(m, o, l, sweep)}
    if peers["torch-lr-finder"]:
        finders["torch-lr-finder"] = lambda m, o, l: torch_lr_finder(m, o, l, sweep)
    for name, fn in finders.items():
        model, opt, loader = setup(task, seed)
        train_steps(model, opt, loader, 3)  # mid-training: the optimizer has state
        before = snapshot(model, opt, loader)
        fn(model, opt, loader)
        row = compare(before, snapshot(model, opt, loader))
        row["training_after_equal"] = end_to_end(fn)
        out[name] = row
    if peers["lightning"]:
        def lit_fit(lit, loader, trainer=None):
            trainer = trainer or lightning_trainer(root, after)
            with quiet():
                trainer.fit(lit, loader)

        for name in ("torchrewind (Lightning entry)", "Lightning Tuner.lr_find"):
            model, _, loader = setup(task, seed)
            lit = lightning_module(task, model)
            before = snapshot(lit.model, None, loader)
            trainer = lightning_trainer(root, after)
            if name.startswith("torchrewind"):
                ours_lightning(lit, loader, sweep)
            else:
                lightning_tuner(lit, loader, sweep, root, trainer)  # the documented flow: tune, then fit, one Trainer
            row = compare(before, snapshot(lit.model, None, loader))
            lit_fit(lit, loader, trainer)
            rm, _, rl = setup(task, seed)
            rlit = lightning_module(task, rm)
            lit_fit(rlit, rl)
            row["training_after_equal"] = same(snapshot(rlit.model, None, rl), snapshot(lit.model, None, loader))
            out[name] = row
    return out


def section_overhead(ts: list[Task], rounds: int, steps: int, peers: dict[str, bool], root: str) -> dict[str, Any]:
    """Each finder's whole call for exactly ``steps`` steps (lr 1e-7..1e-2, early stop off: no finder stops early)
    against ``steps`` plain training steps on the same batches, interleaved per round; median of per-round ratios."""
    lr_max = 1e-2
    runs: dict[str, Callable[[Task, int], float]] = {}

    def plain(task: Task, seed: int) -> float:
        model, opt, loader = setup(task, seed)
        t = perf()
        train_steps(model, opt, loader, steps)
        return perf() - t

    runs["plain loop"] = plain
    runs["torchrewind lr_find"] = lambda task, seed: ours(*setup(task, seed), steps, lr_max, False)[1]
    if peers["torch-lr-finder"]:
        runs["torch-lr-finder"] = lambda task, seed: torch_lr_finder(*setup(task, seed), steps, lr_max, False)[1]
    if peers["lightning"]:
        def pl_ours(task: Task, seed: int) -> float:
            model, _, loader = setup(task, seed)
            return ours_lightning(lightning_module(task, model), loader, steps, lr_max, False)[1]

        def pl_theirs(task: Task, seed: int) -> float:
            model, _, loader = setup(task, seed)
            return lightning_tuner(lightning_module(task, model), loader, steps, root, None, lr_max, False)[1]

        runs["torchrewind (Lightning entry)"] = pl_ours
        runs["Lightning Tuner.lr_find"] = pl_theirs
    ratios: dict[str, list[float]] = {k: [] for k in runs if k != "plain loop"}
    secs: dict[str, list[float]] = {k: [] for k in runs}
    for task in ts:
        for r in range(rounds):
            t = {k: fn(task, r) for k, fn in runs.items()}
            for k, v in t.items():
                secs[k].append(v)
                if k != "plain loop":
                    ratios[k].append(v / t["plain loop"])
    return {"steps": steps, "tasks": [t.name for t in ts], "rounds": rounds,
            "x_plain": {k: statistics.median(v) for k, v in ratios.items()},
            "median_s": {k: statistics.median(v) for k, v in secs.items()}}  # fmt: skip


def flat_state(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    if kind == "big":  # 10.0M params in 16 tensors
        model = torch.nn.Sequential(*[torch.nn.Linear(790, 790) for _ in range(8)])
    else:  # 1600 tensors: 800 small Linear layers
        model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(800)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # Adam state exists
    for p in model.parameters():
        p.grad = None
    return model, opt


def section_restore(rounds: int, kinds: list[str], peers: dict[str, bool]) -> list[dict]:
    """Hold (take the copy) and restore (write it back) the whole state, interleaved per round, vs a flat memcpy."""
    from torchrewind import Rewind

    rows = []
    for kind in kinds:
        model, opt = flat_state(kind)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # params + 2 Adam moments
        src, dst = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
        times: dict[str, list[tuple[float, float]]] = {"memcpy": [], "torchrewind, own Rewind": [],
                                                       "torchrewind, your Rewind (rewind=)": []}  # fmt: skip
        if peers["torch-lr-finder"]:
            times["torch-lr-finder, memory"] = []
            times["torch-lr-finder, file"] = []
        tmp = tempfile.mkdtemp()
        for _ in range(rounds):
            t = perf()
            dst.copy_(src)
            times["memcpy"].append((perf() - t, perf() - t))
            t = perf()
            hold = StateHold(model, opt)  # a dedicated Rewind: re-homes the state into a fresh arena, then a snapshot
            t1 = perf()
            hold.restore()
            t2 = perf()
            hold.close()
            del hold
            times["torchrewind, own Rewind"].append((t1 - t, t2 - t1))
            rw = Rewind(model, opt, capacity=2)  # the user's Rewind, built once (its ring is already allocated)
            rw.snapshot()
            t = perf()
            hold = StateHold(model, opt, rewind=rw)
            t1 = perf()
            hold.restore()
            t2 = perf()
            hold.close()
            times["torchrewind, your Rewind (rewind=)"].append((t1 - t, t2 - t1))
            rw.close()
            del rw, hold
            if peers["torch-lr-finder"]:
                from torch_lr_finder.lr_finder import StateCacher

                for mem, key in ((True, "torch-lr-finder, memory"), (False, "torch-lr-finder, file")):
                    t = perf()
                    c = StateCacher(mem, cache_dir=tmp)
                    c.store("model", model.state_dict())
                    c.store("optimizer", opt.state_dict())
                    t1 = perf()
                    model.load_state_dict(c.retrieve("model"))
                    opt.load_state_dict(c.retrieve("optimizer"))
                    t2 = perf()
                    del c
                    times[key].append((t1 - t, t2 - t1))
        base = [h for h, _ in times["memcpy"]]
        row: dict[str, Any] = {"state": kind, "bytes": nbytes, "tensors": 3 * len(list(model.parameters()))}
        for k, v in times.items():
            if k == "memcpy":
                row[k] = {"median_ms": statistics.median(base) * 1e3}
                continue
            row[k] = {
                "hold_ms": statistics.median(h for h, _ in v) * 1e3,
                "restore_ms": statistics.median(r for _, r in v) * 1e3,
                "hold_x": statistics.median(h / b for (h, _), b in zip(v, base)),
                "restore_x": statistics.median(r / b for (_, r), b in zip(v, base)),
            }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 tasks, short sweeps, a coarse grid")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (after every section)")
    ap.add_argument("--sections", default="1,2,3", help="which sections to run, e.g. 2,3 (default: all)")
    a = ap.parse_args(argv)
    want = {int(x) for x in a.sections.split(",")}

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(finite(result), f, indent=1, default=str)

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    q = a.quick
    seeds = [0] if q else [0, 1]
    grid = [10 ** (k / 2) for k in range(-6, 1, 2)] if q else [10 ** (k / 2) for k in range(-8, 1)]
    train_len = 40 if q else None
    sweep = 30 if q else 100
    peers = {"torch-lr-finder": have("torch_lr_finder"), "lightning": have("lightning")}
    root = tempfile.mkdtemp()
    print("# torchrewind tuners benchmark" + (" (quick)" if q else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread; "
          f"sweeps {LR_MIN:g}..{LR_MAX:g} in {sweep} steps; grid {len(grid)} lrs ({grid[0]:g}..{grid[-1]:g}) x "
          f"{train_len or '200 (digits) / 150 (text)'} steps; seeds {seeds}")
    for p, ok in peers.items():
        if not ok:
            print(f"(skipping {p}: not installed; pip install {'torch-lr-finder' if p == 'torch-lr-finder' else p})")
    ts = tasks(q)
    result: dict[str, Any] = {"settings": dict(quick=q, seeds=seeds, grid=grid, train_len=train_len, sweep=sweep,
                                               lr_min=LR_MIN, lr_max=LR_MAX, peers=peers)}  # fmt: skip

    sec = {"rows": []}
    if 1 in want:
        print("\n## 1. Suggestions vs the best lr of a grid of short trainings")
        sec = section_suggestions(ts, seeds, grid, train_len, sweep, peers, root)
        summary = summarize_suggestions(sec["rows"])
        result["suggestions"] = {"rows": sec["rows"], "summary": summary}
        print("\n| suggestion | mean distance to the best grid lr (decades) | within 0.5 decade | held-out loss at the "
              "suggestion / best grid (median, worst) | no suggestion |")
        print("|---|---|---|---|---|")
        for n, s in summary.items():
            print(f"| {n} | {s['mean_decades']:.2f} | {s['within_half_decade'] * 100:.0f}% | "
                  f"{s['median_val_ratio']:.3f}, {s['worst_val_ratio']:.3g} | {s['none']}/{s['n']} |")
        save()

    if 2 in want:
        print("\n## 2. Leaves no trace? (bitwise, after vs before; training afterwards vs without)")
        trace = {}
        for task in [ts[0]] if q else [ts[0], ts[-1]]:  # the MLP; the Transformer draws dropout masks from the RNG
            trace[task.name] = section_trace(task, 0, sweep, 15, peers, root)
        result["trace"] = trace
        print("| task | finder | parameters+buffers | optimizer state | torch RNG | loader position | "
              "training after = without |")
        print("|---|---|---|---|---|---|---|")
        fmt = lambda v: "n/a" if v is None else ("yes" if v else "**no**")  # noqa: E731
        for tn, rows in trace.items():
            for fname, r in rows.items():
                print(f"| {tn} | {fname} | {fmt(r['params'])} | {fmt(r['opt'])} | {fmt(r['rng'])} | "
                      f"{fmt(r['loader'])} | {fmt(r['training_after_equal'])} |")
        save()

    if 3 in want:
        print("\n## 3. Wall time")
        ov = section_overhead(ts[:1] if q else ts[:2], 1 if q else 3, sweep, peers, root)
        result["overhead"] = ov
        print(f"whole call for {ov['steps']} steps (lr 1e-7..1e-2, early stop off) / {ov['steps']} plain training "
              f"steps on the same batches ({', '.join(ov['tasks'])}; {ov['rounds']} interleaved rounds; median of "
              "ratios):")
        print("| finder | x plain loop | median seconds |")
        print("|---|---|---|")
        print(f"| plain loop | 1 | {ov['median_s']['plain loop']:.2f} |")
        for k, v in ov["x_plain"].items():
            print(f"| {k} | {v:.2f} | {ov['median_s'][k]:.2f} |")
        rounds = 3 if q else 11
        restore = section_restore(rounds, ["big"] if q else ["big", "many"], peers)
        result["restore"] = restore
        print(f"\nhold (take the copy) and restore (write it back) of the whole state, Adam included ({rounds} "
              "interleaved rounds; median ms, and median ratio to one memcpy of the same bytes in the same round):")
        for r in restore:
            print(f"\n{r['state']}: {r['bytes'] / 2**20:.0f} MiB in {r['tensors']} tensors; "
                  f"memcpy {r['memcpy']['median_ms']:.1f} ms")
            print("| method | hold | restore |")
            print("|---|---|---|")
            for k, v in r.items():
                if isinstance(v, dict) and "hold_ms" in v:
                    print(f"| {k} | {v['hold_ms']:.1f} ms = {v['hold_x']:.1f}x | "
                          f"{v['restore_ms']:.1f} ms = {v['restore_x']:.1f}x |")
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
