"""The LR range test that leaves no trace, on digits (scikit-learn's bundled 8x8 images, no download).

    python examples/lr_find.py [--plot lr_find.png]

1. ``lr_find`` trains 100 steps with the lr rising from 1e-7 to 10 and suggests an lr; then it puts everything back:
   weights, Adam's moments, the dropout RNG and the shuffled DataLoader's generator.
2. The proof: two identical setups, one runs ``lr_find`` first; after 50 more training steps on both, every
   parameter and optimizer-state tensor is bitwise identical.
3. ``find_batch_size`` finds the largest batch whose training step fits a 1 MiB budget (measured, then undone too).
4. Training at the suggested lr.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from torchrewind import find_batch_size, lr_find

ap = argparse.ArgumentParser()
ap.add_argument("--plot", help="save the loss-vs-lr curve here")
args = ap.parse_args()
torch.set_num_threads(1)

digits = load_digits()
X, Y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)
train = TensorDataset(X[:1400], Y[:1400])


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))
    return model, opt, loader


def fit(model, opt, loader, steps):
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                return


twin, twin_opt, twin_loader = setup()  # the reference: the same training without lr_find
fit(twin, twin_opt, twin_loader, 5)
fit(twin, twin_opt, twin_loader, 50)
twin_rng = torch.get_rng_state()

model, opt, loader = setup()
fit(model, opt, loader, 5)  # mid-training: Adam has state, the loader has shuffled, dropout has drawn
res = lr_find(model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]), loader)
print(f"lr_find: {len(res.lrs)} steps ({res.stopped}) in {res.seconds:.2f} s, of which holding and restoring the "
      f"state {res.hold_seconds * 1e3:.1f} ms")
print("suggestions: " + ", ".join(f"{k} {v:.3g}" for k, v in res.suggestions.items() if v is not None))
print(f"suggested lr ({res.rule}): {res.suggestion:.3g}")
if args.plot:
    res.plot(args.plot)
    print(f"plot: {args.plot}")

fit(model, opt, loader, 50)  # as if lr_find had never run
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
same &= all(torch.equal(opt.state[p][k], twin_opt.state[q][k]) for p, q in zip(model.parameters(), twin.parameters())
            for k in opt.state[p])  # fmt: skip
same &= torch.equal(torch.get_rng_state(), twin_rng)
print(f"after 50 more steps, with vs without lr_find: bitwise identical: {same}")

bs = find_batch_size(model, opt, lambda b: F.cross_entropy(model(b[0]), b[1]), train, max_bytes=2**20)
print(f"find_batch_size: {bs.batch_size} fits a 1 MiB step ({len(bs.trials)} trials: "
      + " ".join(f"{t.batch_size}{'' if t.fits else 'x'}" for t in bs.trials) + ")")

for g in opt.param_groups:
    g["lr"] = res.suggestion
fit(model, opt, loader, 300)
model.eval()
with torch.no_grad():
    acc = (model(X[1400:]).argmax(1) == Y[1400:]).float().mean().item()
print(f"after 300 steps at lr {res.suggestion:.3g}: held-out accuracy {acc * 100:.1f}%")
