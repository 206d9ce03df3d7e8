"""The suite's training tasks: small, CPU-sized, offline, each a different kind of training problem.

Every task is built by ``make(seed, scale=1.0)`` into a :class:`TaskRun`: a fresh model, an infinite deterministic
batch stream, the loss, an ``evaluate`` function and suggested learning rates. Everything is a function of the seed:
two runs with the same seed give bitwise-identical losses (torch CPU kernels, same thread count).

Example::

    from benchmarks.suite import tasks
    run = tasks.make("wine_zero", seed=0)
    opt = torch.optim.Adam(run.model.parameters(), lr=run.adam_lr)

What the seed controls: the model's initial weights, the order of the mini-batches and (through the runner, which
seeds torch's global generator before training) dropout masks. The data and its train/validation/test split are
fixed per task (one data seed per task), so seeds are comparable. ``scale`` shrinks the run (iterations, and the
larger synthetic data sets) for smoke runs: ``scale=0.1`` is about ten times faster.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = tuple[torch.Tensor, Any]  # (inputs, targets); targets: a tensor or a tuple of tensors
SPLITS = ("tune", "report")


# ------------------------------------------------------------------------------------------------------- TaskRun
@dataclass
class TaskRun:
    """One task, built for one seed: everything a training loop needs.

    ``batches()`` starts the same infinite stream of ``(inputs, targets)`` mini-batches at every call.
    ``evaluate(model)`` returns ``train_loss`` (on a fixed subset of the training data, eval mode),
    ``val_loss``/``val_metric`` (the validation split: choose learning rates here), ``test_loss``/``test_metric``
    (report these), plus task-specific extras. ``metric`` names the metric; ``higher_is_better`` says its direction.
    ``sgd_lr`` is for SGD with momentum 0.9, ``adam_lr`` for Adam; ``weight_decay`` is part of the task (the
    optimizer helpers of :mod:`benchmarks.suite.runner` pass it on).

    Example::

        run = make("cnn_bn", seed=1)
        for i, (x, y) in zip(range(run.iterations), run.batches()):
            loss = run.loss(run.model, (x, y))
    """

    name: str
    kind: str
    split: str
    seed: int
    model: nn.Module
    batches: Callable[[], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    iterations: int
    sgd_lr: float
    adam_lr: float
    metric: str
    higher_is_better: bool
    input_kind: str  # "features" (float inputs: faults act on them) or "tokens" (ids: faults act on first_layer)
    first_layer: nn.Module  # the layer whose output a fault changes when the inputs are ids
    weight_decay: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # data, model, sizes: for tables

    @property
    def train_seed(self) -> int:
        """The seed for torch's global generator during training (dropout); the runner sets it."""
        return _seed(self.name, self.seed, "train")


@dataclass(frozen=True)
class Task:
    """A registered task: ``make(seed, scale)`` builds a :class:`TaskRun`.

    Example::

        task = TASKS["gru_forecast"]
        run = task.make(seed=0, scale=0.1)        # a short smoke run
        print(task.name, task.kind, task.split, run.iterations)
    """

    name: str
    kind: str
    split: str
    data: str
    model: str
    builder: Callable[..., TaskRun]

    def make(self, seed: int, scale: float = 1.0) -> TaskRun:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{self.name}: seed must be an int >= 0, got {seed!r}.")
        if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ValueError(f"{self.name}: scale must be in (0, 1], got {scale!r}.")
        # building must neither depend on nor disturb the caller's global RNG (model init draws from it)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.name, seed, "init"))
            return self.builder(self, seed, float(scale))


TASKS: dict[str, Task] = {}


def task(name: str, kind: str, split: str, data: str, model: str) -> Callable[[Callable[..., TaskRun]], Task]:
    """Register a builder ``fn(task, seed, scale) -> TaskRun`` under ``name``."""
    assert split in SPLITS and name not in TASKS

    def deco(fn: Callable[..., TaskRun]) -> Task:
        TASKS[name] = Task(name, kind, split, data, model, fn)
        return TASKS[name]

    return deco


