"""Exactness of undo/redo/retry over every torch.optim optimizer, each CPU implementation, option variants and
user-written optimizers with unusual state.

Every scenario is compared bit for bit (``statecheck.assert_same``: ``torch.equal`` on raw bits, never allclose)
against a reference run that never touched torchrewind: same seed, same data, same RNG consumption.

Matrix: ``SPECS`` (optimizer x option variant, two param groups with different hyperparameters wherever the
optimizer allows it) x ``IMPLS`` (single-tensor / foreach / fused). Combinations that torch 2.13 rejects on CPU
(no ``fused`` argument, ``capturable=True`` on CPU, ...) are *probed* on a plain run when the tests are collected and
left out of the scenarios; ``test_left_out_combinations_are_rejected_by_torch`` lists them with torch's own error and
checks that each one is a combination torch refuses (never a baseline configuration), so none is dropped silently.

Every training iteration draws from the global torch RNG before ``optimizer.step()`` (a random loss scale), and
one custom optimizer draws from it inside ``step()``; so the RNG part of the state is meaningful, and the
boundary the library records at (just before ``optimizer.step()``) is the one the reference states are taken at.

torch behaviours the suite works around (not torchrewind's): LBFGS supports one param group only; fused SGD with
momentum raises when a group's parameters get their first gradient at different steps (the late parameters get a
group of their own there); foreach SGD with nesterov adds the momentum buffer into ``p.grad`` in place, so
scenarios that step again "with the same gradients" take them from the history (``grads=True``) where a probe run
shows ``step()`` mutating gradients.
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from statecheck import assert_same, full_state
from torch import nn

from torchrewind import Rewind
from torchrewind.core.values import values_equal  # the bitwise comparator statecheck uses (sparse-aware)

SEED = 1234
STEPS = 5  # iterations per run
LATE = 2  # the model's "late" parameters get their first gradient (and so their optimizer state) at this step
EDIT_AT = 2  # step at which scenario 3 changes hyperparameters


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (conftest.one_thread)


# ---------------------------------------------------------------------------------------------------- models / data
class MLP(nn.Module):
    """Dense model with a BatchNorm (buffers change in forward) and a head that is unused before step LATE (its
    parameters have grad None, so lazily created optimizer state for them appears mid-run)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.late = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, j: int) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.bn(self.fc1(x))))
        return h + self.late(x) if j >= LATE else h

    def groups(self) -> tuple[list, list, list]:
        return [*self.fc1.parameters(), *self.bn.parameters()], [*self.fc2.parameters()], [*self.late.parameters()]


class MuonNet(nn.Module):
    """Only 2-D parameters (Muon's requirement); BatchNorm without affine parameters still contributes buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6, affine=False)
        self.fc2 = nn.Linear(6, 3, bias=False)
        self.late = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor, j: int) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.bn(self.fc1(x))))
        return h + self.late(x) if j >= LATE else h

    def groups(self) -> tuple[list, list, list]:
        return [self.fc1.weight], [self.fc2.weight], [self.late.weight]


class SparseNet(nn.Module):
    """Dense-parameter-free: only sparse-gradient embeddings (SparseAdam rejects dense gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.late = nn.Embedding(8, 4, sparse=True)

    def forward(self, idx: torch.Tensor, j: int) -> torch.Tensor:
        h = self.emb(idx)
        if j >= LATE:
            h = h * self.late(idx % 8)
        return h.sum(-1)

    def groups(self) -> tuple[list, list, list]:
        return [self.emb.weight], [], [self.late.weight]


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "muon": MuonNet, "sparse": SparseNet}


