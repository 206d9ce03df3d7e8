"""Fault injection by iteration index, for every task of the suite.

A :class:`FaultPlan` lists :class:`Fault` s: which kind, from which iteration, for how long, how strong. An
:class:`Injector` applies a plan to one :class:`~benchmarks.suite.tasks.TaskRun`:

* ``scale``   — inputs x ``factor`` (default 1e3) at the given iterations;
* ``shuffle`` — targets permuted within the batch (a burst of wrong labels); for a language model, the target tokens
  are permuted across the whole batch;
* ``lr``      — every param group's lr x ``factor`` for ``length`` steps, undone after each of those steps (as a
  bad schedule would do);
* ``nan``     — one input value of the batch's first example set to NaN (a corrupted record);
* ``drift``   — inputs scaled smoothly from 1x to ``factor`` x over ``length`` iterations, then held there for the
  rest of the run: a slow change that is not a spike (a healthy run adapts; a guard must not fire on it).

Batch faults are keyed by the position of the batch in the stream, lr faults by the loop iteration (the same thing
unless a policy skips batches). Inputs that are ids (``run.input_kind == "tokens"``: language model, recommender,
matrix factorisation) have no meaningful scale or NaN: those faults act on the output of ``run.first_layer``
through a forward hook, only while the faulty iteration's step runs (never during ``evaluate``).

Example::

    plan = FaultPlan.standard("mixed", iterations=run.iterations, seed=0)
    inj = Injector(run, plan)
    for i, batch in enumerate(inj.batches(run.batches())):
        with inj.step(i, optimizer): ...        # forward, backward, optimizer.step()
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

KINDS = ("scale", "shuffle", "lr", "nan", "drift")
PLANS = ("none", "mixed", "scale", "burst", "lr", "nan", "drift")


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` from iteration ``at`` for ``length`` iterations (``drift``: the ramp's length; it is
    held afterwards), with strength ``factor`` (``scale``/``lr``: multiplier; ``drift``: final multiplier)."""

    kind: str
    at: int
    length: int = 1
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.at < 0 or self.length < 1:
            raise ValueError(f"fault {self.kind}: needs at >= 0, length >= 1; got at={self.at}, length={self.length}")

    def covers(self, i: int) -> bool:
        if self.kind == "drift":
            return i >= self.at
        return self.at <= i < self.at + self.length

    def drift_scale(self, i: int) -> float:
        """The drift's input multiplier at iteration ``i`` (1 before it starts, ``factor`` after its ramp)."""
        if i < self.at:
            return 1.0
        return 1.0 + (self.factor - 1.0) * min(1.0, (i - self.at + 1) / self.length)


