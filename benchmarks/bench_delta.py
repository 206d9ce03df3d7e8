#!/usr/bin/env python
"""The host tier's lossless delta codec against what users would pick instead, on real training histories.

Usage::

    python benchmarks/bench_delta.py            # 18 histories, a few minutes on 2 CPU cores
    python benchmarks/bench_delta.py --quick    # smoke run
    python benchmarks/bench_delta.py --json out.json

Histories: an MLP (64-512-512-10), a Transformer encoder (d128 x 2) and a CNN (3 conv + BN) train on synthetic data in
fp32, bf16 and fp16 with Adam and with SGD+momentum; after ``--warmup`` steps the bytes of the whole training state
(torchrewind's arenas: parameters, buffers, optimizer state, as ``HostArchive(compress=False)`` keeps them) are taken
at each of the next ``--snapshots`` steps. Each snapshot is coded against its newer neighbour, as
:class:`torchrewind.HostArchive` stores them, by every codec in the same run, interleaved, ``--rounds`` times; every
snapshot is decoded and compared bit for bit.

Speed is reported two ways, medians over rounds: **per core** = MB of uncompressed input per CPU-second the process
spent (``time.process_time``: on a shared machine this does not count time the codec waited for a core), and
**wall** MB/s; plus the ratio of each peer's speed to torchrewind's measured in the same round. Every codec decodes
into a buffer allocated once (as the archive's restore does) where its API allows. Thread scaling: torchrewind's
codec and blosc2 with 1 and ``--threads`` threads (wall clock: what threads buy).

Peers (a row is skipped, with a message, when its package is missing): zstd level 1 on the raw bytes
(``zstandard``), ZipNN's delta mode (``zipnn``), XOR + blosc2 (zstd 1, byte shuffle; XOR in place into the output
buffer, and XORed into a reused buffer before encoding: its fastest form; ``blosc2``), and torchrewind 0.1's codec
(XOR + numpy byte planes + zstd -1/1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchrewind import HostArchive, Rewind, Tiers
from torchrewind.tiers import codec

perf = time.perf_counter
cpu = time.process_time  # CPU seconds of every thread of this process: per-core speed, robust to a shared machine


def model_and_data(kind: str):
    if kind == "MLP-4M":  # for speed on a state of realistic size (52 MB with Adam in fp32)
        m = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        return m, lambda g: torch.randn(64, 64, generator=g)
    if kind == "MLP":
        m = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return m, lambda g: torch.randn(64, 64, generator=g)
    if kind == "Transformer":
        layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True, dropout=0.0)
        m = nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Flatten(), nn.Linear(128 * 16, 10))
        return m, lambda g: torch.randn(16, 16, 128, generator=g)
    m = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip
    return m, lambda g: torch.randn(16, 3, 16, 16, generator=g)


def history(kind: str, dtype: torch.dtype, opt_name: str, warmup: int, n: int) -> list[tuple[torch.Tensor, tuple]]:
    """(arena bytes, segments) of the state at each of the n steps after warmup (one arena per history here)."""
    torch.manual_seed(0)
    m, data = model_and_data(kind)
    m = m.to(dtype)
    if opt_name == "Adam":
        eps = 1e-4 if dtype == torch.float16 else 1e-8
        opt: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=1e-3, eps=eps)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    host = HostArchive(keep=n, compress=False)
    rw = Rewind(m, opt, tiers=Tiers(device=1, host=host))
    g = torch.Generator().manual_seed(1)
    for _ in range(warmup + n):
        x = data(g).to(dtype)
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x).float(), y).backward()
        opt.step()
    rw.close()
    out = []
    for rec in host.records:
        (k, words), *rest = rec.raw.items()  # CPU: one arena chunk for parameters, one for the optimizer state
        parts = [words.view(torch.uint8)] + [w.view(torch.uint8) for _, w in rest]
        segs = tuple(s for key in rec.raw for s in rec.segments.get(key, ((rec.raw[key].numel() * 8, 4),)))
        out.append((torch.cat(parts), segs))
    return out


# ------------------------------------------------------------------------------------------------ codecs
# each codec: (encode(a, b, segments, itemsize) -> encoded, decode(encoded, b, itemsize, out) -> bytes, size(encoded))
# a, b, out: 1-D uint8 CPU tensors; out is allocated once per history and may be used as the destination.
def ours(threads: int):
    def enc(a, b, segs, itemsize):
        return codec.encode(a, b, segments=segs, threads=threads)

    def dec(e, b, itemsize, out):
        return codec.decode(e, b, out=out, threads=threads)

    return enc, dec, lambda e: e.nbytes


def zstd_raw():
    import zstandard

    c, d = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    return (lambda a, b, segs, k: c.compress(a.numpy().data),
            lambda e, b, k, out: torch.frombuffer(bytearray(d.decompress(e)), dtype=torch.uint8), len)  # fmt: skip


def xor_blosc2(threads: int = 1):
    """XOR with the neighbour, then blosc2 (zstd 1, byte shuffle) on the whole buffer; decoded straight into the
    output and XORed there in place (no temporary): the fastest way to use it."""
    import blosc2
    import numpy as np

    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
    scratch = {}  # the XOR goes into a buffer reused across calls (no allocation): its fastest form too

    def enc(a, b, segs, k):
        x = scratch.get(a.numel())
        if x is None:
            x = scratch[a.numel()] = np.empty(a.numel(), np.uint8)
        np.bitwise_xor(a.numpy().view(u[k]), b.numpy().view(u[k]), out=x.view(u[k]))
        return blosc2.compress2(x.view(u[k]), typesize=k, clevel=1, codec=blosc2.Codec.ZSTD,
                                filters=[blosc2.Filter.SHUFFLE], nthreads=threads)  # fmt: skip

    def dec(e, b, k, out):
        o = out.numpy()
        blosc2.decompress2(e, dst=o, nthreads=threads)
        np.bitwise_xor(o.view(u[k]), b.numpy().view(u[k]), out=o.view(u[k]))
        return out

    return enc, dec, len


def zipnn_delta():
    import zipnn

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

    def make(dtype):
        return zipnn.ZipNN(input_format="byte", bytearray_dtype=names[dtype], delta_compressed_type="byte", threads=1)

    state = {}

    def enc(a, b, segs, k):
        return make(state["dtype"]).compress(a.numpy().tobytes(), delta_second_data=b.numpy().tobytes())

    def dec(e, b, k, out):
        back = make(state["dtype"]).decompress(e, delta_second_data=b.numpy().tobytes())
        return torch.frombuffer(bytearray(back), dtype=torch.uint8)

    return enc, dec, len, state


def format1():
    """torchrewind 0.1's codec, for comparison: XOR, numpy byte planes, zstd -1 on the low half of the planes."""
    import numpy as np
    import zstandard

    def enc(a, b, segs, k):
        x = a.numpy() ^ b.numpy()
        body = x.size // 4 * 4
        planes = np.ascontiguousarray(x[:body].reshape(-1, 4).T)
        return [zstandard.ZstdCompressor(level=-1 if j < 2 else 1).compress(planes[j].data) for j in range(4)] + [
            x[body:].tobytes()]  # fmt: skip

    def dec(e, b, k, out):
        d = zstandard.ZstdDecompressor()
        n = b.numel() // 4 * 4
        o = out.numpy()
        cols = o[:n].reshape(-1, 4)
        for j in range(4):
            cols[:, j] = np.frombuffer(d.decompress(e[j], max_output_size=n // 4), np.uint8)
        o[n:] = np.frombuffer(e[4], np.uint8)
        np.bitwise_xor(o, b.numpy(), out=o)
        return out

    return enc, dec, lambda e: sum(map(len, e))


BASE = "torchrewind codec"
XOR = "XOR + blosc2 zstd 1 + shuffle"


def peers(threads: int) -> dict:
    rows = {BASE: ours(1)}
    for name, make, pkg in (("zstd 1, raw bytes", zstd_raw, "zstandard"), ("ZipNN delta", zipnn_delta, "zipnn"),
                            (XOR, xor_blosc2, "blosc2"),
                            ("torchrewind 0.1 codec (XOR + planes, zstd -1/1)", format1, "zstandard")):  # fmt: skip
        try:
            rows[name] = make()
        except ImportError:
            print(f"- skipped {name}: pip install {pkg}")
    if threads > 1:
        rows[f"{BASE}, {threads} threads"] = ours(threads)
        if XOR in rows:
            rows[f"{XOR}, {threads} threads"] = xor_blosc2(threads)
    return rows


def _med_ratio(xs: list[float], ys: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(xs, ys))


TIMERS = ("enc", "dec", "enc_wall", "dec_wall")


def measure(hists: dict, rows: dict, rounds: int) -> dict:
    """Every codec on every history, interleaved, ``rounds`` times: bytes and MB/s (per CPU-second and wall)."""
    stats: dict = {name: {h: {"raw": 0, "stored": 0, **{t: [] for t in TIMERS}} for h in hists} for name in rows}
    for _ in range(rounds):
        for h, (hist, dt) in hists.items():
            k = dt.itemsize
            out = torch.empty_like(hist[0][0])
            for name, (enc, dec, size, *extra) in rows.items():
                if extra:
                    extra[0]["dtype"] = dt
                te = td = we = wd = 0.0
                raw = stored = 0
                for i in range(len(hist) - 1):
                    (a, segs), (b, _) = hist[i], hist[i + 1]
                    c0, w0 = cpu(), perf()
                    e = enc(a, b, segs, k)
                    c1, w1 = cpu(), perf()
                    d = dec(e, b, k, out)
                    c2, w2 = cpu(), perf()
                    te, td, we, wd = te + c1 - c0, td + c2 - c1, we + w1 - w0, wd + w2 - w1
                    if not torch.equal(d.view(torch.uint8), a):
                        raise SystemExit(f"NOT LOSSLESS: {name} on {h}")
                    raw += a.numel()
                    stored += size(e)
                s = stats[name][h]
                s["raw"], s["stored"] = raw, stored
                for t, v in zip(TIMERS, (te, td, we, wd)):
                    s[t].append(raw / max(v, 1e-9) / 1e6)
    return stats


def speed_table(stats: dict, hists: dict, rows: dict, threads: int, what: str) -> dict:
    print()
    print(f"Speed on {what}, MB/s of input: median over histories of each history's median over rounds; 'vs "
          "torchrewind': the peer's speed / torchrewind's one-thread speed in the same round (median over rounds; "
          "range over histories). Per core = per CPU-second of the process:")  # fmt: skip
    print()
    print("| codec | encode per core | decode per core | encode wall | decode wall | encode per core vs torchrewind "
          "| decode per core vs torchrewind |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    speed: dict = {}
    for name in rows:
        med = {t: statistics.median(statistics.median(stats[name][h][t]) for h in hists) for t in TIMERS}
        rel = {t: [_med_ratio(stats[name][h][t], stats[BASE][h][t]) for h in hists] for t in ("enc", "dec")}
        speed[name] = {**med, "enc_vs": statistics.median(rel["enc"]), "dec_vs": statistics.median(rel["dec"])}
        print(f"| {name} | {med['enc']:.0f} | {med['dec']:.0f} | {med['enc_wall']:.0f} | {med['dec_wall']:.0f} | "
              f"{min(rel['enc']):.2f}-{max(rel['enc']):.2f} (median {speed[name]['enc_vs']:.2f}) | "
              f"{min(rel['dec']):.2f}-{max(rel['dec']):.2f} (median {speed[name]['dec_vs']:.2f}) |")  # fmt: skip
    if threads > 1:
        print()
        print(f"Thread scaling (wall clock, {threads} threads / 1 thread, same round, median over histories; a "
              "shared machine gives only what its other jobs leave):")  # fmt: skip
        for name in (BASE, XOR):
            many = f"{name}, {threads} threads"
            if many in rows:
                up = {t: statistics.median(_med_ratio(stats[many][h][t], stats[name][h][t]) for h in hists)
                      for t in ("enc_wall", "dec_wall")}  # fmt: skip
                speed[f"scaling/{name}"] = up
                print(f"- {name}: encode {up['enc_wall']:.2f}x, decode {up['dec_wall']:.2f}x")
    return speed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warmup", type=int, default=None, help="training steps before the history (default 100)")
    ap.add_argument("--snapshots", type=int, default=None, help="snapshots per history (default 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="also time the codec with this many threads")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 100)
    n = args.snapshots or (4 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torchrewind delta benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}, "
          f"{n} snapshots per history after {warmup} steps, {rounds} rounds, {os.cpu_count()} cores, "
          f"load average {load:.1f} at the start")  # fmt: skip
    print()
    kinds = ["MLP"] if args.quick else ["MLP", "Transformer", "CNN"]
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16, torch.float16]
    hists = {}
    for opt_name in ("Adam", "SGD"):
        for kind in kinds:
            for dt in dtypes:
                hists[f"{kind} {str(dt)[6:]} {opt_name}"] = (history(kind, dt, opt_name, warmup, n), dt)
    rows = peers(args.threads)
    stats = measure(hists, rows, rounds)
    results: dict = {}
    print("Compression ratio (full / stored; every snapshot decoded bit for bit):")
    print()
    print("| codec | " + " | ".join(hists) + " |")
    print("|---" * (len(hists) + 1) + "|")
    for name in rows:
        if name.endswith("threads"):
            continue  # same bytes as the one-thread row
        cells = []
        for h in hists:
            s = stats[name][h]
            ratio = s["raw"] / s["stored"]
            results[f"{name}/{h}"] = {"ratio": ratio, **{t: statistics.median(s[t]) for t in TIMERS}}
            cells.append(f"{ratio:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    wins = [h for h in hists if all(stats[BASE][h]["stored"] <= stats[n][h]["stored"] for n in rows)]
    print()
    print(f"- torchrewind has the best ratio on {len(wins)} of {len(hists)} histories")
    results["speed"] = speed_table(stats, hists, rows, args.threads, "these histories (0.4-3.6 MB each)")
    if not args.quick:  # a state of realistic size: per-call costs no longer weigh
        big = {f"MLP-4M {str(dt)[6:]} Adam": (history("MLP-4M", dt, "Adam", 10, 4), dt)
               for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
        stats = measure(big, rows, rounds)
        print()
        print("Ratios, 4.3M-parameter MLP + Adam: " + "; ".join(
            f"{name}: " + " / ".join(f"{stats[name][h]['raw'] / stats[name][h]['stored']:.2f}" for h in big)
            for name in rows if not name.endswith("threads")) + " (fp32 / bf16)")  # fmt: skip
        results["speed_4M"] = speed_table(stats, big, rows, args.threads, "a 4.3M-parameter MLP + Adam (52 / 26 MB)")
    # the whole archive, as HostArchive stores it (keyframes every 8 records, newest raw)
    print()
    for opt_name in ("Adam", "SGD"):
        h = f"MLP float32 {opt_name}"
        hist = hists[h][0]
        full = sum(a.numel() for a, _ in hist)
        stored = 0
        for i, (a, segs) in enumerate(hist):
            if i == len(hist) - 1:
                stored += a.numel()
            else:
                ref = None if i % 8 == 0 else hist[i + 1][0]
                stored += codec.encode(a, ref, segments=segs).nbytes
        results[f"{opt_name.lower()}/archive"] = {"ratio": full / stored, "records": len(hist)}
        print(f"- whole HostArchive, {h} ({len(hist)} records, keyframe every 8, newest raw): {full / stored:.2f}x")
    if hasattr(os, "getloadavg"):
        print(f"- load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
