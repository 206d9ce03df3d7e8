#!/usr/bin/env python
"""The disk tier on a ~100M-parameter model with Adam: save stall, save time, and a 100-step rollback from disk.

Usage::

    python benchmarks/bench_disk.py            # ~100M params (1.2 GB of state), a few minutes, ~8 GB RAM
    python benchmarks/bench_disk.py --quick    # ~10M params
    python benchmarks/bench_disk.py --json out.json

A stack of Linear layers (no forward needed: gradients are set at random and ``Adam.step()`` runs) trains under
``Rewind(tiers=Tiers(device=1, disk=DiskCheckpoints(every=50)))`` for 150 steps, so checkpoints exist at steps 0, 50,
100, 150. Reported, in one run: the training stall of an asynchronous save (time until ``save`` returns: the
tensors are copied to host memory), the time until the checkpoint is complete on disk, the bytes on disk, and
``rw.rollback_to(step - 100)`` (checksums + DCP load + ``load_state_dict`` + re-binding the state), checked bitwise
against the state recorded at that step. Baseline in the same run: ``torch.save`` of the same state tree and
``torch.load(weights_only=True)`` + ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import torch

from torchrewind import DiskCheckpoints, Rewind, Tiers

perf = time.perf_counter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    width, layers = (1120, 8) if args.quick else (3536, 8)  # 8 x 3536^2 = 100M params
    steps, every = (30, 10) if args.quick else (150, 50)
    back = every * 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    root = tempfile.mkdtemp(prefix="torchrewind-bench-")
    try:
        ck = DiskCheckpoints(f"{root}/ckpt", every=every, keep_last=10)
        rw = Rewind(model, opt, tiers=Tiers(device=1, disk=ck))
        saves: list[tuple[float, float]] = []
        real_save = ck.save

        def timed_save(step: int, tree: object) -> None:
            t0 = perf()
            real_save(step, tree)
            stall = perf() - t0
            ck.wait()
            saves.append((stall, perf() - t0))

        ck.save = timed_save  # type: ignore[method-assign]
        recorded = {}
        target = steps - back
        for p in model.parameters():
            p.grad = torch.randn_like(p)  # fixed gradients: the benchmark is about the state, not the model
        for i in range(steps + 1):
            if i == target:
                recorded = {k: v.clone() for k, v in model.state_dict().items()}
                recorded["exp_avg"] = opt.state[next(iter(model.parameters()))]["exp_avg"].clone()
            opt.step()
        ck.save = real_save  # type: ignore[method-assign]
        disk_bytes = sum(f.stat().st_size for f in ck._path(ck.steps()[-1]).iterdir())  # the newest checkpoint
        t0 = perf()
        got = rw.rollback_to(target)
        t_rollback = perf() - t0
        exact = all(torch.equal(v, model.state_dict()[k]) for k, v in recorded.items() if k != "exp_avg")
        exact = exact and torch.equal(recorded["exp_avg"], opt.state[next(iter(model.parameters()))]["exp_avg"])
        # baseline: torch.save / torch.load(weights_only=True) of the same tree
        tree = rw._state_tree()
        t0 = perf()
        torch.save(tree, f"{root}/plain.pt")
        t_plain_save = perf() - t0
        t0 = perf()
        loaded = torch.load(f"{root}/plain.pt", weights_only=True)
        model.load_state_dict(loaded["model"][0])
        opt.load_state_dict(loaded["optimizer"])
        t_plain_load = perf() - t0
        rw.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    stall = sorted(s for s, _ in saves)[len(saves) // 2]
    total = sorted(t for _, t in saves)[len(saves) // 2]
    print(f"# torchrewind disk benchmark{' (quick)' if args.quick else ''}: torch {torch.__version__}")
    print()
    print(f"{n / 1e6:.0f}M parameters + Adam state: {disk_bytes / 1e9:.2f} GB per checkpoint on "
          f"disk ({len(saves)} saves, every {every} steps; medians).")  # fmt: skip
    print()
    print("| operation | torchrewind disk tier | baseline: torch.save / torch.load(weights_only=True) |")
    print("|---|---|---|")
    print(f"| save: training stall (async) | {stall:.2f} s | {t_plain_save:.2f} s (blocking) |")
    print(f"| save: complete on disk (checksummed, atomic) | {total:.2f} s | |")
    print(f"| rollback {steps} -> {target} (got {got}): restore, verified | {t_rollback:.2f} s "
          f"({'bitwise exact' if exact else 'NOT EXACT'}) | {t_plain_load:.2f} s (load + load_state_dict) |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n, "disk_bytes": disk_bytes, "stall_s": stall, "save_s": total,
                       "rollback_s": t_rollback, "exact": exact, "plain_save_s": t_plain_save,
                       "plain_load_s": t_plain_load, "got": got}, f, indent=1)  # fmt: skip
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
