"""A minimal, reusable training loop for the suite, and a parallel runner for configs x tasks x seeds.

``train(run, make_optimizer, step=..., faults=...)`` trains one :class:`~benchmarks.suite.tasks.TaskRun` and
returns a :class:`Result` (per-iteration losses and lrs, forward/backward counts, wall time, the exception if one
was raised, ``evaluate()`` before and after). ``step`` replaces ``optimizer.step()``: a factory
``step(run, optimizer) -> Step`` builds, once per run, either

* ``Step(after_backward=fn)``: the runner does ``zero_grad``, forward, ``backward``, then calls ``fn(loss)``
  (a guard's ``guard.step(loss)``, clipping + ``opt.step()``, ...), or
* ``Step(closure=fn)``: the runner calls ``fn(loss_fn)`` with ``loss_fn()`` = the forward of the current batch, and
  ``fn`` does the rest (a line search's ``ls.step(loss_fn)``: backward, step, trial forwards, undo).

Example::

    from benchmarks.suite import runner, tasks
    from torchrewind import Rewind, SpikeGuard

    def guarded(run, opt):
        guard = SpikeGuard(Rewind(run.model, opt, capacity=8))
        return runner.Step(after_backward=guard.step, wrap=guard.wrap, info=guard.log.counts)

    res = runner.train(tasks.make("wine_zero", 0), runner.adam(), step=guarded, faults="mixed")
    print(res.final["val_metric"], res.step_info)

``run_many(configs, tasks, seeds)`` runs every combination in worker processes (2 by default, one torch thread
each) and returns plain, JSON-serialisable dicts; with ``cache="study.json"`` finished runs are kept in that file
and not run again.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tasks as _tasks
from .faults import FaultPlan, Injector, resolve
from .tasks import TaskRun

OptimizerFactory = Callable[[TaskRun], torch.optim.Optimizer]


@dataclass
class Step:
    """What one iteration does instead of ``optimizer.step()``: exactly one of ``after_backward`` (called with the
    loss after the runner's ``zero_grad``, forward and backward) or ``closure`` (called with ``loss_fn``, the forward
    of the iteration's batch; it does ``zero_grad``, backward and stepping itself). ``wrap`` (optional) wraps the
    batch iterator (a guard's ``wrap``, so it can skip batches); ``before`` (optional) runs at the top of every
    iteration, after the batch is drawn and before any forward (e.g. ``rw.snapshot()``, so an undo also takes back
    the forward's BatchNorm statistics and RNG draws); ``info`` (optional) returns JSON-able statistics recorded in
    :attr:`Result.step_info`; ``close`` (optional) runs after training.

    Example::

        Step(after_backward=lambda loss: opt.step())          # plain training (the default)
        Step(closure=LineSearch(Rewind(model, opt)).step)     # a line search does its own backward
    """

    after_backward: Callable[[torch.Tensor], Any] | None = None
    closure: Callable[[Callable[[], torch.Tensor]], Any] | None = None
    wrap: Callable[[Iterator[Any]], Iterator[Any]] | None = None
    before: Callable[[], Any] | None = None
    info: Callable[[], dict[str, Any]] | None = None
    close: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if (self.after_backward is None) == (self.closure is None):
            raise ValueError("Step needs exactly one of after_backward=fn(loss) or closure=fn(loss_fn)")


StepFactory = Callable[[TaskRun, torch.optim.Optimizer], Step]


def plain_step(run: TaskRun, optimizer: torch.optim.Optimizer) -> Step:
    """The default step factory: plain ``optimizer.step()``.

    Example::

        train(run, adam(), step=plain_step)          # the same as step=None
    """
    return Step(after_backward=lambda loss: optimizer.step())


# ------------------------------------------------------------------------------------------------------- optimizers
def _make_optimizer(cls_name: str, lr: float | None, lr_scale: float, kwargs: tuple[tuple[str, Any], ...],
                    run: TaskRun) -> torch.optim.Optimizer:  # fmt: skip
    cls = getattr(torch.optim, cls_name)
    default = {"SGD": run.sgd_lr}.get(cls_name, run.adam_lr)
    kw = dict(kwargs)
    kw.setdefault("weight_decay", run.weight_decay)
    return cls(run.model.parameters(), lr=(default if lr is None else lr) * lr_scale, **kw)


def optimizer(cls_name: str, lr: float | None = None, *, lr_scale: float = 1.0, **kwargs: Any) -> OptimizerFactory:
    """A picklable factory ``run -> torch.optim.<cls_name>(run.model.parameters(), lr=..., weight_decay=...)``:
    ``lr`` defaults to the task's suggestion (``run.sgd_lr`` for SGD, ``run.adam_lr`` otherwise) and is multiplied
    by ``lr_scale``; ``weight_decay`` defaults to the task's.

    Example::

        optimizer("RMSprop", lr=1e-3, alpha=0.9)
    """
    if not hasattr(torch.optim, cls_name):
        raise ValueError(f"torch.optim has no {cls_name!r}")
    return functools.partial(_make_optimizer, cls_name, lr, lr_scale, tuple(sorted(kwargs.items())))


def adam(lr: float | None = None, *, lr_scale: float = 1.0, **kwargs: Any) -> OptimizerFactory:
    """Adam at the task's suggested lr (or ``lr``) times ``lr_scale``. Example: ``adam(lr_scale=10)``."""
    return optimizer("Adam", lr, lr_scale=lr_scale, **kwargs)


def sgd(lr: float | None = None, *, lr_scale: float = 1.0, momentum: float = 0.9, **kwargs: Any) -> OptimizerFactory:
    """SGD with momentum 0.9 at the task's suggested lr (or ``lr``) times ``lr_scale``. Example: ``sgd(lr=0.1)``."""
    return optimizer("SGD", lr, lr_scale=lr_scale, momentum=momentum, **kwargs)


# ------------------------------------------------------------------------------------------------------- policies
def _policy_step(kind: str, capacity: int, kwargs: tuple[tuple[str, Any], ...], run: TaskRun,
                 opt: torch.optim.Optimizer) -> Step:  # fmt: skip
    import torchrewind as tr

    rw = tr.Rewind(run.model, opt, capacity=capacity)
    policy = getattr(tr, kind)(rw, **dict(kwargs))
    if kind in ("LineSearch", "BoldDriver"):
        return Step(closure=policy.step, info=lambda: policy.stats)
    def info() -> dict[str, Any]:
        events = [(e.iteration, e.kind) for e in policy.log.events if e.kind != "accepted"]
        return {**policy.log.counts(), "iterations": policy.iteration, "steps": policy.steps, "events": events}

    return Step(after_backward=policy.step, wrap=policy.wrap, info=info)


def policy(kind: str, *, capacity: int = 1, **kwargs: Any) -> StepFactory:
    """A picklable step factory for a torchrewind policy (``"SpikeGuard"``, ``"NonFiniteGuard"``, ``"LineSearch"``,
    ``"BoldDriver"``) on a ``Rewind(model, opt, capacity=capacity)``, built with ``kwargs``. Its ``info`` has the
    policy's counts (and, for guards, the iterations of every non-accepted decision).

    Example::

        train(run, adam(), step=policy("SpikeGuard", capacity=8, skip_batches=4), faults="mixed")
    """
    if kind not in ("SpikeGuard", "NonFiniteGuard", "LineSearch", "BoldDriver"):
        raise ValueError(f"unknown policy {kind!r}")
    return functools.partial(_policy_step, kind, capacity, tuple(sorted(kwargs.items())))


# ------------------------------------------------------------------------------------------------------- train
@dataclass
class Result:
    """One training run. ``losses[i]``: the loss of iteration i's batch before its step (the first forward of the
    iteration); ``lrs[i]``: group 0's lr after iteration i; ``batch_index[i]``: the stream position of iteration
    i's batch (batch faults are keyed by it; it runs ahead of i once a guard skips batches);
    ``forwards``/``backwards``: passes run by the loop and the step (evaluation not counted); ``wall_s``: the
    training loop's wall time; ``initial``/``final``: ``evaluate()`` before and after; ``error``: the exception
    that stopped training (type, message, iteration, traceback), else None.

    Example::

        res = train(tasks.make("autoencoder", 0), adam(), faults="drift")
        json.dumps(res.to_dict())                     # plain data: lists, dicts, floats, strings
    """

    task: str
    kind: str
    split: str
    seed: int
    iterations: int
    completed: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    batch_index: list[int] = field(default_factory=list)
    forwards: int = 0
    backwards: int = 0
    wall_s: float = 0.0
    eval_s: float = 0.0
    initial: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    step_info: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)
    metric: str = ""
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def _error(i: int, e: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"iteration": i, "type": type(e).__name__, "message": str(e)[:2000], "traceback": tb[-4000:]}


def train(
    run: TaskRun,
    make_optimizer: OptimizerFactory,
    *,
    step: StepFactory | None = None,
    faults: FaultPlan | str | None = None,
    iterations: int | None = None,
    eval_every: int | None = None,
    max_seconds: float | None = None,
) -> Result:
    """Train ``run.model`` for ``iterations`` (default ``run.iterations``) iterations; see the module docstring.

    ``faults``: a :class:`FaultPlan` or a standard plan's name (positions jittered from ``run.seed``).
    ``eval_every``: also ``evaluate()`` every that many iterations (into ``Result.evals``). ``max_seconds``: stop
    (recorded as an error of type ``Timeout``) when the loop has run that long. An exception in any iteration is
    caught and recorded; training stops there and the model is still evaluated. torch's global generator is seeded
    from ``run.train_seed`` for the run and restored afterwards, so results do not depend on what ran before.

    Example::

        res = train(tasks.make("cnn_bn", 0), sgd(), faults="scale")
        print(res.losses[-1], res.final)
    """
    n = run.iterations if iterations is None else int(iterations)
    plan = resolve(faults, n, run.seed)
    res = Result(run.name, run.kind, run.split, run.seed, n, faults=plan.to_dict(), metric=run.metric,
                 higher_is_better=run.higher_is_better)  # fmt: skip
    model = run.model
    t_eval = time.perf_counter()
    res.initial = run.evaluate(model)
    res.eval_s = time.perf_counter() - t_eval
    injector = Injector(run, plan)
    stepper: Step | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train_seed)
        counts = {"forward": 0, "backward": 0}

        def count_backward(grad: torch.Tensor) -> None:
            counts["backward"] += 1

        t0 = time.perf_counter()
        i = -1
        try:
            opt = make_optimizer(run)
            stepper = (step or plain_step)(run, opt)
            stream: Iterator[Any] = injector.batches(run.batches())
            if stepper.wrap is not None:
                stream = iter(stepper.wrap(stream))
            for i in range(n):
                batch = next(stream)
                first: list[torch.Tensor] = []

                def loss_fn() -> torch.Tensor:
                    loss = run.loss(model, batch)
                    counts["forward"] += 1
                    if loss.requires_grad:
                        loss.register_hook(count_backward)
                    if not first:
                        first.append(loss.detach())
                    return loss

                with injector.step(i, opt):
                    if stepper.before is not None:
                        stepper.before()
                    if stepper.closure is not None:
                        stepper.closure(loss_fn)
                    else:
                        opt.zero_grad(set_to_none=True)
                        loss = loss_fn()
                        loss.backward()
                        stepper.after_backward(loss)  # type: ignore[misc]
                        del loss
                res.losses.append(float(first[0].item()) if first else math.nan)
                res.lrs.append(float(opt.param_groups[0]["lr"]))
                res.batch_index.append(injector.position)
                res.completed = i + 1
                if eval_every and (i + 1) % eval_every == 0 and i + 1 < n:
                    res.wall_s += time.perf_counter() - t0
                    t_eval = time.perf_counter()
                    res.evals.append((i + 1, run.evaluate(model)))
                    res.eval_s += time.perf_counter() - t_eval
                    t0 = time.perf_counter()
                if max_seconds is not None and res.wall_s + time.perf_counter() - t0 > max_seconds:
                    if i + 1 < n:
                        res.error = {"iteration": i, "type": "Timeout", "message": f"stopped after {max_seconds} s",
                                     "traceback": ""}  # fmt: skip
                    break
        except Exception as e:  # noqa: BLE001 - a study must survive any failure of a config
            res.error = _error(i, e)
        finally:
            res.wall_s += time.perf_counter() - t0
            res.forwards, res.backwards = counts["forward"], counts["backward"]
            injector.close()
        if stepper is not None:
            for what, fn in (("step_info", stepper.info), ("close", stepper.close)):
                if fn is None:
                    continue
                try:
                    out = fn()
                    if what == "step_info":
                        res.step_info = dict(out)
                except Exception as e:  # noqa: BLE001
                    res.step_info[f"{what}_error"] = f"{type(e).__name__}: {e}"
    t_eval = time.perf_counter()
    try:
        res.final = run.evaluate(model)
    except Exception as e:  # noqa: BLE001
        res.final = {}
        res.error = res.error or _error(n, e)
    res.eval_s += time.perf_counter() - t_eval
    return res


# ------------------------------------------------------------------------------------------------------- run_many
@dataclass(frozen=True)
class Config:
    """One way to train: an optimizer factory, a step factory (None: plain ``optimizer.step()``), a fault plan
    (a standard plan's name, a FaultPlan, or None) and an optional iteration count (default: the task's).

    Example::

        Config("adam+guard", adam(), policy("SpikeGuard", capacity=8), faults="mixed")
    """

    name: str
    optimizer: OptimizerFactory
    step: StepFactory | None = None
    faults: FaultPlan | str | None = None
    iterations: int | None = None


def job_key(config: Config, task: str, seed: int, scale: float) -> str:
    """The cache key of one run (a config is identified by its name: rename it when you change it).

    Example::

        job_key(Config("adam", adam()), "cnn_bn", 0, 1.0)     # 'adam|cnn_bn|0|scale=1'
    """
    return f"{config.name}|{task}|{seed}|scale={scale:g}"


_REFERENCE: list[Callable[[], None]] = []  # this process's reference iteration, built on first use


def reference_ms(iterations: int = 50) -> float:
    """Wall ms of one training iteration of a fixed reference model (the digits MLP of ``bench_core.py``:
    64-256-256-10, Adam, batch 64), median of 5 blocks. Timing a run against it, measured right after the run in
    the same process, gives a cost that survives machine load (1.9 ms on an idle core of the 2-core CI box).

    Example::

        per_iteration = res.wall_s / res.completed * 1e3 / reference_ms()
    """
    if not _REFERENCE:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10))  # fmt: skip
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

        for _ in range(20):
            step()
        _REFERENCE.append(step)
    step = _REFERENCE[0]
    block = max(1, iterations // 5)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        times.append((time.perf_counter() - t0) / block * 1e3)
    return sorted(times)[2]


def _run_job(config: Config, task: str, seed: int, scale: float, eval_every: int | None,
             max_seconds: float | None, reference: int = 0) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    try:
        run = _tasks.make(task, seed, scale)
        iters = None if config.iterations is None else max(10, int(round(config.iterations * scale)))
        out = train(run, config.optimizer, step=config.step, faults=config.faults, iterations=iters,
                    eval_every=eval_every, max_seconds=max_seconds).to_dict()  # fmt: skip
    except Exception as e:  # noqa: BLE001 - building the task or the config failed
        out = {"task": task, "seed": seed, "error": _error(-1, e), "final": {}, "losses": []}
    out.update(config=config.name, scale=scale, key=job_key(config, task, seed, scale),
               total_s=time.perf_counter() - t0)  # fmt: skip
    if reference:
        out["reference_ms"] = reference_ms(reference)
    return out


_JOBS: list[tuple[Any, ...]] = []  # set before forking: workers read their job by index (configs need no pickling)


def _init_worker(threads: int, flush_denormal: bool) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)


