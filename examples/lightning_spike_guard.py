"""SpikeGuard in PyTorch Lightning: one callback, and loss spikes and NaN batches stop killing the run.

    python examples/lightning_spike_guard.py [--csv decisions.csv]

Digits (scikit-learn, bundled), an MLP, SGD with momentum. Batches 150, 300 and 450 have their inputs multiplied by
1000 and batch 220 contains a NaN. Plain Lightning training diverges to NaN; with ``RewindCallback("spike")`` each
fault is caught after Lightning's step, the step is undone and its batch dropped (a spike on the next batch too would
also undo the steps before it and cool the lr down), and the run ends where the fault-free one would.
"""

import argparse
import logging
import warnings

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from torchrewind.integrations.lightning import RewindCallback

ap = argparse.ArgumentParser()
ap.add_argument("--csv", help="save the decision log as CSV")
args = ap.parse_args()
warnings.filterwarnings("ignore", ".*(does not have many workers|LeafSpec).*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

digits = load_digits()
X, Y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def batches(n: int = 600, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for it in range(n):
        i = torch.randint(0, len(X), (64,), generator=g)
        x = X[i] * (1000.0 if it in (150, 300, 450) else 1.0)
        if it == 220:
            x = x.clone()
            x[0, 0] = float("nan")
        out.append((x, Y[i]))
    return out


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def train(callbacks: list) -> float:
    model = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(model, DataLoader(batches(), batch_size=None))  # each item is already a batch
    with torch.no_grad():
        return F.cross_entropy(model.net(X), Y).item()


print(f"plain Lightning:       final loss {train([]):.4f}")
cb = RewindCallback("spike", rollback=4, skip_batches=1)  # a Rewind of capacity 5: the step just taken uses a slot
final = train([cb])
print("RewindCallback decisions:", cb.log.counts())
for e in cb.log:
    if e.kind != "accepted":
        print(f"  iteration {e.iteration}: {e.kind:11s} undone={e.undone} {e.reason}")
print(f"RewindCallback(spike): final loss {final:.4f}")
if args.csv:
    cb.log.to_csv(args.csv)
