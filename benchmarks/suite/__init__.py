"""A suite of small, diverse, exactly reproducible training tasks for choosing and reporting policy defaults.

Modules: :mod:`~benchmarks.suite.tasks` (the tasks), :mod:`~benchmarks.suite.faults` (fault injection by
iteration), :mod:`~benchmarks.suite.stats` (mean/std/SE, win/tie/loss, markdown tables),
:mod:`~benchmarks.suite.runner` (a training loop with a pluggable step, and a parallel runner). See README.md.

Example::

    from benchmarks.suite import Config, adam, run_many, tasks
    results = run_many([Config("adam", adam())], tasks=tasks.names("tune"), seeds=range(3))
"""

from . import faults, runner, stats, tasks
from .faults import Fault, FaultPlan, Injector
from .runner import Config, Result, Step, adam, optimizer, policy, run_many, sgd, train
from .stats import compare, fmt, mean, sem, std, table
from .tasks import TASKS, Task, TaskRun, make, names

__all__ = [
    "TASKS", "Config", "Fault", "FaultPlan", "Injector", "Result", "Step", "Task", "TaskRun", "adam", "compare",
    "faults", "fmt", "make", "mean", "names", "optimizer", "policy", "run_many", "runner", "sem", "sgd", "stats",
    "std", "table", "tasks", "train",
]  # fmt: skip