def _make_data() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)  # independent of the global RNG the library restores
    dense = [(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]
    # 12 indices out of 10 rows: repeated indices give uncoalesced sparse gradients.
    sparse = [(torch.randint(0, 10, (12,), generator=g), torch.randn(12, generator=g)) for _ in range(STEPS)]
    return {"mlp": dense, "muon": dense, "sparse": sparse}


DATA = _make_data()


# ---------------------------------------------------------------------------------------------------- custom optimizers
class ReplacingMomentum(torch.optim.Optimizer):
    """Replaces its state tensors every step (``state['buf'] = state['buf'] * beta + g``) instead of updating them
    in place; Python int/float state; a key (``late``) that appears only at a parameter's 3rd step."""

    def __init__(self, params: Any, lr: float = 0.05, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["n"] = 0
                    st["buf"] = torch.zeros_like(p)
                    st["gnorm"] = 0.0
                st["n"] += 1
                st["buf"] = st["buf"] * group["beta"] + p.grad
                st["gnorm"] = float(p.grad.norm())
                if st["n"] == 3:
                    st["late"] = p.grad.clone()
                upd = st["buf"]
                if "late" in st:
                    st["late"] = st["late"] * 0.5 + st["buf"]
                    upd = upd + 0.1 * st["late"]
                p.add_(upd, alpha=-group["lr"])


class ContainerOpt(torch.optim.Optimizer):
    """Tensors nested in a dict (updated in place), in a tuple (replaced), in a list that grows then rotates;
    Python values inside a dict; and RNG use inside ``step()``."""

    def __init__(self, params: Any, lr: float = 0.02, betas: tuple = (0.9, 0.99), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, hist=2))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["t"] = 0
                    st["moments"] = {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}
                    st["pair"] = (torch.zeros_like(p), torch.zeros_like(p))
                    st["hist"] = []
                st["t"] += 1
                m, v = st["moments"]["m"], st["moments"]["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                a, b = st["pair"]
                st["pair"] = (a + g, torch.maximum(b, g.abs()))
                st["hist"].append(g.clone())
                if len(st["hist"]) > group["hist"]:
                    st["hist"].pop(0)
                st["info"] = {"t": st["t"], "scale": 1.0 / st["t"], "n": [len(st["hist"]), (st["t"], "x")]}
                noise = torch.randn(p.shape) * 1e-4  # consumes the global RNG inside step()
                p.addcdiv_(m + noise, v.sqrt().add_(group["eps"]), value=-group["lr"])
                p.sub_(st["pair"][1] * 1e-3 + sum(st["hist"]) * 1e-3)


class AliasViewOpt(torch.optim.Optimizer):
    """The same tensor under two keys, a view of the parameter itself (the update goes through it), a 0-d integer
    tensor, and a key that appears only at step 3 and only for the first parameter of each group."""

    def __init__(self, params: Any, lr: float = 0.05, momentum: float = 0.8) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    buf = torch.zeros_like(p)
                    st["buf"] = buf
                    st["buf_alias"] = buf
                    st["pview"] = p.view(-1)
                    st["count"] = torch.zeros((), dtype=torch.int64)
                st["count"] += 1
                st["buf"].mul_(group["momentum"]).add_(p.grad)
                upd = st["buf_alias"].reshape(-1)
                if i == 0 and int(st["count"]) >= 3:
                    if "extra" not in st:
                        st["extra"] = torch.ones_like(p)
                    st["extra"].mul_(0.5)
                    upd = upd + st["extra"].reshape(-1)
                st["pview"].sub_(upd, alpha=group["lr"])


class GrowingViewsOpt(torch.optim.Optimizer):
    """Adds a state tensor at every step (``m{n}``: the n-th gradient) and, one step later, caches a flat view of
    it (``v{n}``) through which it keeps updating it. New state at every step also means a new arena chunk per
    step, so the view outlives a growth of the chunk its tensor lives in."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                n = st["n"] = st.get("n", 0) + 1
                st[f"m{n}"] = p.grad.clone()
                if n > 1:
                    st[f"v{n - 1}"] = st[f"m{n - 1}"].view(-1)
                for k in range(1, n):
                    st[f"v{k}"].mul_(0.5)  # updates m{k} through its view
                    p.add_(st[f"m{k}"], alpha=-group["lr"] / k)
                p.add_(p.grad, alpha=-group["lr"])


class SparseStateOpt(torch.optim.Optimizer):
    """Keeps a sparse tensor in its state (the last coalesced gradient) next to a dense accumulator."""

    def __init__(self, params: Any, lr: float = 0.05, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                g = p.grad.coalesce()
                if not st:
                    st["acc"] = torch.zeros_like(p)
                st["acc"].mul_(group["beta"]).add_(g)
                if "last" in st:
                    p.add_(st["last"], alpha=-0.1 * group["lr"])
                st["last"] = g
                p.add_(st["acc"], alpha=-group["lr"])


CUSTOM = {
    c.__name__: c for c in (ReplacingMomentum, ContainerOpt, AliasViewOpt, GrowingViewsOpt, SparseStateOpt)
}


# ---------------------------------------------------------------------------------------------------- the matrix
def half(v: Any) -> Any:
    return v * 0.5


def beta1(f: float) -> Callable[[tuple], tuple]:
    return lambda b: (b[0] * f, b[1])


class Spec:
    """One optimizer configuration: constructor kwargs, second-group overrides, the hyperparameter edit used by
    scenario 3, which model it trains, whether it needs a closure."""

    def __init__(
        self,
        opt: str,
        variant: str,
        kwargs: dict,
        edit: dict[str, Callable[[Any], Any]],
        *,
        g2: dict | None = None,
        model: str = "mlp",
        closure: bool = False,
        custom: bool = False,
    ) -> None:
        self.opt, self.variant, self.kwargs, self.edit = opt, variant, kwargs, edit
        self.g2, self.model, self.closure, self.custom = g2, model, closure, custom
        self.id = f"{opt}-{variant}"
        self.cls = CUSTOM[opt] if custom else getattr(torch.optim, opt)

    def impl_kwargs(self, impl: str) -> dict:
        if impl == "single":
            # The single-tensor loop; optimizers without a foreach argument have only that implementation.
            return {"foreach": False} if "foreach" in inspect.signature(self.cls.__init__).parameters else {}
        return {"foreach": True} if impl == "foreach" else {"fused": True}

    def build(self, impl: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(SEED)
        model = MODELS[self.model]()
        kw = {**copy.deepcopy(self.kwargs), **self.impl_kwargs(impl)}  # deepcopy: tensor lr must not be shared
        if self.g2 is None:
            params: Any = list(model.parameters())
        else:
            a, b, late = model.groups()
            if self.opt == "SGD" and impl == "fused" and self.kwargs.get("momentum"):
                # torch's fused SGD raises (TypeError, in torch itself) when some momentum buffers of a group
                # exist and others not, i.e. when a parameter of a stepped group gets its first gradient late.
                params = [{"params": a}, {"params": b, **copy.deepcopy(self.g2)}]
                params.append({"params": late, **copy.deepcopy(self.g2)})
            else:
                params = [{"params": a}, {"params": b + late, **copy.deepcopy(self.g2)}]
        return model, self.cls(params, **kw)


S = Spec
ND = dict(differentiable=False)  # the default, spelled out in every "plain" variant that has the argument
SPECS: list[Spec] = [
    # SGD
    S("SGD", "plain", dict(lr=0.1, **ND), dict(lr=half, weight_decay=lambda w: w + 0.05),
      g2=dict(lr=0.05, weight_decay=0.01)),
    S("SGD", "momentum_dampening", dict(lr=0.1, momentum=0.9, dampening=0.3), dict(lr=half, momentum=half),
      g2=dict(lr=0.05, momentum=0.5, dampening=0.0)),
    S("SGD", "nesterov", dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=half, momentum=half),
      g2=dict(momentum=0.6)),
    S("SGD", "maximize_wd", dict(lr=0.05, momentum=0.9, weight_decay=0.1, maximize=True),
      dict(lr=half, weight_decay=half), g2=dict(weight_decay=0.0)),
    # Adam
    S("Adam", "plain", dict(lr=0.01, **ND), dict(lr=half, betas=beta1(0.5)), g2=dict(lr=0.02, betas=(0.8, 0.99))),
    S("Adam", "amsgrad", dict(lr=0.01, amsgrad=True), dict(lr=half, betas=beta1(0.5)), g2=dict(lr=0.02)),
    S("Adam", "maximize_wd", dict(lr=0.01, maximize=True, weight_decay=0.1), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    S("Adam", "decoupled_wd", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
      dict(lr=half, weight_decay=half), g2=dict(weight_decay=0.3)),
    S("Adam", "tensor_lr", dict(lr=torch.tensor(0.01)), dict(lr=half, betas=beta1(0.5)),
      g2=dict(lr=torch.tensor(0.02))),
    S("Adam", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # AdamW
    S("AdamW", "plain", dict(lr=0.01, **ND), dict(lr=half, weight_decay=half), g2=dict(lr=0.02, weight_decay=0.1)),
    S("AdamW", "amsgrad", dict(lr=0.01, amsgrad=True), dict(lr=half, betas=beta1(0.5)), g2=dict(betas=(0.8, 0.9))),
    S("AdamW", "maximize", dict(lr=0.01, maximize=True), dict(lr=half, weight_decay=half), g2=dict(lr=0.005)),
    S("AdamW", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # Adagrad (creates its state eagerly in __init__)
    S("Adagrad", "plain", dict(lr=0.1, **ND), dict(lr=half, lr_decay=lambda d: d + 0.1), g2=dict(lr=0.05)),
    S("Adagrad", "decay_wd_init", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1),
      dict(lr=half, weight_decay=half), g2=dict(lr_decay=0.0, weight_decay=0.0)),
    S("Adagrad", "maximize", dict(lr=0.1, maximize=True), dict(lr=half, eps=lambda e: e * 10), g2=dict(lr=0.05)),
    # Adadelta
    S("Adadelta", "plain", dict(**ND), dict(lr=half, rho=half), g2=dict(lr=0.5, rho=0.8)),
    S("Adadelta", "wd_maximize", dict(weight_decay=0.1, maximize=True), dict(lr=half, rho=half),
      g2=dict(weight_decay=0.0)),
    S("Adadelta", "capturable", dict(capturable=True), dict(lr=half), g2=dict(lr=0.5)),
    # Adamax
    S("Adamax", "plain", dict(lr=0.01, **ND), dict(lr=half, betas=beta1(0.5)), g2=dict(lr=0.02)),
    S("Adamax", "wd_maximize", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    S("Adamax", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # NAdam
    S("NAdam", "plain", dict(lr=0.01, **ND), dict(lr=half, momentum_decay=lambda d: d * 2), g2=dict(lr=0.02)),
    S("NAdam", "decoupled_wd", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
      dict(lr=half, betas=beta1(0.5)), g2=dict(weight_decay=0.3)),
    S("NAdam", "maximize_wd", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    S("NAdam", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # RAdam
    S("RAdam", "plain", dict(lr=0.01, **ND), dict(lr=half, betas=beta1(0.5)), g2=dict(lr=0.02)),
    S("RAdam", "decoupled_wd", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
      dict(lr=half, weight_decay=half), g2=dict(weight_decay=0.3)),
    S("RAdam", "maximize_wd", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    S("RAdam", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # RMSprop
    S("RMSprop", "plain", dict(lr=0.01, **ND), dict(lr=half, alpha=half), g2=dict(lr=0.02, alpha=0.9)),
    S("RMSprop", "centered_momentum", dict(lr=0.01, centered=True, momentum=0.9), dict(lr=half, momentum=half),
      g2=dict(momentum=0.5)),
    S("RMSprop", "wd_maximize", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    S("RMSprop", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # Rprop
    S("Rprop", "plain", dict(lr=0.01, **ND), dict(lr=half, etas=lambda e: (e[0], 1.5)),
      g2=dict(lr=0.02, etas=(0.4, 1.1))),
    S("Rprop", "maximize", dict(lr=0.01, maximize=True), dict(lr=half, step_sizes=lambda s: (s[0], 0.5)),
      g2=dict(lr=0.02)),
    S("Rprop", "capturable", dict(lr=0.01, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # ASGD (t0=1 switches the parameter averaging `ax` on within the run)
    S("ASGD", "plain", dict(lr=0.05, **ND), dict(lr=half, lambd=lambda v: v * 10), g2=dict(lr=0.02)),
    S("ASGD", "averaging_wd", dict(lr=0.05, t0=1.0, weight_decay=0.01), dict(lr=half, alpha=half), g2=dict(t0=2.0)),
    S("ASGD", "maximize", dict(lr=0.05, maximize=True), dict(lr=half, lambd=lambda v: v * 10), g2=dict(lr=0.02)),
    S("ASGD", "capturable", dict(lr=0.05, capturable=True), dict(lr=half), g2=dict(lr=0.02)),
    # Adafactor
    S("Adafactor", "plain", dict(lr=0.01), dict(lr=half, beta2_decay=lambda b: b * 0.5), g2=dict(lr=0.02)),
    S("Adafactor", "wd_maximize", dict(lr=0.01, weight_decay=0.1, maximize=True), dict(lr=half, weight_decay=half),
      g2=dict(weight_decay=0.0)),
    # LBFGS: one param group only (torch restriction); closure; list-valued state, Python ints/floats
    S("LBFGS", "plain", dict(lr=0.5, max_iter=4, history_size=3), dict(lr=half, max_iter=lambda n: n + 2),
      closure=True),
    S("LBFGS", "strong_wolfe", dict(lr=1.0, max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
      dict(lr=half, max_iter=lambda n: n - 1), closure=True),  # (shrinking history_size mid-run breaks torch)
    # SparseAdam: sparse gradients, dense-parameter-free model
    S("SparseAdam", "plain", dict(lr=0.05), dict(lr=half, betas=beta1(0.5)), g2=dict(lr=0.02, betas=(0.8, 0.99)),
      model="sparse"),
    S("SparseAdam", "maximize", dict(lr=0.05, maximize=True), dict(lr=half, eps=lambda e: e * 10), g2=dict(lr=0.02),
      model="sparse"),
    # Muon: 2-D parameters only
    S("Muon", "plain", dict(lr=0.02), dict(lr=half, momentum=half), g2=dict(lr=0.01, momentum=0.8), model="muon"),
    S("Muon", "no_nesterov", dict(lr=0.02, nesterov=False, weight_decay=0.0), dict(lr=half, momentum=half),
      g2=dict(weight_decay=0.1), model="muon"),
    S("Muon", "match_rms_adamw", dict(lr=0.02, adjust_lr_fn="match_rms_adamw", ns_steps=3),
      dict(lr=half, weight_decay=half), g2=dict(ns_steps=5), model="muon"),
    # user subclasses
    S("ReplacingMomentum", "custom", dict(lr=0.05), dict(lr=half, beta=half), g2=dict(lr=0.02, beta=0.5), custom=True),
    S("ContainerOpt", "custom", dict(lr=0.02), dict(lr=half, betas=beta1(0.5)), g2=dict(betas=(0.5, 0.9)), custom=True),
    S("AliasViewOpt", "custom", dict(lr=0.05), dict(lr=half, momentum=half), g2=dict(momentum=0.5), custom=True),
    S("GrowingViewsOpt", "custom", dict(lr=0.05), dict(lr=half), g2=dict(lr=0.02), custom=True),
    S("SparseStateOpt", "custom", dict(lr=0.05), dict(lr=half, beta=half), g2=dict(lr=0.02, beta=0.5), model="sparse",
      custom=True),
]  # fmt: skip
SPEC_BY_ID = {s.id: s for s in SPECS}
assert len(SPEC_BY_ID) == len(SPECS)

IMPLS = ("single", "foreach", "fused")
ALL_COMBINATIONS = [(s, impl) for s in SPECS for impl in (("single",) if s.custom else IMPLS)]  # user subclasses
# have one implementation: their own. CASES (below, after _probe) keeps those torch accepts on this machine.

ALL_SCENARIOS = (
    "test_undo_restep_equals_plain_run", "test_undo_two_then_replay_with_recorded_grads", "test_undo_n_redo_n",
    "test_undo_edit_hparams_step", "test_retry_with_hparams", "test_undo_first_step", "test_object_identity",
)  # fmt: skip
# Library bugs found by this suite, now fixed (kept as regular cases): sparse tensors could not be snapshotted
# (SparseAdam with grads=True, SparseStateOpt), and growing an arena chunk detached views of its tensors
# (GrowingViewsOpt). Add {(spec id, impl or None for all, scenario): reason} entries here for new strict xfails.
XFAIL: dict[tuple[str, str | None, str], str] = {}


# ---------------------------------------------------------------------------------------------------- running
class Run:
    """One training run. ``prepare(j)`` zeroes grads and backprops batch j (drawing from the global RNG first);
    ``opt_step(j)`` calls ``optimizer.step`` (with batch j's closure for closure optimizers)."""

    def __init__(self, spec: Spec, impl: str, rewind: dict | None = None) -> None:
        self.spec = spec
        self.model, self.opt = spec.build(impl)
        self.model.train()
        self.rw = Rewind(self.model, self.opt, **rewind) if rewind is not None else None

    def loss(self, j: int) -> torch.Tensor:
        x, y = DATA[self.spec.model][j]
        return ((self.model(x, j) - y) ** 2).mean()

    def closure(self, j: int) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            self.opt.zero_grad()
            loss = self.loss(j)
            loss.backward()
            return loss

        return closure

    def prepare(self, j: int) -> None:
        self.opt.zero_grad()
        if not self.spec.closure:
            scale = 1.0 + 0.01 * torch.randn(())  # global RNG use before the step boundary
            (self.loss(j) * scale).backward()

    def opt_step(self, j: int) -> Any:
        return self.opt.step(self.closure(j)) if self.spec.closure else self.opt.step()

    def step(self, j: int) -> None:
        self.prepare(j)
        self.opt_step(j)

    def state(self) -> dict:
        return full_state(self.model, self.opt)


def apply_edit(opt: torch.optim.Optimizer, edit: dict[str, Callable[[Any], Any]]) -> None:
    for g in opt.param_groups:
        for k, fn in edit.items():
            g[k] = fn(g[k])


@functools.cache
def _probe(spec_id: str, impl: str) -> tuple[str | None, bool]:
    """Run the configuration for all steps without torchrewind: (the error torch raises, if any; whether
    ``optimizer.step()`` modifies ``p.grad`` in place)."""
    spec = SPEC_BY_ID[spec_id]
    mutates = False
    try:
        r = Run(spec, impl)
        for j in range(STEPS):
            r.prepare(j)
            grads = [None if p.grad is None else p.grad.clone() for p in r.model.parameters()]
            r.opt_step(j)
            if not spec.closure:
                mutates |= any(
                    g is not None and not values_equal(g, p.grad) for g, p in zip(grads, r.model.parameters())
                )
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
    return None, mutates


def supported(spec: Spec, impl: str) -> bool:
    err = _probe(spec.id, impl)[0]
    if err is not None and impl == "single" and "capturable" not in spec.kwargs:
        raise AssertionError(f"test bug: the baseline configuration {spec.id} fails without torchrewind: {err}")
    return err is None


CASES = [pytest.param(s, impl, id=f"{s.id}-{impl}") for s, impl in ALL_COMBINATIONS if supported(s, impl)]


def test_left_out_combinations_are_rejected_by_torch() -> None:
    """The combinations the scenarios leave out are exactly those whose plain run (no torchrewind) raises in torch:
    a ``fused``/``foreach`` argument the optimizer lacks, or ``capturable=True`` on CPU. Printed with torch's error
    (``pytest -s``) so the matrix's coverage is visible."""
    left_out = [(s, impl, _probe(s.id, impl)[0]) for s, impl in ALL_COMBINATIONS if not supported(s, impl)]
    for s, impl, err in left_out:
        print(f"left out: {s.id}-{impl} {s.impl_kwargs(impl)}: {err}")
        assert impl != "single" or "capturable" in s.kwargs, (s.id, impl, err)
        assert err.startswith(("TypeError", "RuntimeError", "ValueError", "AssertionError")), (s.id, impl, err)
    assert len(CASES) + len(left_out) == len(ALL_COMBINATIONS)
    assert len(CASES) >= len(SPECS)  # every optimizer has at least one implementation exercised


def restep_rewind(spec: Spec, impl: str, **kw: Any) -> dict:
    """Rewind arguments for scenarios that step again with the live gradients after an undo. Some torch
    implementations modify ``p.grad`` in place during ``step()`` (foreach SGD with nesterov adds the momentum
    buffer into the gradients), so "the same gradients" must then come back from the history (``grads=True``)."""
    return {**kw, "grads": True} if _probe(spec.id, impl)[1] else kw


def reference(spec: Spec, impl: str, steps: int = STEPS, edit_at: int | None = None) -> dict:
    r = Run(spec, impl)
    for j in range(steps):
        if j == edit_at:
            apply_edit(r.opt, spec.edit)
        r.step(j)
    return r.state()


def state_tensors(opt: torch.optim.Optimizer, model_params: list) -> dict[tuple[int, str], torch.Tensor]:
    """Dense top-level optimizer-state tensors, keyed by (parameter position, key)."""
    index = {id(p): i for i, p in enumerate(model_params)}
    return {
        (index[id(p)], k): v
        for p, st in opt.state.items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor) and v.layout == torch.strided
    }


def apply_xfail(request: pytest.FixtureRequest, spec: Spec, impl: str, scenario: str) -> None:
    for (sid, im, sc), why in XFAIL.items():
        if sid == spec.id and im in (None, impl) and sc == scenario:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=why))