def make(name: str, seed: int, scale: float = 1.0) -> TaskRun:
    """Build task ``name`` for ``seed``.

    Example::

        run = make("transformer_lm", seed=0, scale=0.1)
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name].make(seed, scale)


def names(split: str | None = None) -> list[str]:
    """Task names, all or those of one split (``"tune"`` or ``"report"``).

    Example::

        for name in names("tune"):
            run = make(name, seed=0)
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [n for n, t in TASKS.items() if split is None or t.split == split]


def preload(task_names: list[str] | None = None) -> None:
    """Read the data sets the tasks use into this process's caches (worker processes forked later share them).

    Example::

        preload(names("tune"))
    """
    chosen = set(TASKS if task_names is None else task_names)
    for name in {n for t, n in _DATA.items() if t in chosen}:
        _sklearn(name)
    if "transformer_lm" in chosen:
        _stdlib_ids()


def describe(scale: float = 1.0) -> list[dict[str, Any]]:
    """One row per task (name, kind, split, data, model, parameters, training examples, iterations, batch, lrs):
    builds each task once (seed 0).

    Example::

        for row in describe():
            print(row["name"], row["params"], row["iterations"])
    """
    rows = []
    for t in TASKS.values():
        r = t.make(0, scale)
        rows.append({
            "name": t.name, "kind": t.kind, "split": t.split, "data": t.data, "model": t.model,
            "params": sum(p.numel() for p in r.model.parameters()), "train_examples": r.info["train_examples"],
            "batch": r.info["batch"], "iterations": r.iterations, "sgd_lr": r.sgd_lr, "adam_lr": r.adam_lr,
            "metric": r.metric + (" (higher is better)" if r.higher_is_better else " (lower is better)"),
        })  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------------- helpers
def _seed(*parts: object) -> int:
    """A stable 31-bit seed from parts (``hash()`` of a str differs between processes; crc32 does not)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _iters(base: int, scale: float) -> int:
    return max(10, int(round(base * scale)))


def _split(n: int, n_val: int, n_test: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random train/val/test partition of range(n) (the same for every seed)."""
    perm = torch.randperm(n, generator=_gen(name, "split"))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _index(t: Any, idx: torch.Tensor) -> Any:
    return tuple(x[idx] for x in t) if isinstance(t, tuple) else t[idx]


def _length(t: Any) -> int:
    return len(t[0]) if isinstance(t, tuple) else len(t)


def _stream(x: torch.Tensor, y: Any, batch: int, gen_seed: int) -> Callable[[], Iterator[Batch]]:
    """``batches()``: epochs of full mini-batches (a partial last batch is dropped), reshuffled per epoch by a
    private generator that every call restarts."""
    n = len(x)
    batch = min(batch, n)

    def batches() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(gen_seed)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch + 1, batch):
                idx = perm[i : i + batch]
                yield x[idx], _index(y, idx)

    return batches


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in modes.items():
            m.training = was


def _float(t: torch.Tensor | float) -> float:
    return float(t.item()) if isinstance(t, torch.Tensor) else float(t)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(-1) == y).double().mean()


def r2(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred, y = pred.double().reshape(y.shape), y.double()
    return 1 - (pred - y).square().sum() / (y - y.mean(0)).square().sum()


def rmse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.double().reshape(y.shape) - y.double()).square().mean().sqrt()


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.reshape(y.shape), y)