def _run_index(i: int) -> tuple[int, dict[str, Any]]:
    return i, _run_job(*_JOBS[i])


def _run_payload(i: int, job: tuple[Any, ...]) -> tuple[int, dict[str, Any]]:
    return i, _run_job(*job)


def _load(cache: Path) -> dict[str, dict[str, Any]]:
    if not cache.exists():
        return {}
    return {r["key"]: r for r in json.loads(cache.read_text())["results"]}


def _save(cache: Path, results: dict[str, dict[str, Any]]) -> None:
    tmp = cache.with_suffix(cache.suffix + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "results": list(results.values())}))
    os.replace(tmp, cache)  # atomic: an interrupted study never leaves a broken cache


def run_many(
    configs: Sequence[Config],
    tasks: Iterable[str] | None = None,
    seeds: Iterable[int] = (0, 1, 2),
    *,
    workers: int = 2,
    scale: float = 1.0,
    cache: str | Path | None = None,
    eval_every: int | None = None,
    max_seconds: float | None = None,
    threads: int = 1,
    flush_denormal: bool = True,
    progress: bool = True,
    reference: int = 0,
) -> list[dict[str, Any]]:
    """Run every config on every task (default: all) and seed, in ``workers`` processes (``0``: in this process),
    each with ``threads`` torch threads and denormals flushed to zero (Adam's tiny second moments are otherwise
    ~20x slower on x86; the setting changes results, so compare runs made the same way). Returns one dict per run
    (:meth:`Result.to_dict` plus ``config``, ``scale``, ``key``, ``total_s``), in config, task, seed order.
    ``cache``: a JSON file of finished runs, read first (runs already there are not repeated) and rewritten as
    runs finish. ``reference=n``: after each run, time ``n`` iterations of the :func:`reference_ms` model in the same
    worker (``reference_ms`` in its dict), so costs can be given as ratios that survive machine load.

    Example::

        results = run_many([Config("adam", adam()), Config("sgd", sgd())], seeds=range(5), cache="base.json")
    """
    configs = list(configs)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must be unique (they key the cache), got {names}")
    task_names = list(_tasks.TASKS) if tasks is None else list(tasks)
    for t in task_names:
        if t not in _tasks.TASKS:
            raise KeyError(f"unknown task {t!r}; tasks: {', '.join(_tasks.TASKS)}")
    jobs = [(c, t, int(s), float(scale), eval_every, max_seconds, reference)
            for c in configs for t in task_names for s in seeds]  # fmt: skip
    keys = [job_key(c, t, s, sc) for c, t, s, sc, *_ in jobs]
    path = Path(cache) if cache is not None else None
    done = _load(path) if path is not None else {}
    todo = [i for i, k in enumerate(keys) if k not in done]
    last_save = time.monotonic()

    def finished(i: int, r: dict[str, Any], n: int) -> None:
        nonlocal last_save
        done[keys[i]] = r
        if progress:
            err = f"  ERROR {r['error']['type']}" if r.get("error") else ""
            print(f"  [{n}/{len(todo)}] {r['config']} {r['task']} seed {r['seed']}: {r['total_s']:.1f}s{err}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if path is not None and time.monotonic() - last_save > 10:
            _save(path, done)
            last_save = time.monotonic()

    if workers <= 0:
        old = (torch.get_num_threads(), _flush_enabled())
        _init_worker(threads, flush_denormal)
        try:
            for n, i in enumerate(todo, 1):
                finished(i, _run_job(*jobs[i]), n)
        finally:
            _init_worker(*old)
    elif todo:
        global _JOBS
        if "fork" in mp.get_all_start_methods():  # workers inherit the jobs: lambdas and closures work
            _tasks.preload(task_names)  # and the data, read once here
            _JOBS = jobs
            ctx = mp.get_context("fork")
            with ctx.Pool(workers, _init_worker, (threads, flush_denormal), maxtasksperchild=None) as pool:
                for n, (i, r) in enumerate(pool.imap_unordered(_run_index, todo), 1):
                    finished(i, r, n)
            _JOBS = []
        else:  # spawn: configs must be picklable (use the optimizer()/policy() factories, module-level functions)
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, _init_worker, (threads, flush_denormal)) as pool:
                results = [pool.apply_async(_run_payload, (i, jobs[i])) for i in todo]
                for n, a in enumerate(results, 1):
                    finished(*a.get(), n)
    if path is not None:
        _save(path, done)
    return [done[k] for k in keys]


def _flush_enabled() -> bool:
    return (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0