@pytest.fixture
def case(request: pytest.FixtureRequest) -> tuple[Spec, str]:
    spec, impl = request.param
    apply_xfail(request, spec, impl, request.function.__name__)
    return spec, impl


def cases(f: Callable) -> Callable:
    return pytest.mark.parametrize("case", [pytest.param(p.values, id=p.id) for p in CASES], indirect=True)(f)


# ---------------------------------------------------------------------------------------------------- scenarios
@cases
def test_undo_restep_equals_plain_run(case: tuple[Spec, str]) -> None:
    """1. At every step: step, undo, step again with the same gradients (odd steps also bounce through redo and
    a second undo); after all steps the state equals a run that never undid anything."""
    spec, impl = case
    ref = reference(spec, impl)
    r = Run(spec, impl, rewind=restep_rewind(spec, impl))
    for j in range(STEPS):
        r.step(j)
        r.rw.undo()
        if j % 2:
            r.rw.redo()
            r.rw.undo()
        r.opt_step(j)
    assert_same(r.state(), ref)


@cases
def test_undo_two_then_replay_with_recorded_grads(case: tuple[Spec, str]) -> None:
    """1b. undo(2) with grads=True brings back step STEPS-2's gradients; replaying the last two steps from there
    equals the plain run."""
    spec, impl = case
    ref = reference(spec, impl)
    r = Run(spec, impl, rewind=dict(capacity=2, grads=True))
    for j in range(STEPS):
        r.step(j)
    r.rw.undo(2)
    r.opt_step(STEPS - 2)
    r.step(STEPS - 1)
    assert_same(r.state(), ref)


