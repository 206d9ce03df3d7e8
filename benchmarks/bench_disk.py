#!/usr/bin/env python
"""The disk tier against what users would pick instead: training stall, training time lost, time to durable, and a
restore from a cold page cache, all in one run.

Usage::

    python benchmarks/bench_disk.py                 # ~100M params + Adam (1.2 GB per checkpoint), ~8 GB RAM
    python benchmarks/bench_disk.py --params 25e6   # smaller
    python benchmarks/bench_disk.py --quick         # ~5M params, smoke run
    python benchmarks/bench_disk.py --json out.json

A stack of Linear layers trains with Adam on fixed random gradients (the step is memory-bound, like a real one's
optimizer phase). In each round every method saves the same state once, interleaved, then restores it:

* ``torch.save`` of ``{"model": sd, "optimizer": opt_sd}`` + fsync; restore: ``torch.load(weights_only=True)`` +
  ``load_state_dict`` (the optimizer adopts the loaded tensors: no copy);
* safetensors ``save_file`` of the flattened tensors + fsync; restore: ``load_file`` + ``load_state_dict``;
* torch.distributed.checkpoint ``save`` and ``async_save`` (one ``DefaultStager`` reused across saves, so its staging
  buffers are cached; files fsynced by DCP); restore: ``dcp.load`` in place;
* torchrewind ``DiskCheckpoints`` (async; fsync, atomic rename, block checksums), saving from ``rw.snapshot()``
  (its stall is the disk tier's ``save`` call; the device ring's own snapshot is not counted); restore:
  ``rw.rollback_to(step)`` (checksums verified, state loaded in place, device history restarted: one more ring
  snapshot), checked bit for bit.

Reported, medians over rounds, in seconds: **stall** (until the save call returns), **training time lost** (the
stall plus how much longer the training steps that ran while the background write was going took than steps without
one, measured in the same round), **durable** (until the files are fsynced), **restore** after dropping the files
from the page cache (``posix_fadvise(DONTNEED)``). Then where torchrewind's time goes (its save call, the background
write, the verified read, the rest of the restore), and the primitives timed on the same bytes in the same rounds:
a memcpy into a page-aligned buffer, xxh3 over it right after the copy and cold, one O_DIRECT write + fdatasync,
a buffered write + fsync, and O_DIRECT reads with 4 threads after evicting the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from torchrewind import DiskCheckpoints, Rewind, Tiers
from torchrewind.tiers import disk as disk_tier

perf = time.perf_counter


def drop_cache(path: str) -> None:
    """Evict a checkpoint's files from the page cache (they are fsynced, so the pages are clean)."""
    for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [path])]:
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_done(done, finished: list) -> None:
    """Poll a background save every millisecond and note when it is durable (not at the end of a training step)."""
    while not done():
        time.sleep(0.001)
    finished[0] = perf()


