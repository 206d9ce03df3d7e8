#!/usr/bin/env python
"""What torchrewind's distributed agreement costs per iteration under DDP (2 ranks, gloo, CPU).

Usage::

    python benchmarks/bench_ddp.py                  # full run (< 1 min on 2 CPU cores)
    python benchmarks/bench_ddp.py --quick          # smoke run (< 15 s): smaller model, few rounds
    python benchmarks/bench_ddp.py --json out.json  # also write every number as JSON

Two ranks are spawned (gloo on 127.0.0.1, one intra-op thread each, denormals flushed as in bench_policies.py).
Each rank trains five DDP copies of the same MLP on digits (scikit-learn, no download; each rank its own shard of
every global batch, the same batches for every variant), Adam lr 1e-3:

1. plain DDP (baseline): zero_grad, forward, backward, ``opt.step()``;
2. ``Rewind(capacity=2)``: an undo point recorded before every step;
3. ``NonFiniteGuard(rw).step(loss)``: plus loss + gradient norm agreed over the group (one float64 all-reduce);
4. ``SpikeGuard(rw).step(loss)`` (defaults): the same collective, plus the spike detector;
5. ``SpikeGuard`` on ``Rewind(group=None)``: no agreement, so 4 - 5 is the cost of the agreement collective.

Then ``Rewind(shard=True)`` against the default: history bytes per rank and the time of an undo + redo (each rank
writes back its part of the snapshot and broadcasts it).

The variants are interleaved block by block (order rotated every round); each block starts after a barrier and its
time is the max over ranks. Reported: median ms/iteration, the median over rounds of the per-round ratio to plain
DDP, and 4 - 5 paired per round. At the end every rank's parameters and optimizer state are gathered and compared
bitwise (``torch.equal``): a guard that decided differently on one rank would leave the replicas diverged. Nothing
asserts on a timing; the exit status is 1 only if a variant with agreement ended with diverged replicas.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from torchrewind import NonFiniteGuard, Rewind, SpikeGuard

perf = time.perf_counter
WORLD = 2
VARIANTS = {  # key: (label, Rewind group or None for no Rewind, guard)
    "plain": ("plain DDP + Adam (baseline)", None, None),
    "rewind": ("+ Rewind(capacity=2)", "auto", None),
    "nonfinite": ("+ Rewind + NonFiniteGuard", "auto", NonFiniteGuard),
    "spike": ("+ Rewind + SpikeGuard", "auto", SpikeGuard),
    "spike_local": ("+ Rewind(group=None) + SpikeGuard (no agreement)", None, SpikeGuard),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_batches(rank: int, world: int, batch: int, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of every global batch (world x batch samples, reshuffled per epoch by a fixed generator)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - world * batch + 1, world * batch):
            idx = perm[i + rank * batch : i + (rank + 1) * batch]
            out.append((X[idx], y[idx]))
    return out


def mlp(hidden: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; this keeps every variant on the same start
    layers: list[torch.nn.Module] = []
    n = 64
    for _ in range(depth):
        layers += [torch.nn.Linear(n, hidden), torch.nn.ReLU()]
        n = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(n, 10))


class Variant:
    def __init__(self, key: str, cfg: dict[str, Any], batches: list) -> None:
        _, group, guard_cls = VARIANTS[key]
        self.key, self.batches, self.pos, self.times = key, batches, 0, []
        self.model = mlp(cfg["hidden"], cfg["depth"])
        self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.rw = None
        if key != "plain":
            self.rw = Rewind(self.net, self.opt, capacity=2, group=group)
        self.guard = guard_cls(self.rw) if guard_cls else None

    def block(self, n: int) -> None:
        net, opt, guard, nb = self.net, self.opt, self.guard, len(self.batches)
        for _ in range(n):
            x, y = self.batches[self.pos % nb]
            self.pos += 1
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if guard is None:
                opt.step()
            else:
                guard.step(loss)

    def state(self) -> list[torch.Tensor]:
        ts = [p.detach().clone() for p in self.model.parameters()]
        return ts + [v.clone() for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def undo_cost(cfg: dict[str, Any], batches: list, shard: bool) -> dict[str, float]:
    """History bytes per rank and the time of one undo + redo, for Rewind(capacity=2, shard=shard)."""
    v = Variant("plain", cfg, batches)
    v.rw = Rewind(v.net, v.opt, capacity=2, shard=shard)
    v.block(3)
    v.rw.undo()  # every slot (the redo one too) holds a full-size record from here on
    v.rw.redo()
    times = []
    for _ in range(cfg["undo_reps"]):
        dist.barrier()
        t0 = perf()
        v.rw.undo()
        v.rw.redo()
        times.append(perf() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    v.rw.close()
    return {"nbytes": v.rw.nbytes, "undo_redo_ms": float(t) * 1e3}


def worker(rank: int, world: int, port: int, cfg: dict[str, Any], out_path: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # one core per rank: 2 ranks on 2 cores
    torch.set_flush_denormal(True)  # Adam's second moments go denormal on CPU (~30x slower) otherwise
    # a rank that takes another path than the other fails after two minutes instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    batches = rank_batches(rank, world, cfg["batch"], epochs=4)
    variants = [Variant(k, cfg, batches) for k in VARIANTS]
    for v in variants:  # warm-up, untimed: Adam state, Rewind arenas, DDP buckets
        v.block(cfg["per"])
    gc.collect()
    gc.freeze()  # keep the per-block gc.collect() cheap
    for r in range(cfg["rounds"]):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            gc.collect()
            dist.barrier()  # every block starts with the ranks in step
            t0 = perf()
            v.block(cfg["per"])
            v.times.append((perf() - t0) / cfg["per"])
    # per-block time of the slower rank (one collective after the timing, none inside it)
    times = torch.tensor([v.times for v in variants], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    # the floor: one bare all-reduce of 2 float64 (what the guards' agreement sends)
    t = torch.zeros(2, dtype=torch.float64)
    bare = []
    for _ in range(cfg["bare"]):
        dist.barrier()
        t0 = perf()
        dist.all_reduce(t)
        bare.append(perf() - t0)
    bare_t = torch.tensor([statistics.median(bare), statistics.fmean(bare)], dtype=torch.float64)
    dist.all_reduce(bare_t, op=dist.ReduceOp.MAX)
    # bitwise replica check: parameters and Adam state of every rank against rank 0's
    res: dict[str, Any] = {}
    for v, ts in zip(variants, times.tolist()):
        states = [None] * world
        dist.all_gather_object(states, v.state())
        same = all(len(s) == len(states[0]) and all(map(torch.equal, s, states[0])) for s in states[1:])
        counts = v.guard.log.counts() if v.guard else {}
        res[v.key] = {
            "times_s": ts, "iterations": v.pos, "replicas_identical": same,
            "rolled_back": counts.get("rolled_back", 0), "skipped": counts.get("skipped", 0),
        }  # fmt: skip
        if v.rw is not None:
            v.rw.close()
    shard = {str(sh): undo_cost(cfg, batches, sh) for sh in (False, True)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"variants": res, "bare_allreduce_s": bare_t.tolist(), "shard": shard}, f)
    # leave together, DDP reducers freed first: torch 2.13's gloo can abort at exit otherwise (pytorch/pytorch#179291)
    del variants
    gc.unfreeze()
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: smaller model, few rounds")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        cfg = {"hidden": 256, "depth": 2, "batch": 64, "rounds": 5, "per": 8, "bare": 50, "undo_reps": 5}
    else:
        cfg = {"hidden": 512, "depth": 3, "batch": 128, "rounds": 50, "per": 10, "bare": 200, "undo_reps": 30}
    load = os.getloadavg()[0]  # other jobs on the cores make every collective wait for a time slice
    params = sum(p.numel() for p in mlp(cfg["hidden"], cfg["depth"]).parameters())
    print(
        f"# torchrewind DDP agreement benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}, "
        f"{WORLD} ranks (gloo, CPU, 1 thread each), {os.cpu_count()} CPUs (load average {load:.2f} at start), "
        f"Python {platform.python_version()}"
    )
    print()
    t_start = perf()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rank0.json")
        mp.spawn(worker, args=(WORLD, free_port(), cfg, path), nprocs=WORLD, join=True)
        with open(path) as f:
            raw = json.load(f)
    wall = perf() - t_start

    plain = raw["variants"]["plain"]["times_s"]
    rows = []
    for key, (label, group, _) in VARIANTS.items():
        v = raw["variants"][key]
        ts = v["times_s"]
        rows.append({
            "variant": key, "label": label, "median_ms": statistics.median(ts) * 1e3, "best_ms": min(ts) * 1e3,
            "ratio": statistics.median(a / b for a, b in zip(ts, plain)), "agreement": group == "auto",
            **{k: v[k] for k in ("iterations", "rolled_back", "skipped", "replicas_identical")},
            "samples_ms": [x * 1e3 for x in ts],
        })  # fmt: skip
    by = {r["variant"]: r for r in rows}
    # the agreement collective: SpikeGuard with vs without it, paired per round so drift cancels
    spike, local = raw["variants"]["spike"]["times_s"], raw["variants"]["spike_local"]["times_s"]
    agree_ms = statistics.median(a - b for a, b in zip(spike, local)) * 1e3
    agree_best_ms = (min(spike) - min(local)) * 1e3  # the least disturbed blocks: closest to an idle machine
    bare_us, bare_mean_us = (x * 1e6 for x in raw["bare_allreduce_s"])
    # plain DDP is identical by construction; the claim is about the variants whose guards agree
    identical = all(r["replicas_identical"] for r in rows if r["agreement"] or r["variant"] == "plain")

    print(
        f"## DDP overhead (MLP 64-{'-'.join([str(cfg['hidden'])] * cfg['depth'])}-10, {params / 1e6:.2f}M params, "
        f"digits, batch {cfg['batch']} per rank, Adam; {cfg['rounds']} rounds of {cfg['per']} iterations per "
        "variant, interleaved, order rotated each round)"
    )
    print()
    print("| variant | median ms / iteration | best ms / iteration | × plain DDP (median of per-round ratios) | "
          "extra ms | roll-backs / skips | replicas identical |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = r["variant"] == "plain"
        ratio = "1.00" if base else f"{r['ratio']:.3f}"
        extra = "-" if base else f"{r['median_ms'] - by['plain']['median_ms']:+.2f}"
        guard = "-" if r["variant"] in ("plain", "rewind") else f"{r['rolled_back']} / {r['skipped']}"
        print(f"| {r['label']} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | {ratio} | {extra} | {guard} "
              f"| {r['replicas_identical']} |")  # fmt: skip
    print()
    print(
        f"Agreement collective (SpikeGuard with group=WORLD minus group=None, paired per round): {agree_ms:+.3f} "
        f"ms/iteration ({100 * agree_ms / by['plain']['median_ms']:+.1f}% of a plain DDP iteration; best block vs best "
        f"block: {agree_best_ms:+.3f} ms); a bare "
        f"all_reduce of 2 float64 over gloo costs {bare_us:.0f} µs (median of {cfg['bare']}; mean {bare_mean_us:.0f} "
        "µs). Times: the slower rank's, per block."
    )
    print(f"replicas identical: {identical} (parameters and Adam state, bitwise, every variant with agreement)")
    if not by["spike_local"]["replicas_identical"]:
        print("Without agreement (group=None) the replicas diverged: a guard decided differently on one rank.")
    full, half = raw["shard"]["False"], raw["shard"]["True"]
    print()
    print(f"## shard=True (Rewind(capacity=2), {WORLD} ranks)")
    print()
    print("| snapshots | history bytes per rank | undo + redo (ms, median, slower rank) |")
    print("|---|---|---|")
    print(f"| full copy per rank (default) | {full['nbytes']:,} | {full['undo_redo_ms']:.2f} |")
    print(f"| shard=True: 1/{WORLD} per rank, parts broadcast on restore | {half['nbytes']:,} "
          f"| {half['undo_redo_ms']:.2f} |")  # fmt: skip
    verdict = (
        f"Under DDP, SpikeGuard costs ×{by['spike']['ratio']:.3f} and NonFiniteGuard ×{by['nonfinite']['ratio']:.3f} "
        f"per iteration vs plain DDP ({by['plain']['median_ms']:.2f} ms; Rewind alone ×{by['rewind']['ratio']:.3f}); "
        f"the agreement all-reduce itself {agree_ms:+.3f} ms/iteration; replicas identical: {identical}."
    )
    print()
    print(f"**Verdict:** {verdict}")
    print()
    print(f"Total time: {wall:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "world_size": WORLD, "settings": {**cfg, "params": params, "quick": args.quick,
                                                  "torch": torch.__version__, "load_avg_at_start": load},
                "rows": rows, "agreement_ms_per_iter": agree_ms, "agreement_best_ms_per_iter": agree_best_ms,
                "bare_allreduce_us": bare_us, "bare_allreduce_mean_us": bare_mean_us, "replicas_identical": identical,
                "shard": raw["shard"], "verdicts": [verdict], "total_s": wall,
            }, f, indent=1)  # fmt: skip
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
