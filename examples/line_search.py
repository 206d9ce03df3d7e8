"""Backtracking (Armijo) line search and the bold driver around any torch optimizer, on digits.

    python examples/line_search.py

``LineSearch`` takes the optimizer's proposed step, evaluates the loss on the same mini-batch and, if the Armijo
condition fails, undoes the step and retries with a smaller lr; ``BoldDriver`` grows the lr after every step that
lowered the loss and halves it (after an undo) otherwise. Neither needs the lr tuned. ``BoldDriver`` caps its lr at
10x the initial one (``max_growth``); from 100x too low, let it grow further with ``max_growth=None``.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from torchrewind import BoldDriver, LineSearch, Rewind

digits = load_digits()
X, Y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def run(policy_cls, make_opt, steps: int = 300, **kw) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = make_opt(model.parameters())
    lr0 = opt.param_groups[0]["lr"]
    policy = policy_cls(Rewind(model, opt), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(X), (64,), generator=g)
        policy.step(lambda: F.cross_entropy(model(X[i]), Y[i]))  # a forward closure; the policy does the rest
    with torch.no_grad():
        loss = F.cross_entropy(model(X), Y).item()
    s = policy.stats
    print(
        f"{policy_cls.__name__:10s} {type(opt).__name__:4s} start lr {lr0:<6g} -> final loss {loss:.4f}, "
        f"lr now {opt.param_groups[0]['lr']:.3g}, {s['forwards']} forwards / {s['backwards']} backwards "
        f"for {steps} iterations"
    )


run(LineSearch, lambda p: torch.optim.SGD(p, lr=1.0))
run(LineSearch, lambda p: torch.optim.Adam(p, lr=1e-2))
run(BoldDriver, lambda p: torch.optim.SGD(p, lr=5.0))  # far too high
run(BoldDriver, lambda p: torch.optim.SGD(p, lr=0.005), max_growth=None)  # far too low: lift the 10x cap
