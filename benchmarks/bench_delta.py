#!/usr/bin/env python
"""The host tier's lossless delta compression on real training histories: ratio and MB/s.

Usage::

    python benchmarks/bench_delta.py            # ~1 min on 2 CPU cores
    python benchmarks/bench_delta.py --quick    # smoke run
    python benchmarks/bench_delta.py --json out.json

An MLP 64-1024-1024-10 (1.1M params) trains on scikit-learn's digits (no download) with Adam (lr 1e-3) and with SGD
(momentum 0.9, lr 0.05); after ``--warmup`` steps, the bytes of the whole training state (parameters + optimizer
state, as torchrewind's arenas hold them) are taken after each of the next 100 steps. Each snapshot is encoded
against its newer neighbour, as :class:`torchrewind.HostArchive` stores them, with several pipelines (the default
is XOR + byte shuffle + zstd level 1); every snapshot is decoded and compared bit for bit. Single-threaded
(``torch.set_num_threads(1)``), MB/s of uncompressed input. Also reported: the ratio of a whole ``HostArchive``
(keyframes every 8 records, compressed on their own). Targets: >= 1.5x smaller, >= 500 MB/s; printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from torchrewind import HostArchive, Rewind, Tiers
from torchrewind.tiers.codec import decode, encode

perf = time.perf_counter


def history(opt_name: str, warmup: int, steps: int) -> tuple[list[torch.Tensor], Rewind]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )  # fmt: skip
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    rw = Rewind(m, opt, tiers=Tiers(device=1, host=HostArchive(keep=steps + 1, every=1)))
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(warmup + steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(X[idx]), y[idx]).backward()
        opt.step()
        if i >= warmup:
            arenas = rw._tracker.arenas
            out.append(torch.cat([a.words().view(torch.uint8) for a in arenas.values()]).clone())
    rw.snapshot()
    rw.tiers.host.wait()
    return out, rw


PIPELINES = {
    "XOR + shuffle(4) + zstd 1 (default)": dict(xor=True, itemsize=4, level=1),
    "XOR + shuffle(4) + zstd 3": dict(xor=True, itemsize=4, level=3),
    "XOR + zstd 1 (no shuffle)": dict(xor=True, itemsize=1, level=1),
    "shuffle(4) + zstd 1 (no XOR)": dict(xor=False, itemsize=4, level=1),
}


def measure(hist: list[torch.Tensor], xor: bool, itemsize: int, level: int) -> dict[str, float]:
    raw = stored = 0
    t_enc = t_dec = 0.0
    for i in range(len(hist) - 1):
        ref = hist[i + 1] if xor else None
        t0 = perf()
        e = encode(hist[i], ref, itemsize=itemsize, level=level)
        t_enc += perf() - t0
        t0 = perf()
        d = decode(e, ref)
        t_dec += perf() - t0
        if not torch.equal(d, hist[i]):
            raise SystemExit("NOT LOSSLESS")
        raw += hist[i].numel()
        stored += e.nbytes
    return {"ratio": raw / stored, "encode_MBps": raw / t_enc / 1e6, "decode_MBps": raw / t_dec / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warmup", type=int, default=None, help="training steps before the history (default 200)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    steps = 10 if args.quick else 100
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 200)
    torch.set_num_threads(1)
    print(f"# torchrewind delta benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}, 1 thread")
    print()
    print("| history | state MB | pipeline | ratio (full / stored) | encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|")
    results = {}
    for opt_name in ("adam", "sgd"):
        hist, rw = history(opt_name, warmup, steps)
        for name, kw in PIPELINES.items():
            r = measure(hist, **kw)
            results[f"{opt_name}/{name}"] = r
            print(
                f"| {opt_name} ({steps} steps after {warmup}) | {hist[0].numel() / 1e6:.1f} | {name} "
                f"| {r['ratio']:.2f}x | {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |"
            )
        host = rw.tiers.host
        full = sum(w.numel() * 8 for w in rw._ring.slots[0].views.values()) * len(host.records)
        results[f"{opt_name}/archive"] = {"ratio": full / host.nbytes, "records": len(host.records)}
        print(
            f"| {opt_name} | | whole HostArchive ({len(host.records)} records, keyframe every 8, newest raw) "
            f"| {full / host.nbytes:.2f}x | | |"
        )
        rw.close()
    d = results["adam/XOR + shuffle(4) + zstd 1 (default)"], results["sgd/XOR + shuffle(4) + zstd 1 (default)"]
    print()
    for name, r in zip(("Adam", "SGD"), d):
        ok = r["ratio"] >= 1.5 and r["encode_MBps"] >= 500
        print(f"- {'PASS' if ok else 'FAIL'} ({name}): {r['ratio']:.2f}x smaller (target 1.5x) at "
              f"{r['encode_MBps']:.0f} MB/s encode (target 500), bitwise lossless")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