@cases
def test_undo_n_redo_n(case: tuple[Spec, str]) -> None:
    """2. undo(n) equals the state just before step STEPS-n; redo(n) returns to the exact post-step state; single
    redo() calls walk through every recorded pre-step state. Hyperparameters are edited between two steps, so the
    recorded points also differ in param_groups."""
    spec, impl = case
    r = Run(spec, impl, rewind=dict(capacity=STEPS))
    pre = []
    for j in range(STEPS):
        if j == EDIT_AT:
            apply_edit(r.opt, spec.edit)  # hyperparameters differ between recorded points (as with a scheduler)
        r.prepare(j)
        pre.append(r.state())
        r.opt_step(j)
    post = r.state()
    assert_same(post, reference(spec, impl, edit_at=EDIT_AT))
    for n in range(1, STEPS + 1):
        r.rw.undo(n)
        assert (len(r.rw), r.rw.redo_depth) == (STEPS - n, n)
        assert_same(r.state(), pre[STEPS - n])
        r.rw.redo(n)
        assert (len(r.rw), r.rw.redo_depth) == (STEPS, 0)
        assert_same(r.state(), post)
    r.rw.undo(STEPS)
    for j in range(1, STEPS):
        r.rw.redo()
        assert_same(r.state(), pre[j])
    r.rw.redo()
    assert_same(r.state(), post)