def _supervised(
    task: Task,
    seed: int,
    scale: float,
    *,
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, Any]],
    criterion: Callable[[Any, Any], torch.Tensor],
    metric: Callable[[Any, Any], torch.Tensor],
    metric_name: str,
    higher_is_better: bool,
    batch: int,
    iterations: int,
    sgd_lr: float,
    adam_lr: float,
    input_kind: str = "features",
    first_layer: nn.Module | None = None,
    weight_decay: float = 0.0,
    train_eval: int = 512,
    extras: Callable[[nn.Module, dict[str, tuple[torch.Tensor, Any]]], dict[str, float]] | None = None,
    info: dict[str, Any] | None = None,
) -> TaskRun:
    """A TaskRun for supervised learning on fixed tensors ``data = {"train"|"val"|"test": (x, y)}``; ``scale < 1``
    also evaluates on fewer examples (the first ones of each split)."""
    x_tr, y_tr = data["train"]

    def cap(n: int) -> int:
        return n if scale >= 1 else min(n, max(128, int(n * scale)))

    sub = torch.randperm(len(x_tr), generator=_gen(task.name, "train-eval"))[: cap(train_eval)]
    fixed = {"train": (x_tr[sub], _index(y_tr, sub))}
    for part in ("val", "test"):
        x, y = data[part]
        keep = torch.arange(cap(len(x)))
        fixed[part] = (x[keep], _index(y, keep))

    def loss(m: nn.Module, b: Batch) -> torch.Tensor:
        return criterion(m(b[0]), b[1])

    def evaluate(m: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        with _eval_mode(m):
            for part, (x, y) in fixed.items():
                pred = m(x)
                out[f"{part}_loss"] = _float(criterion(pred, y))
                if part != "train":
                    out[f"{part}_metric"] = _float(metric(pred, y))
            if extras is not None:
                out.update(extras(m, fixed))
        return out

    first = first_layer if first_layer is not None else next(c for c in model.modules() if not list(c.children()))
    return TaskRun(
        name=task.name, kind=task.kind, split=task.split, seed=seed, model=model,
        batches=_stream(x_tr, y_tr, batch, _seed(task.name, seed, "batches")), loss=loss, evaluate=evaluate,
        iterations=iterations, sgd_lr=sgd_lr, adam_lr=adam_lr, metric=metric_name,
        higher_is_better=higher_is_better, input_kind=input_kind, first_layer=first, weight_decay=weight_decay,
        info={"train_examples": len(x_tr), "val_examples": _length(fixed["val"][1]),
              "test_examples": _length(fixed["test"][1]), "batch": min(batch, len(x_tr)), **(info or {})},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------- data
_DATA = {"wine_zero": "wine", "diabetes_regression": "diabetes", "cnn_bn": "digits", "label_noise": "digits",
         "dropout_wd": "breast_cancer", "finetune": "digits", "autoencoder": "digits", "vit_digits": "digits"}


@functools.lru_cache(maxsize=None)
def _sklearn(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A scikit-learn *bundled* data set (shipped with the package, never downloaded), as float32/int64 tensors.
    Cached: callers index it (a copy) and never write into it."""
    import sklearn.datasets as ds

    d = getattr(ds, f"load_{name}")()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32 if name == "diabetes" else torch.int64)
    return x, y


def _standardise(x: torch.Tensor, train_idx: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    mu, sd = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(min_std)
    return (x - mu) / sd


def _mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


LM_MODULES = ("textwrap", "heapq", "functools", "dataclasses", "argparse")  # the LM's corpus: this Python's stdlib
LM_CHARS = 160_000


@functools.lru_cache(maxsize=None)
def _stdlib_text() -> str:
    """Source code shipped with this Python (so it differs between Python versions, never between runs)."""
    parts = []
    for mod in LM_MODULES:
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin is not None
        with open(spec.origin, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)[:LM_CHARS]


@functools.lru_cache(maxsize=None)
def _stdlib_ids() -> torch.Tensor:
    """The corpus as ids: printable ASCII 32..126 -> 1..95, newline -> 96, anything else -> 0. Cached: callers
    copy out of it and never write into it."""
    raw = torch.frombuffer(bytearray(_stdlib_text().encode("ascii", "replace")), dtype=torch.uint8).long()
    printable = (raw >= 32) & (raw <= 126)
    return torch.where(printable, raw - 31, torch.where(raw == 10, 96, 0))


# ------------------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    """A pre-norm Transformer block (causal or not) with PyTorch's scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, causal: bool, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, causal=True) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        return self.head(self.ln(self.blocks(h)))


class ViT(nn.Module):
    """A tiny Vision Transformer: 2x2 patches of an 8x8 image, a class token, learned positions."""

    def __init__(self, d: int, heads: int, layers: int, patch: int = 2, side: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.patch, self.side = patch, side
        n = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(n + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, causal=False) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, s = len(x), self.patch, self.side
        patches = x.view(b, s // p, p, s // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1) + self.pos
        return self.head(self.ln(self.blocks(h))[:, 0])


class GRUForecaster(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out[:, -1]).squeeze(-1)


class MatrixFactorisation(nn.Module):
    """rating(u, i) = <U_u, V_i> + b_u + b_i + b."""

    def __init__(self, users: int, items: int, rank: int) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, rank), nn.Embedding(items, rank)
        self.user_bias, self.item_bias = nn.Embedding(users, 1), nn.Embedding(items, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)
        for e in (self.user_bias, self.item_bias):
            nn.init.zeros_(e.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        u, i = ids[:, 0], ids[:, 1]
        dot = (self.user(u) * self.item(i)).sum(-1)
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.bias


class NeuralRecommender(nn.Module):
    """Neural collaborative filtering: user and item embeddings, concatenated, through an MLP to a click logit."""

    def __init__(self, users: int, items: int, d: int, hidden: int) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, d), nn.Embedding(items, d)
        self.mlp = _mlp([2 * d, hidden, hidden, 1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.user(ids[:, 0]), self.item(ids[:, 1])], -1)).squeeze(-1)


class MultiTask(nn.Module):
    """A shared trunk with a classification head and a regression head."""

    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.cls, self.reg = nn.Linear(hidden, classes), nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.reg(h).squeeze(-1)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


# ------------------------------------------------------------------------------------------------------- tasks
def _tabular(name: str, standardise: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    x, y = _sklearn(name)
    n = len(x)
    parts = _split(n, n // 5, n // 5, name)
    if standardise:
        x = _standardise(x, parts[0])
    return x, y, parts


def _parts(x: torch.Tensor, y: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> dict[str, tuple[torch.Tensor, Any]]:
    return {k: (x[i], y[i]) for k, i in zip(("train", "val", "test"), parts)}


@task("wine_zero", "tabular classification, near-zero training loss", "tune",
      "sklearn wine (178 x 13, 3 classes), standardised", "MLP 13-64-64-3")  # fmt: skip
def _wine(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("wine")
    return _supervised(t, seed, scale, model=_mlp([13, 64, 64, 3]), data=_parts(x, y, parts), criterion=F.cross_entropy,
                       metric=accuracy, metric_name="accuracy", higher_is_better=True, batch=32,
                       iterations=_iters(300, scale), sgd_lr=0.1, adam_lr=0.03)  # fmt: skip


@task("diabetes_regression", "regression (MSE)", "tune",
      "sklearn diabetes (442 x 10), standardised target", "MLP 10-32-32-1")  # fmt: skip
def _diabetes(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("diabetes")
    y = (y - y[parts[0]].mean()) / y[parts[0]].std()
    return _supervised(t, seed, scale, model=_mlp([10, 32, 32, 1]), data=_parts(x, y, parts), criterion=mse, metric=r2,
                       metric_name="r2", higher_is_better=True, batch=32, iterations=_iters(300, scale),
                       sgd_lr=0.001, adam_lr=0.0003)  # fmt: skip


@task("transformer_lm", "Transformer language model (next character)", "tune",
      f"this Python's stdlib source ({', '.join(LM_MODULES)}), first {LM_CHARS // 1000}k chars",
      "causal Transformer, 2 blocks, d=32, 4 heads, context 32")  # fmt: skip
def _lm(t: Task, seed: int, scale: float) -> TaskRun:
    ids = _stdlib_ids()
    ctx, stride = 32, 32
    starts = torch.arange(0, len(ids) - ctx - 1, stride)
    windows = torch.stack([ids[s : s + ctx + 1] for s in starts.tolist()])
    n = len(windows)  # consecutive blocks: train on the first 80%, validate/test on the next 10% each
    tr, va, te = torch.arange(0, int(0.8 * n)), torch.arange(int(0.8 * n), int(0.9 * n)), torch.arange(int(0.9 * n), n)
    if scale < 1:
        tr = tr[: max(64, int(len(tr) * scale))]
    data = {k: (windows[i, :-1], windows[i, 1:]) for k, i in (("train", tr), ("val", va), ("test", te))}
    model = CharLM(97, 32, 4, 2, ctx)

    def criterion(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))

    return _supervised(t, seed, scale, model=model, data=data, criterion=criterion, metric=accuracy,
                       metric_name="next-char accuracy", higher_is_better=True, batch=16,
                       iterations=_iters(300, scale), sgd_lr=0.3, adam_lr=0.01, input_kind="tokens",
                       first_layer=model.tok, train_eval=128)  # fmt: skip


@task("cnn_bn", "CNN with BatchNorm (image classification)", "tune",
      "sklearn digits (1797 8x8 images, 10 classes)", "2 conv+BatchNorm+ReLU, max-pool, linear")  # fmt: skip
def _cnn(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("digits", standardise=False)
    return _supervised(t, seed, scale, model=CNN(), data=_parts(x / 16.0, y, parts), criterion=F.cross_entropy,
                       metric=accuracy, metric_name="accuracy", higher_is_better=True, batch=32,
                       iterations=_iters(400, scale), sgd_lr=0.03, adam_lr=0.01)  # fmt: skip


@task("illcond_lstsq", "ill-conditioned convex (least squares, Hessian condition number 1e4)", "tune",
      "synthetic: 1024 x 32 Gaussian, rotated spectrum 1..1e-4, noise 0.1", "linear 32-1")  # fmt: skip
def _illcond(t: Task, seed: int, scale: float) -> TaskRun:
    d, n = 32, 1024 + 512 + 512
    g = _gen(t.name, "data")
    eig = torch.logspace(0, -4, d, dtype=torch.float64)  # eigenvalues of E[x x^T]: condition number 1e4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))  # rotated: not axis-aligned
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * eig.sqrt()) @ q.T
    # every eigen-direction carries the same share of y's variance, so the slow ones matter to the loss
    w = q @ (torch.randn(d, generator=g, dtype=torch.float64) / (eig * d).sqrt())
    y = x @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float()
    parts = (torch.arange(0, 1024), torch.arange(1024, 1536), torch.arange(1536, n))
    data = _parts(x, y, parts)
    x_tr, y_tr = data["train"]
    x1 = torch.cat([x_tr.double(), torch.ones(len(x_tr), 1, dtype=torch.float64)], 1)
    # normal equations in float64 (cond ~1e8: ample precision); lstsq's LAPACK path differed in the last bit between
    # processes, Cholesky on this 33x33 matrix does not
    sol = torch.cholesky_solve(x1.T @ y_tr.double().unsqueeze(1), torch.linalg.cholesky(x1.T @ x1))
    best = float((x1 @ sol).squeeze(1).sub(y_tr.double()).square().mean())  # the least-squares optimum's train MSE
    cond = float(torch.linalg.cond(x_tr.double().T @ x_tr.double()))

    def extras(m: nn.Module, fixed: dict[str, tuple[torch.Tensor, Any]]) -> dict[str, float]:
        full = float(mse(m(x_tr), y_tr))
        return {"train_excess": full - best}  # distance to the least-squares optimum: where conditioning bites

    return _supervised(t, seed, scale, model=nn.Linear(d, 1), data=data, criterion=mse, metric=mse, metric_name="mse",
                       higher_is_better=False, batch=32, iterations=_iters(400, scale), sgd_lr=0.1, adam_lr=0.1,
                       extras=extras, info={"condition_number": cond, "optimal_train_mse": best})  # fmt: skip


@task("label_noise", "heavy label noise (40% of training labels flipped)", "tune",
      "sklearn digits, 40% of train labels replaced by another class; clean val/test", "MLP 64-128-128-10")  # fmt: skip
def _label_noise(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("digits", standardise=False)
    data = _parts(x / 16.0, y, parts)
    x_tr, y_tr = data["train"]
    g = _gen(t.name, "noise")
    flip = torch.rand(len(y_tr), generator=g) < 0.4
    other = (y_tr + torch.randint(1, 10, y_tr.shape, generator=g)) % 10  # a different class, uniformly
    data["train"] = (x_tr, torch.where(flip, other, y_tr))
    return _supervised(t, seed, scale, model=_mlp([64, 128, 128, 10]), data=data, criterion=F.cross_entropy,
                       metric=accuracy, metric_name="accuracy (clean labels)", higher_is_better=True, batch=32,
                       iterations=_iters(500, scale), sgd_lr=0.03, adam_lr=0.001,
                       info={"flipped": float(flip.float().mean())})  # fmt: skip


@task("recommender", "embedding recommendation model (implicit feedback, BCE)", "tune",
      "synthetic: 100 users x 80 items, click logit = user + item bias + rank-4 affinity, 12k clicks",
      "NCF: 2 embeddings (16) + MLP 32-64-64-1")  # fmt: skip
def _recommender(t: Task, seed: int, scale: float) -> TaskRun:
    users, items, rank, obs = 100, 80, 4, max(4000, int(12000 * scale))
    g = _gen(t.name, "data")
    pu, pi = torch.randn(users, rank, generator=g), torch.randn(items, rank, generator=g)
    bu, bi = torch.randn(users, generator=g), torch.randn(items, generator=g)  # popularity: learnt first
    ids = torch.stack([torch.randint(0, users, (obs + 4000,), generator=g),
                       torch.randint(0, items, (obs + 4000,), generator=g)], 1)  # fmt: skip
    logit = bu[ids[:, 0]] + bi[ids[:, 1]] + (pu[ids[:, 0]] * pi[ids[:, 1]]).sum(-1) * 2 / math.sqrt(rank)
    click = (torch.rand(len(logit), generator=g) < torch.sigmoid(logit)).float()
    bayes = float(((logit > 0).float() == click)[obs + 2000 :].double().mean())  # the best possible test accuracy
    parts = (torch.arange(0, obs), torch.arange(obs, obs + 2000), torch.arange(obs + 2000, obs + 4000))
    model = NeuralRecommender(users, items, 16, 64)

    def acc(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((pred > 0).float() == y).double().mean()

    return _supervised(t, seed, scale, model=model, data=_parts(ids, click, parts),
                       criterion=F.binary_cross_entropy_with_logits, metric=acc, metric_name="accuracy",
                       higher_is_better=True, batch=128, iterations=_iters(400, scale), sgd_lr=0.3, adam_lr=0.03,
                       input_kind="tokens", first_layer=model.user, info={"bayes_test_accuracy": bayes})  # fmt: skip


@task("dropout_wd", "dropout + weight decay (small tabular data)", "report",
      "sklearn breast_cancer (569 x 30, 2 classes), standardised",
      "MLP 30-256-256-2, dropout 0.5, weight decay 1e-3")  # fmt: skip
def _dropout_wd(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("breast_cancer")
    return _supervised(t, seed, scale, model=_mlp([30, 256, 256, 2], dropout=0.5), data=_parts(x, y, parts),
                       criterion=F.cross_entropy, metric=accuracy, metric_name="accuracy", higher_is_better=True,
                       batch=32, iterations=_iters(300, scale), sgd_lr=0.01, adam_lr=0.0003,
                       weight_decay=1e-3)  # fmt: skip


@task("gru_forecast", "RNN (GRU) time-series forecasting", "report",
      "synthetic: 3 random sinusoids + noise, window 16 -> next value", "GRU(1, 32) + linear")  # fmt: skip
def _gru(t: Task, seed: int, scale: float) -> TaskRun:
    n, win = max(1024, int(3072 * scale)) + 1024, 16
    g = _gen(t.name, "data")
    freq = torch.rand(n, 3, 1, generator=g) * 0.4 + 0.05
    phase = torch.rand(n, 3, 1, generator=g) * 2 * math.pi
    amp = torch.rand(n, 3, 1, generator=g) + 0.2
    tt = torch.arange(win + 1, dtype=torch.float32)
    series = (amp * torch.sin(freq * tt + phase)).sum(1) / 2 + 0.05 * torch.randn(n, win + 1, generator=g)
    x, y = series[:, :win], series[:, win]
    parts = (torch.arange(0, n - 1024), torch.arange(n - 1024, n - 512), torch.arange(n - 512, n))
    return _supervised(t, seed, scale, model=GRUForecaster(32), data=_parts(x, y, parts), criterion=mse, metric=r2,
                       metric_name="r2", higher_is_better=True, batch=32, iterations=_iters(400, scale),
                       sgd_lr=0.3, adam_lr=0.03)  # fmt: skip


@task("matrix_factorisation", "matrix factorisation (explicit ratings, MSE)", "report",
      "synthetic: 300 x 200 rank-5 matrix + noise 0.1, 15k observed entries",
      "embeddings of rank 10 + biases")  # fmt: skip
def _mf(t: Task, seed: int, scale: float) -> TaskRun:
    users, items = 300, 200
    g = _gen(t.name, "data")
    truth = torch.randn(users, 5, generator=g) @ torch.randn(5, items, generator=g) / math.sqrt(5)
    obs = torch.randperm(users * items, generator=g)[: max(3000, int(15000 * scale)) + 3000]
    ids = torch.stack([obs // items, obs % items], 1)
    r = truth[ids[:, 0], ids[:, 1]] + 0.1 * torch.randn(len(obs), generator=g)
    n = len(obs)
    parts = (torch.arange(0, n - 3000), torch.arange(n - 3000, n - 1500), torch.arange(n - 1500, n))
    model = MatrixFactorisation(users, items, 10)
    return _supervised(t, seed, scale, model=model, data=_parts(ids, r, parts), criterion=mse, metric=rmse,
                       metric_name="rmse", higher_is_better=False, batch=128, iterations=_iters(500, scale),
                       sgd_lr=1.0, adam_lr=0.01, input_kind="tokens", first_layer=model.user)  # fmt: skip


_PRETRAIN_CLASSES = 5


@task("finetune", "fine-tuning (pre-train on digits 0-4, fine-tune on few examples of 5-9)", "report",
      "sklearn digits: pre-train on all of 0-4, fine-tune on 150 of 5-9",
      "MLP 64-128-128-128 backbone + new head")  # fmt: skip
def _finetune(t: Task, seed: int, scale: float) -> TaskRun:
    x, y = _sklearn("digits")
    x = x / 16.0
    pre, post = (y < _PRETRAIN_CLASSES).nonzero().squeeze(1), (y >= _PRETRAIN_CLASSES).nonzero().squeeze(1)
    # pre-training: part of building the task (deterministic from the seed; global RNG is forked by Task.make)
    backbone = _mlp([64, 128, 128, 128])
    head = nn.Linear(128, _PRETRAIN_CLASSES)
    net = nn.Sequential(backbone, nn.ReLU(), head)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    stream = _stream(x[pre], y[pre], 64, _seed(t.name, seed, "pretrain"))()
    for _ in range(_iters(200, scale)):
        xb, yb = next(stream)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    for p in backbone.parameters():
        p.grad = None
    model = nn.Sequential(backbone, nn.ReLU(), nn.Linear(128, 10 - _PRETRAIN_CLASSES))
    perm = post[torch.randperm(len(post), generator=_gen(t.name, "split"))]
    parts = (perm[:150], perm[150:400], perm[400:])
    return _supervised(t, seed, scale, model=model, data=_parts(x, y - _PRETRAIN_CLASSES, parts),
                       criterion=F.cross_entropy,
                       metric=accuracy, metric_name="accuracy", higher_is_better=True, batch=32,
                       iterations=_iters(300, scale), sgd_lr=0.1, adam_lr=0.003,
                       info={"pretrain_examples": len(pre)})  # fmt: skip


@task("autoencoder", "autoencoder (reconstruction, MSE)", "report",
      "sklearn digits pixels / 16", "MLP 64-64-8-64-64 (ReLU)")  # fmt: skip
def _autoencoder(t: Task, seed: int, scale: float) -> TaskRun:
    x, _, parts = _tabular("digits", standardise=False)
    x = x / 16.0
    data = {k: (x[i], x[i]) for k, i in zip(("train", "val", "test"), parts)}
    return _supervised(t, seed, scale, model=_mlp([64, 64, 8, 64, 64]), data=data, criterion=mse, metric=mse,
                       metric_name="mse", higher_is_better=False, batch=64, iterations=_iters(400, scale),
                       sgd_lr=3.0, adam_lr=0.01)  # fmt: skip


@task("vit_digits", "tiny Vision Transformer", "report",
      "sklearn digits, pixels standardised (8x8 -> 16 patches of 2x2)",
      "ViT: d=32, 2 blocks, 4 heads, class token")  # fmt: skip
def _vit(t: Task, seed: int, scale: float) -> TaskRun:
    x, y, parts = _tabular("digits", standardise=False)
    x = _standardise(x / 16.0, parts[0], min_std=0.1)  # unit-scale patches: SGD does not train it on raw pixels
    model = ViT(32, 4, 2)
    return _supervised(t, seed, scale, model=model, data=_parts(x, y, parts), criterion=F.cross_entropy,
                       metric=accuracy, metric_name="accuracy", higher_is_better=True, batch=16,
                       iterations=_iters(300, scale), sgd_lr=0.01, adam_lr=0.003, first_layer=model.embed)  # fmt: skip


@task("multitask", "multi-task (shared trunk: 4-class classification + regression heads)", "report",
      "synthetic: 16-d Gaussian; argmax of a noisy linear map; sin of a projection + noise",
      "MLP trunk 16-64-64, 2 heads")  # fmt: skip
def _multitask(t: Task, seed: int, scale: float) -> TaskRun:
    n, d = max(512, int(2048 * scale)) + 1024, 16
    g = _gen(t.name, "data")
    x = torch.randn(n, d, generator=g)
    cls = (x @ torch.randn(d, 4, generator=g) + 0.5 * torch.randn(n, 4, generator=g)).argmax(1)
    reg = torch.sin(x @ torch.randn(d, generator=g) / 2) + 0.1 * torch.randn(n, generator=g)
    parts = (torch.arange(0, n - 1024), torch.arange(n - 1024, n - 512), torch.arange(n - 512, n))
    data = {k: (x[i], (cls[i], reg[i])) for k, i in zip(("train", "val", "test"), parts)}

    def criterion(pred: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(pred[0], y[0]) + F.mse_loss(pred[1], y[1])

    def metric(pred: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return accuracy(pred[0], y[0])

    def extras(m: nn.Module, fixed: dict[str, tuple[torch.Tensor, Any]]) -> dict[str, float]:
        xv, yv = fixed["val"]
        xt, yt = fixed["test"]
        return {"val_r2": _float(r2(m(xv)[1], yv[1])), "test_r2": _float(r2(m(xt)[1], yt[1]))}

    return _supervised(t, seed, scale, model=MultiTask(d, 64, 4), data=data, criterion=criterion, metric=metric,
                       metric_name="accuracy (class head)", higher_is_better=True, batch=64,
                       iterations=_iters(400, scale), sgd_lr=0.01, adam_lr=0.001, extras=extras)  # fmt: skip
