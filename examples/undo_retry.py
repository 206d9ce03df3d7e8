"""Undo a step, change the learning rate, try again — the forum question, in a plain PyTorch loop.

    python examples/undo_retry.py

After each step the loss on the same mini-batch is measured again; if the step made it worse, ``rw.retry`` undoes
the step bit for bit (parameters, Adam moments and step counters, RNG) and takes it again with half the lr and the
same gradients. A ``trial()`` then shows the transaction form: try a step, look at a validation loss, keep it or
roll it back.
"""

import torch
import torch.nn.functional as F

from torchrewind import Rewind

torch.manual_seed(0)
teacher = torch.randn(20, 4)
x, x_val = torch.randn(512, 20), torch.randn(256, 20)
y, y_val = (x @ teacher).argmax(1), (x_val @ teacher).argmax(1)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
opt = torch.optim.Adam(model.parameters(), lr=0.2)  # too high on purpose
rw = Rewind(model, opt)  # records the whole training state before every optimizer.step()

retries = 0
for it in range(60):
    i = torch.randint(0, 512, (32,))
    loss = F.cross_entropy(model(x[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
    for _ in range(3):  # at most 3 retries per step
        with torch.no_grad():
            after = F.cross_entropy(model(x[i]), y[i])
        if after <= loss:
            break
        rw.retry(lr=lambda lr: lr / 2)  # undo + lr /= 2 + step again, with the same gradients
        retries += 1
print(f"60 steps, {retries} retries, lr now {opt.param_groups[0]['lr']:.4g}, last loss {loss.item():.4f}")


def val_loss() -> float:
    model.eval()
    with torch.no_grad():
        v = F.cross_entropy(model(x_val), y_val).item()
    model.train()
    return v


before = val_loss()
with rw.trial() as t:  # records now; t.rollback() (or an exception) returns here exactly
    for _ in range(5):
        i = torch.randint(0, 512, (32,))
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    kept = val_loss() <= before
    if not kept:
        t.rollback()
print(f"trial: validation loss {before:.4f} -> {val_loss():.4f} ({'kept' if kept else 'rolled back'})")
