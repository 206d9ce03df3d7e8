"""FaultTriage: is a NaN the machine's fault or the data's? Rerun the iteration from its exact start and compare.

Trains an MLP with BatchNorm and dropout on scikit-learn's digits (bundled, no download) and injects two faults that
look the same from outside — a NaN loss:

* iteration 40: a transient machine fault (FaultInjector: a NaN in a hidden activation, first run only). The rerun
  from the exact same state (parameters, Adam moments, BatchNorm statistics, dropout's RNG) gives a normal loss:
  "transient", training continues with the rerun.
* iteration 70: a corrupt record (a NaN pixel in the batch). The rerun fails identically: "reproducible", the batch
  is skipped and written to a quarantine file.

Then it checks the claims: the run ends bit for bit as a fault-free run that never drew batch 70; a restart reading
the quarantine file skips batch 70 without computing it and ends identically; and the determinism report (every
25th iteration rerun) finds every rerun bitwise identical, as CPU kernels are deterministic.

Usage::

    python examples/fault_triage.py [--quarantine PATH]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from torchrewind import FaultInjector, FaultTriage, Rewind

ITERATIONS, TRANSIENT_AT, BAD_BATCH, BATCH = 120, 40, 70, 64


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(ITERATIONS):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        out.append((X[idx], y[idx]))
    x = out[BAD_BATCH][0].clone()
    x[3, 17] = float("nan")  # a corrupt record in batch 70
    out[BAD_BATCH] = (x, out[BAD_BATCH][1])
    return out


def model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(128, 10))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(1)  # dropout's stream
    return model, opt


def snapshot_of(model, opt) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()] + [
        t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def plain(batches, skip=()) -> tuple[list[torch.Tensor], float]:
    model, opt = model_and_opt()
    loss = torch.tensor(0.0)
    for i, (x, y) in enumerate(batches):
        if i in skip:
            continue
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return snapshot_of(model, opt), float(loss.detach())


def triaged(batches, quarantine: Path, inject: bool):
    model, opt = model_and_opt()
    triage = FaultTriage(Rewind(model, opt), quarantine=quarantine, report_every=25)
    injector = FaultInjector(model[2], kind="scale", factor=float("nan"))  # a hidden activation
    computed = []
    for i, (x, y) in enumerate(batches):
        if inject and i == TRANSIENT_AT:
            injector.arm()  # the first run of iteration 40 only: its rerun is clean

        def loss_fn(i=i, x=x, y=y):
            computed.append(i)
            return F.cross_entropy(model(x), y)

        triage.step(loss_fn, batch_id=i)
    return snapshot_of(model, opt), triage, computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quarantine", type=Path, default=None, help="the quarantine file (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  log: %(message)s")  # the triage logs every diagnosis
    torch.set_num_threads(1)
    batches = data()
    with tempfile.TemporaryDirectory() as tmp:
        q = args.quarantine or Path(tmp) / "quarantine.jsonl"
        q.unlink(missing_ok=True)

        _, plain_loss = plain(batches)
        print(f"plain training: final loss {plain_loss:.4f} (the corrupt batch {BAD_BATCH} poisons it)")

        state, triage, _ = triaged(batches, q, inject=True)
        for f in triage.faults:
            where = ", ".join(f"rank {s['rank']} ({s['host']}, {s['device']})" for s in f["suspects"])
            print(f"iteration {f['iteration']}: {f['verdict']} ({f['check']}) -> {f['action']}"
                  + (f"; did not reproduce on {where}" if where else "")
                  + (f"; quarantined batch {f['quarantined'][0]}" if f.get("quarantined") else ""))  # fmt: skip
        ref, _ = plain(batches, skip={BAD_BATCH})
        print(f"FaultTriage: final loss {triage.log.events[-1].loss:.4f}; bitwise identical to the fault-free run "
              f"that skipped batch {BAD_BATCH}: {same(state, ref)}")  # fmt: skip
        print(f"quarantine file {q.name}: {q.read_text().strip()}")

        state2, triage2, computed = triaged(batches, q, inject=False)
        print(f"restart: batch {BAD_BATCH} skipped from the quarantine without computing it: "
              f"{BAD_BATCH not in computed}; bitwise identical: {same(state2, ref)}; diagnoses: {len(triage2.faults)}")

        rep = triage.determinism
        print("determinism report (every 25th iteration rerun):")
        print(rep.summary())
        print(f"determinism report: every rerun bitwise identical: "
              f"{all(s['identical'] == s['runs'] > 0 for s in rep.stats.values())}")  # fmt: skip


if __name__ == "__main__":
    main()