def primitives(nbytes: int, root: str) -> dict[str, float]:
    """Seconds for the building blocks of a save and a restore, on ``nbytes`` of random data."""
    import ctypes

    algo = disk_tier._hasher()  # the checksum DiskCheckpoints uses here (xxh3 with xxhash installed, else CRC-32)

    def digest(m: memoryview) -> str:
        return disk_tier._digest(algo, m)

    def aligned(n: int) -> torch.Tensor:
        base = torch.empty(n + 4096, dtype=torch.uint8)
        off = (-base.data_ptr()) % 4096
        return base[off : off + n]

    n = -(-nbytes // 4096) * 4096
    src, buf = torch.randint(0, 256, (n,), dtype=torch.uint8), aligned(n)
    buf.copy_(src)  # touch every page first: no page faults in the timings
    mv = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
    block = disk_tier.BLOCK
    out: dict[str, float] = {}
    t0 = perf()
    ctypes.memmove(buf.data_ptr(), src.data_ptr(), n)
    out["copy (one memmove, one thread)"] = perf() - t0
    t0 = perf()
    for a in range(0, n, block):  # the save's way: each block hashed right after its copy, while it is in cache
        ctypes.memmove(buf.data_ptr() + a, src.data_ptr() + a, min(block, n - a))
        digest(mv[a : a + block])
    out[f"copy + {algo} per block while hot"] = perf() - t0
    t0 = perf()
    digest(mv)
    out[f"{algo} alone, from memory"] = perf() - t0
    path = os.path.join(root, "prim.bin")
    for name, flags in (("O_DIRECT write + fdatasync", os.O_DIRECT), ("buffered write + fsync", 0)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        t0 = perf()
        for a in range(0, n, block):
            os.pwrite(fd, mv[a : a + block], a)
        os.fdatasync(fd) if flags else os.fsync(fd)
        out[name] = perf() - t0
        os.close(fd)
    for name, verify in (("O_DIRECT read, 4 threads, cold", False), (f"... + {algo} per block (a verified read)", True)):
        drop_cache(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

        def one(a: int, fd: int = fd, verify: bool = verify) -> None:
            os.preadv(fd, [mv[a : a + block]], a)
            if verify:
                digest(mv[a : a + block])

        t0 = perf()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(0, n, block)))
        out[name] = perf() - t0
        os.close(fd)
    os.remove(path)
    os.sync()
    return out


def flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v
    return out


def load_flat(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()  # its per-parameter dicts are the live ones: build new ones, do not write into them
    state = {i: {k: tensors[f"opt.{i}.{k}"] for k in st} for i, st in sd["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--params", type=float, default=None, help="parameters (default 100e6; --quick: 5e6)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick: 1)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    params = args.params or (5e6 if args.quick else 100e6)
    rounds = args.rounds or (1 if args.quick else 5)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    layers = 8
    width = int((params / layers) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3  # fixed gradients: the benchmark is about the state, not the model
    root = tempfile.mkdtemp(prefix="torchrewind-bench-", dir=args.dir)
    results: dict = {}
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # keep every checkpoint until the end: deleting a 0.3 GB file (ext4 with discard) slows the next fsync,
        # whoever makes it; the peers' files are deleted at the end of each round, outside the timed parts
        ck = DiskCheckpoints(f"{root}/torchrewind", every=1, keep_last=rounds + 2)
        rw = Rewind(model, opt, tiers=Tiers(device=1, disk=ck), auto=False, redo=False)
        opt.step()  # Adam's state exists from here on
        stager = DefaultStager(StagingOptions(False, False, False, False))

        def steps(k: int) -> list[float]:
            out = []
            for _ in range(k):
                t0 = perf()
                opt.step()
                out.append(perf() - t0)
            return out

        def state() -> dict:
            return {"model": model.state_dict(), "optimizer": opt.state_dict()}

        # each method: save() -> (a "done?" callable or None when blocking), restore(); all write fresh files
        def m_torch_save(i):
            path = f"{root}/torch-{i}.pt"
            torch.save(state(), path)
            fsync_file(path)
            return None, path, lambda: load_torch(path)

        def load_torch(path):
            sd = torch.load(path, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])

        def m_safetensors(i):
            from safetensors.torch import load_file, save_file

            path = f"{root}/st-{i}.safetensors"
            save_file(flat(model, opt), path)
            fsync_file(path)
            return None, path, lambda: load_flat(model, opt, load_file(path))

        def m_dcp(i):
            path = f"{root}/dcp-{i}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state(), checkpoint_id=path, no_dist=True)
            return None, path, lambda: load_dcp(path)

        def load_dcp(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state(), checkpoint_id=path, no_dist=True)  # in place, into the live tensors

        def m_dcp_async(i):
            path = f"{root}/dcpa-{i}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = dcp.async_save(state(), checkpoint_id=path, async_stager=stager, no_dist=True)
            fut = getattr(r, "upload_completion", r)
            return fut.done, path, lambda: load_dcp(path)

        recorded = {}

        def record() -> int:
            rw.snapshot()  # DiskCheckpoints(every=1): saves this step in the background
            return rw.step

        def reference() -> None:  # the state the next save holds (cloned before the timed save)
            recorded[rw.step] = {k: v.clone() for k, v in flat(model, opt).items()}

        reference()
        prev = [record()]
        ck.wait()
        # The optimizer state as the Rewind keeps it (moved into its arena). A peer's restore replaces it with the
        # tensors it loaded (opt.load_state_dict; safetensors' may even share one storage, which a Rewind must then
        # copy tensor by tensor): after each peer, untimed, its values go back into these, so every method starts
        # from the same conditions.
        homes = {p: dict(st) for p, st in opt.state.items()}

        def home_state() -> None:
            with torch.no_grad():
                for p, st in list(opt.state.items()):
                    for k, v in st.items():
                        if homes[p][k] is not v:
                            homes[p][k].copy_(v)
                    opt.state[p] = dict(homes[p])

        real_save, save_time = ck.save, [0.0]
        real_load, load_time = ck.read, [0.0]

        def timed_save(step: int, tree: object, **kw) -> None:  # the disk tier's own stall (not the ring snapshot)
            t0 = perf()
            real_save(step, tree, **kw)
            save_time[0] = perf() - t0

        def timed_load(step: int, **kw) -> object:  # read + verify, inside rollback_to
            t0 = perf()
            out = real_load(step, **kw)
            load_time[0] = perf() - t0
            return out

        ck.save, ck.read = timed_save, timed_load  # type: ignore[method-assign]

        def m_torchrewind(i):
            # restore the previous round's checkpoint (same size): the device ring holds only the newest point
            step, back = record(), prev[0]
            prev[0] = step
            return (lambda: not ck.saving), ck.path(back), lambda: rewind_to(back)

        def rewind_to(step):
            ck.wait()
            got = rw.rollback_to(step)
            assert got == step, got
            prev[0] = step

        methods = {"torch.save + fsync": m_torch_save, "safetensors save_file + fsync": m_safetensors,
                   "DCP save": m_dcp, "DCP async_save, stager reused": m_dcp_async,
                   "torchrewind DiskCheckpoints": m_torchrewind}  # fmt: skip
        try:
            import safetensors  # noqa: F401
        except ImportError:
            print("- skipped safetensors: pip install safetensors")
            del methods["safetensors save_file + fsync"]
        rows = {name: {"stall": [], "lost": [], "durable": [], "restore": []} for name in methods}
        ours_parts: dict[str, list[float]] = {"save call (copy + checksums)": [], "background write until durable": [],
                                              "read + verify (cold)": [], "apply + restart the device history": []}
        prims: dict[str, list[float]] = {}
        exact = True
        written: list[str] = []
        base = statistics.median(steps(5))
        for r in range(rounds):
            for name, save in methods.items():
                base = statistics.median(steps(3) + [base])  # a fresh baseline next to each save
                if name.startswith("torchrewind"):
                    reference()
                t0 = perf()
                done, path, restore = save(f"{r}")
                stall = perf() - t0
                if name.startswith("torchrewind"):
                    t0 += stall - save_time[0]  # count from the disk tier's save call, not the ring snapshot
                    stall = save_time[0]
                during = []
                finished = [perf()]
                if done is not None:
                    watch = threading.Thread(target=wait_done, args=(done, finished))
                    watch.start()
                    while watch.is_alive():
                        during += steps(1)
                    watch.join()
                    if name.startswith("torchrewind"):
                        ck.wait()
                durable = finished[0] - t0
                lost = stall + sum(during) - base * len(during)
                drop_cache(str(path))
                t0 = perf()
                restore()
                t_restore = perf() - t0
                if name.startswith("torchrewind"):
                    exact = exact and all(torch.equal(v, recorded[rw.step][k]) for k, v in flat(model, opt).items())
                    for part, v in zip(ours_parts, (stall, durable - stall, load_time[0], t_restore - load_time[0])):
                        ours_parts[part].append(v)
                row = rows[name]
                row["stall"].append(stall)
                row["lost"].append(max(lost, stall))
                row["durable"].append(durable)
                row["restore"].append(t_restore)
                if not name.startswith("torchrewind"):
                    written.append(str(path))
                    home_state()
            for path in written:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            written.clear()
            os.sync()  # let the deletions settle before the next round
            for k, v in primitives(sum(t.numel() * t.element_size() for t in flat(model, opt).values()), root).items():
                prims.setdefault(k, []).append(v)
        nbytes = sum(t.numel() * t.element_size() for t in flat(model, opt).values())
        rw.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# torchrewind disk benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}")
    print()
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n / 1e6:.0f}M parameters + Adam state ({nbytes / 1e9:.2f} GB per checkpoint); Adam step without a save "
          f"{base * 1e3:.0f} ms; {rounds} round(s), medians, seconds; {os.cpu_count()} cores, load average "
          f"{load_start:.1f} at the start, {load_end:.1f} at the end:")  # fmt: skip
    print()
    print("| method | stall | training time lost | durable | restore, cold cache | time / torchrewind's in the same "
          "round (lost / durable / restore) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    mine = rows["torchrewind DiskCheckpoints"]
    for name, m in med.items():
        rel = {k: statistics.median(a / b for a, b in zip(rows[name][k], mine[k]))
               for k in ("lost", "durable", "restore")}  # fmt: skip
        print(f"| {name} | {m['stall']:.2f} | {m['lost']:.2f} | {m['durable']:.2f} | {m['restore']:.2f} | "
              f"{rel['lost']:.2f} / {rel['durable']:.2f} / {rel['restore']:.2f} |")  # fmt: skip
        results[name] = {**m, "vs_torchrewind": rel}
    ours = med["torchrewind DiskCheckpoints"]
    print()
    print("Where torchrewind's time goes (medians, seconds):")
    print()
    for part, v in ours_parts.items():
        print(f"- {part}: {statistics.median(v):.3f}")
    print()
    print(f"Primitives on the same {nbytes / 1e9:.2f} GB in the same rounds (medians, seconds; GB/s):")
    print()
    for k, v in prims.items():
        print(f"- {k}: {statistics.median(v):.3f} ({nbytes / statistics.median(v) / 1e9:.2f} GB/s)")
    results["parts"] = {k: statistics.median(v) for k, v in ours_parts.items()}
    results["primitives"] = {k: statistics.median(v) for k, v in prims.items()}
    results["load_average"] = [load_start, load_end]
    print()
    print(f"- rollback from disk (torchrewind restore): {'bitwise exact' if exact else 'NOT EXACT'}")
    if "safetensors save_file + fsync" in med:
        st = rows["safetensors save_file + fsync"]
        for what, key in (("training time lost", "lost"), ("durable", "durable"), ("restore", "restore")):
            wins = sum(a <= b for a, b in zip(mine[key], st[key]))
            a, b = statistics.median(mine[key]), statistics.median(st[key])
            print(f"- {'PASS' if a <= b else 'MISS'}: torchrewind {what} {a:.2f} s vs safetensors {b:.2f} s "
                  f"(medians; torchrewind at most as long in {wins} of {len(st[key])} rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n, "bytes": nbytes, "rows": results, "rollback_s": ours["restore"], "exact": exact,
                       "rounds": rounds}, f, indent=1)  # fmt: skip
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