@dataclass(frozen=True)
class FaultPlan:
    """Which faults at which iterations. ``seed`` fixes the permutations of ``shuffle`` faults.

    Example::

        plan = FaultPlan.standard("burst", iterations=400, seed=3)
        plan = FaultPlan("custom", (Fault("scale", 100, factor=1e3), Fault("lr", 200, length=5, factor=50.0)))
        print(plan.iterations("lr"))            # [200, 201, 202, 203, 204]
    """

    name: str
    faults: tuple[Fault, ...] = ()
    seed: int = 0

    def at(self, i: int) -> list[Fault]:
        """The faults that act on iteration ``i``."""
        return [f for f in self.faults if f.covers(i)]

    def lr_factor(self, i: int) -> float:
        return math.prod(f.factor for f in self.at(i) if f.kind == "lr")

    def iterations(self, kind: str | None = None, until: int | None = None) -> list[int]:
        """Sorted iterations a fault (of ``kind``) acts on; a drift counts from its start to ``until`` (default:
        the end of its ramp)."""
        out: set[int] = set()
        for f in self.faults:
            if kind is None or f.kind == kind:
                end = (until if until is not None else f.at + f.length) if f.kind == "drift" else f.at + f.length
                out.update(range(f.at, end))
        return sorted(out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "faults": [asdict(f) for f in self.faults]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultPlan:
        return cls(d["name"], tuple(Fault(**f) for f in d["faults"]), d.get("seed", 0))

    @classmethod
    def standard(cls, name: str, iterations: int, seed: int = 0) -> FaultPlan:
        """A standard plan for a run of ``iterations`` iterations; positions are fractions of the run, jittered by
        up to 2% of it from ``seed`` (so a detector cannot learn fixed positions), lengths shrink for short runs.

        ``none``; ``scale`` (inputs x1e3 at 25/50/75%); ``burst`` (8 batches of shuffled targets at 30% and 70%);
        ``lr`` (lr x50 for 5 steps at 40%); ``nan`` (one NaN input at 50%); ``drift`` (inputs 1x -> 3x over 200
        iterations, at most half the run, from 25%); ``mixed`` (what ``bench_policies.py`` injects: scale at
        25/50/75%, NaN at 30%, lr x50 at 40%, burst at 60%)."""
        if name not in PLANS:
            raise ValueError(f"unknown fault plan {name!r}; plans: {', '.join(PLANS)}")
        if iterations < 10:
            raise ValueError(f"a standard fault plan needs iterations >= 10, got {iterations}")
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{seed}".encode()) & 0x7FFFFFFF)
        jitter = max(1, iterations // 50)

        def pos(frac: float) -> int:
            j = int(torch.randint(-jitter, jitter + 1, (), generator=g))
            return min(iterations - 1, max(1, int(round(frac * iterations)) + j))

        def short(n: int) -> int:  # a burst or spike length that still fits a short (--quick) run
            return max(1, min(n, iterations // 10))

        scale = [Fault("scale", pos(f), 1, 1e3) for f in (0.25, 0.5, 0.75)]
        burst = [Fault("shuffle", pos(f), short(8)) for f in (0.3, 0.7)]
        lr = [Fault("lr", pos(0.4), short(5), 50.0)]
        nan = [Fault("nan", pos(0.5))]
        plans = {
            "none": [],
            "scale": scale,
            "burst": burst,
            "lr": lr,
            "nan": nan,
            "drift": [Fault("drift", pos(0.25), max(1, min(200, iterations // 2)), 3.0)],
            "mixed": scale + [Fault("nan", pos(0.3)), Fault("lr", pos(0.4), short(5), 50.0),
                              Fault("shuffle", pos(0.6), short(8))],  # fmt: skip
        }
        return cls(name, tuple(sorted(plans[name], key=lambda f: (f.at, f.kind))), seed)


def resolve(plan: FaultPlan | str | None, iterations: int, seed: int = 0) -> FaultPlan:
    """A plan from a plan, a standard plan's name, or None (no faults).

    Example::

        resolve("mixed", iterations=400, seed=1) == FaultPlan.standard("mixed", 400, 1)    # True
    """
    if plan is None:
        return FaultPlan("none")
    if isinstance(plan, str):
        return FaultPlan.standard(plan, iterations, seed)
    if isinstance(plan, FaultPlan):
        return plan
    raise TypeError(f"faults must be a FaultPlan, a plan name ({', '.join(PLANS)}) or None, got {type(plan).__name__}")


# ------------------------------------------------------------------------------------------------------- injector
def _nan_one(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    flat = t.reshape(len(t), -1)  # a view: t is contiguous after clone
    flat[0, flat.shape[1] // 2] = float("nan")  # the first example's middle value
    return t


def _shuffle(y: Any, perm_seed: int) -> Any:
    if isinstance(y, tuple):  # several targets: the same permutation for each, along the batch
        g = torch.Generator().manual_seed(perm_seed)
        perm = torch.randperm(len(y[0]), generator=g)
        return tuple(t[perm] for t in y)
    g = torch.Generator().manual_seed(perm_seed)
    if y.dim() >= 2 and not y.is_floating_point():  # token targets (language model): across the whole batch
        return y.reshape(-1)[torch.randperm(y.numel(), generator=g)].reshape(y.shape)
    return y[torch.randperm(len(y), generator=g)]


def _input_transform(faults: list[Fault], i: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The change a batch's inputs (or the first layer's output) get at iteration ``i``, or None."""
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for f in faults:
        if f.kind == "scale":
            ops.append(lambda t, k=f.factor: t * k)
        elif f.kind == "drift":
            ops.append(lambda t, k=f.drift_scale(i): t * k)
        elif f.kind == "nan":
            ops.append(_nan_one)
    if not ops:
        return None

    def apply(t: torch.Tensor) -> torch.Tensor:
        for op in ops:
            t = op(t)
        return t

    return apply


class Injector:
    """Applies a :class:`FaultPlan` to a task's batches, its first layer (id inputs) and an optimizer's lrs.

    Example::

        inj = Injector(run, FaultPlan.standard("lr", run.iterations))
        stream = inj.batches(run.batches())
        for i in range(run.iterations):
            batch = next(stream)
            with inj.step(i, opt):
                opt.zero_grad(); run.loss(run.model, batch).backward(); opt.step()
        inj.close()
    """

    def __init__(self, run: Any, plan: FaultPlan) -> None:
        self.run, self.plan = run, plan
        self.hooked = run.input_kind == "tokens"
        self._pending: Callable[[torch.Tensor], torch.Tensor] | None = None  # for the batch last drawn
        self._active: Callable[[torch.Tensor], torch.Tensor] | None = None  # while its step runs
        self._handle = None
        self.position = -1  # stream position of the batch last drawn
        if self.hooked and any(f.kind in ("scale", "nan", "drift") for f in plan.faults):
            self._handle = run.first_layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        if self._active is None:
            return None
        if isinstance(out, tuple):
            return (self._active(out[0]), *out[1:])
        return self._active(out)

    def batches(self, stream: Iterator[Any]) -> Iterator[Any]:
        """The stream with the plan's batch faults applied (by position in the stream)."""
        for i, (x, y) in enumerate(stream):
            faults = self.plan.at(i)
            if any(f.kind == "shuffle" for f in faults):
                y = _shuffle(y, zlib.crc32(f"shuffle/{self.plan.seed}/{i}".encode()) & 0x7FFFFFFF)
            transform = _input_transform(faults, i)
            self.position = i
            if self.hooked:
                self._pending = transform
            elif transform is not None:
                x = transform(x)
            yield x, y

    @contextlib.contextmanager
    def step(self, i: int, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
        """Around iteration ``i``'s forward/backward/step: the lr fault (undone afterwards) and, for id inputs, the
        first-layer fault of the batch last drawn."""
        factor = self.plan.lr_factor(i) if optimizer is not None else 1.0
        groups = optimizer.param_groups if optimizer is not None else []
        before = [g["lr"] for g in groups]
        spiked = [lr * factor for lr in before]
        if factor != 1.0:
            for g, lr in zip(groups, spiked):
                g["lr"] = lr
        self._active, self._pending = self._pending, None
        try:
            yield
        finally:
            self._active = None
            if factor != 1.0:
                for g, b, s in zip(groups, before, spiked):
                    if g["lr"] == s:  # untouched by the step: back to exactly what it was
                        g["lr"] = b
                    elif g["lr"] != b:  # a policy changed it during the step (e.g. a line search): keep its change
                        g["lr"] = g["lr"] / factor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
