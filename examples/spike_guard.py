"""Survive loss spikes and NaNs without a restart: SpikeGuard on digits with poisoned batches.

    python examples/spike_guard.py [--plot spikes.png]

Batches 150, 300 and 450 have their inputs multiplied by 1000 and batch 220 contains a NaN. Plain training
diverges; with ``SpikeGuard`` every fault is caught before its step is applied and its batch dropped (a spike on the
next batch too would roll the last steps back and cool the lr down), and the run ends where the fault-free run would.
Every decision is in ``guard.log``.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from torchrewind import Rewind, SpikeGuard

ap = argparse.ArgumentParser()
ap.add_argument("--plot", help="save the trajectory plot (needs matplotlib)")
ap.add_argument("--csv", help="save the decision log as CSV")
args = ap.parse_args()

digits = load_digits()
X, Y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def batches(seed: int, n: int = 600):
    g = torch.Generator().manual_seed(seed)
    for it in range(n):
        i = torch.randint(0, len(X), (64,), generator=g)
        x = X[i] * (1000.0 if it in (150, 300, 450) else 1.0)
        if it == 220:
            x = x.clone()
            x[0, 0] = float("nan")
        yield x, Y[i]


def train(guarded: bool) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = SpikeGuard(Rewind(model, opt, capacity=8)) if guarded else None
    data = guard.wrap(batches(1)) if guard else batches(1)  # wrap() lets the guard skip batches
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if guard:
            guard.step(loss)  # applies the step, or skips it / rolls back
        else:
            opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(X), Y).item()
    if guard:
        print("SpikeGuard decisions:", guard.log.counts())
        for e in guard.log:
            if e.kind != "accepted":
                print(f"  iteration {e.iteration}: {e.kind:11s} undone={e.undone} {e.reason}")
        if args.plot:
            guard.log.plot(args.plot, title="SpikeGuard on digits")
        if args.csv:
            guard.log.to_csv(args.csv)
    return final


print(f"plain:      final loss {train(False):.4f}")
print(f"SpikeGuard: final loss {train(True):.4f}")