@cases
def test_undo_edit_hparams_step(case: tuple[Spec, str]) -> None:
    """3. Step, undo, edit lr and an optimizer-specific hyperparameter in every group, step again: equals a run
    that used the edited hyperparameters at that step (and after)."""
    spec, impl = case
    ref = reference(spec, impl, edit_at=EDIT_AT)
    r = Run(spec, impl, rewind=restep_rewind(spec, impl))
    for j in range(STEPS):
        r.step(j)
        if j == EDIT_AT:
            r.rw.undo()
            apply_edit(r.opt, spec.edit)
            r.opt_step(j)
    assert_same(r.state(), ref)


@cases
def test_retry_with_hparams(case: tuple[Spec, str]) -> None:
    """3b. The same through rw.retry(**edits) (callables old -> new)."""
    spec, impl = case
    ref = reference(spec, impl, edit_at=EDIT_AT)
    r = Run(spec, impl, rewind=restep_rewind(spec, impl))
    for j in range(STEPS):
        r.step(j)
        if j == EDIT_AT:
            r.rw.retry(closure=r.closure(j) if spec.closure else None, **spec.edit)
    assert_same(r.state(), ref)


@cases
def test_undo_first_step(case: tuple[Spec, str]) -> None:
    """4. Undoing the very first step brings optimizer.state back to what it was before it (empty for lazily
    initialising optimizers); the following steps equal a plain run."""
    spec, impl = case
    plain = Run(spec, impl)
    plain.prepare(0)
    before = plain.state()
    plain.opt_step(0)
    after = plain.state()
    for j in range(1, STEPS):
        plain.step(j)
    final = plain.state()

    r = Run(spec, impl, rewind=restep_rewind(spec, impl))
    r.step(0)
    assert len(r.opt.state) > 0 or spec.id == "SGD-plain"  # (SGD without momentum keeps no state)
    r.rw.undo()
    assert len(r.opt.state) == len(before["opt_state"])
    if spec.opt != "Adagrad":  # Adagrad creates its state in __init__; every other one lazily
        assert len(r.opt.state) == 0
    assert type(r.opt.state) is collections.defaultdict  # torch relies on state[p] creating the dict
    assert_same(r.state(), before)
    r.opt_step(0)
    assert_same(r.state(), after)
    r.rw.undo()
    r.rw.redo()
    assert_same(r.state(), after)
    for j in range(1, STEPS):
        r.step(j)
    assert_same(r.state(), final)


