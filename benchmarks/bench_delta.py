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
snapshot is decoded and compared bit for bit. Speeds are MB/s of uncompressed input on one thread (medians), and
ratios of each peer's speed to torchrewind's measured in the same round. Peers (a row is skipped, with a message, when
its package is missing): zstd level 1 on the raw bytes (``zstandard``), ZipNN's delta mode (``zipnn``), XOR +
blosc2 (zstd 1, byte shuffle; ``blosc2``), and torchrewind 0.1's codec (XOR + numpy byte planes + zstd -1/1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchrewind import HostArchive, Rewind, Tiers
from torchrewind.tiers import codec

perf = time.perf_counter


def model_and_data(kind: str):
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
        opt: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4 if dtype == torch.float16 else 1e-8)
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
def ours(threads: int):
    def enc(a, b, segs, itemsize):
        return codec.encode(a, b, segments=segs, threads=threads)

    def dec(e, b, itemsize):
        return codec.decode(e, b, threads=threads)

    return enc, dec, lambda e: e.nbytes


def zstd_raw():
    import zstandard

    c, d = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    return (lambda a, b, segs, k: c.compress(a.numpy().data),
            lambda e, b, k: torch.frombuffer(bytearray(d.decompress(e)), dtype=torch.uint8), len)  # fmt: skip


def xor_blosc2():
    import blosc2
    import numpy as np

    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

    def enc(a, b, segs, k):
        x = a.numpy().view(u[k]) ^ b.numpy().view(u[k])
        return blosc2.compress2(x, typesize=k, clevel=1, codec=blosc2.Codec.ZSTD, filters=[blosc2.Filter.SHUFFLE],
                                nthreads=1)  # fmt: skip

    def dec(e, b, k):
        x = np.frombuffer(blosc2.decompress2(e, nthreads=1), dtype=u[k]) ^ b.numpy().view(u[k])
        return torch.from_numpy(x.view(np.uint8))

    return enc, dec, len


def zipnn_delta():
    import zipnn

    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

    def make(dtype):
        return zipnn.ZipNN(input_format="byte", bytearray_dtype=names[dtype], delta_compressed_type="byte", threads=1)

    state = {}

    def enc(a, b, segs, k):
        return make(state["dtype"]).compress(a.numpy().tobytes(), delta_second_data=b.numpy().tobytes())

    def dec(e, b, k):
        out = make(state["dtype"]).decompress(e, delta_second_data=b.numpy().tobytes())
        return torch.frombuffer(bytearray(out), dtype=torch.uint8)

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

    def dec(e, b, k):
        d = zstandard.ZstdDecompressor()
        n = b.numel() // 4 * 4
        out = np.empty(b.numel(), np.uint8)
        cols = out[:n].reshape(-1, 4)
        for j in range(4):
            cols[:, j] = np.frombuffer(d.decompress(e[j], max_output_size=n // 4), np.uint8)
        out[n:] = np.frombuffer(e[4], np.uint8)
        return torch.from_numpy(out ^ b.numpy())

    return enc, dec, lambda e: sum(map(len, e))


def peers(threads: int) -> dict:
    rows = {"torchrewind codec": ours(1)}
    if threads > 1:
        rows[f"torchrewind codec, {threads} threads"] = ours(threads)
    for name, make, pkg in (("zstd 1, raw bytes", zstd_raw, "zstandard"), ("ZipNN delta", zipnn_delta, "zipnn"),
                            ("XOR + blosc2 zstd 1 + shuffle", xor_blosc2, "blosc2"),
                            ("torchrewind 0.1 codec (XOR + planes, zstd -1/1)", format1, "zstandard")):  # fmt: skip
        try:
            rows[name] = make()
        except ImportError:
            print(f"- skipped {name}: pip install {pkg}")
    return rows


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
    print(f"# torchrewind delta benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}, "
          f"{n} snapshots per history after {warmup} steps, {rounds} rounds")  # fmt: skip
    print()
    kinds = ["MLP"] if args.quick else ["MLP", "Transformer", "CNN"]
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [torch.float32, torch.bfloat16, torch.float16]
    hists = {}
    for opt_name in ("Adam", "SGD"):
        for kind in kinds:
            for dt in dtypes:
                hists[f"{kind} {str(dt)[6:]} {opt_name}"] = (history(kind, dt, opt_name, warmup, n), dt)
    rows = peers(args.threads)
    stats: dict = {name: {h: {"raw": 0, "stored": 0, "enc": [], "dec": []} for h in hists} for name in rows}
    for r in range(rounds):
        for h, (hist, dt) in hists.items():
            k = dt.itemsize
            for name, (enc, dec, size, *extra) in rows.items():
                if extra:
                    extra[0]["dtype"] = dt
                te = td = 0.0
                raw = stored = 0
                for i in range(len(hist) - 1):
                    (a, segs), (b, _) = hist[i], hist[i + 1]
                    t0 = perf()
                    e = enc(a, b, segs, k)
                    te += perf() - t0
                    t0 = perf()
                    d = dec(e, b, k)
                    td += perf() - t0
                    if not torch.equal(d.view(torch.uint8), a):
                        raise SystemExit(f"NOT LOSSLESS: {name} on {h}")
                    raw += a.numel()
                    stored += size(e)
                s = stats[name][h]
                s["raw"], s["stored"] = raw, stored
                s["enc"].append(raw / te / 1e6)
                s["dec"].append(raw / td / 1e6)
    base = "torchrewind codec"
    results: dict = {}
    print("Compression ratio (full / stored; every snapshot decoded bit for bit):")
    print()
    print("| codec | " + " | ".join(hists) + " |")
    print("|---" * (len(hists) + 1) + "|")
    for name in rows:
        cells = []
        for h in hists:
            s = stats[name][h]
            ratio = s["raw"] / s["stored"]
            results[f"{name}/{h}"] = {"ratio": ratio, "encode_MBps": statistics.median(s["enc"]),
                                      "decode_MBps": statistics.median(s["dec"])}  # fmt: skip
            cells.append(f"{ratio:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("Speed: median MB/s over histories and rounds, and the peer's speed / torchrewind's in the same round "
          "(range over histories):")  # fmt: skip
    print()
    print("| codec | encode MB/s | decode MB/s | encode vs torchrewind | decode vs torchrewind |")
    print("|---|---|---|---|---|")
    for name in rows:
        enc = [statistics.median(stats[name][h]["enc"]) for h in hists]
        dec = [statistics.median(stats[name][h]["dec"]) for h in hists]
        re = [statistics.median(x / y for x, y in zip(stats[name][h]["enc"], stats[base][h]["enc"])) for h in hists]
        rd = [statistics.median(x / y for x, y in zip(stats[name][h]["dec"], stats[base][h]["dec"])) for h in hists]
        print(f"| {name} | {statistics.median(enc):.0f} | {statistics.median(dec):.0f} | "
              f"{min(re):.2f}-{max(re):.2f} | {min(rd):.2f}-{max(rd):.2f} |")  # fmt: skip
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