@cases
def test_object_identity(case: tuple[Spec, str]) -> None:
    """5. After undo/redo the Parameters are the same objects (in the model and in param_groups), and every dense
    top-level state tensor that exists at the target point is the object that was there before the undo."""
    spec, impl = case
    r = Run(spec, impl, rewind=dict(capacity=STEPS))
    params = list(r.model.parameters())
    group_params = [list(g["params"]) for g in r.opt.param_groups]
    keys_at = []
    for j in range(STEPS):
        r.prepare(j)
        keys_at.append(set(state_tensors(r.opt, params)))
        r.opt_step(j)
    post = state_tensors(r.opt, params)

    def check_params() -> None:
        assert all(a is b for a, b in zip(r.model.parameters(), params, strict=True))
        for g, ps in zip(r.opt.param_groups, group_params, strict=True):
            assert all(a is b for a, b in zip(g["params"], ps, strict=True))

    for n in range(1, STEPS + 1):
        r.rw.undo(n)
        check_params()
        live = state_tensors(r.opt, params)
        assert set(live) == keys_at[STEPS - n]
        for key, t in live.items():
            if key in post:
                assert t is post[key], f"state {key} is a new object after undo({n})"
        r.rw.redo(n)
        check_params()
        live = state_tensors(r.opt, params)
        assert set(live) == set(post)
        for key, t in live.items():
            assert t is post[key], f"state {key} is a new object after redo({n})"


# ---------------------------------------------------------------------------------------------------- custom-only
@pytest.mark.parametrize("steps", [1, 2, 3, STEPS])
def test_alias_and_view_invariants(steps: int) -> None:
    """AliasViewOpt: after every undo/redo the two keys still name one tensor, and the stored view still aliases
    its parameter (so updates through it reach the parameter)."""
    spec = SPEC_BY_ID["AliasViewOpt-custom"]
    r = Run(spec, "single", rewind=dict(capacity=STEPS))
    for j in range(steps):
        r.step(j)

    def check() -> None:
        for p, st in r.opt.state.items():
            assert st["buf"] is st["buf_alias"]
            assert st["pview"].data_ptr() == p.data_ptr()
            assert torch.equal(st["pview"], p.detach().reshape(-1))

    check()
    for n in range(1, steps + 1):
        r.rw.undo(n)
        check()
        r.rw.redo(n)
        check()
