"""PyTorch Lightning integration: spike guard, non-finite guard and undo for ``trainer.fit()`` (automatic optimization).

Usage::

    cb = RewindCallback("spike", rollback=2, skip_batches=4)        # or RewindCallback("nonfinite")
    Trainer(callbacks=[cb], max_steps=1000).fit(model, loader)
    print(cb.log.counts(), cb.guard.rollbacks)                      # every decision is in cb.log

How it hooks into Lightning 2.x's loop (``loops/training_epoch_loop.py``, ``loops/optimization/automatic.py``,
``plugins/precision/precision.py``), per batch:

1. ``on_train_batch_start``: :meth:`Rewind.snapshot` at the first micro-batch of each optimizer step, before
   ``training_step``: an undone step also undoes its forward passes (BatchNorm statistics, dropout's RNG draws), and
   with gradient accumulation every micro-batch of the step.
2. ``optimizer.step(closure)``: the closure runs ``training_step``, ``zero_grad`` and backward, then the callbacks'
   ``on_before_optimizer_step`` (here: ``guard.before_step()``, which applies SpikeGuard's cool-down lr), then
   gradient clipping; then the real step. With a ``GradScaler`` (``16-mixed`` on GPU) the closure runs outside the
   step and the scaler may skip it (logged as ``skipped``).
3. Lightning steps the ``interval="step"`` LR schedulers (and, after the epoch's last batch, the ``"epoch"`` ones).
4. ``on_train_batch_end``: ``guard.after_step(loss)``, gradients still in ``.grad``. A step that should not have been
   applied is undone, and with it the scheduler steps of 3., so ``"step"`` schedules advance only with the steps that
   stand, exactly as ``if guard.step(loss): sched.step()`` in a plain loop (``tests/test_lightning.py`` checks it bit
   for bit). ``"epoch"`` schedulers stepped at the end of the epoch are stepped again after such an undo: the epoch
   ended whether or not its last step stood.

Semantics to know: ``trainer.global_step`` and ``max_steps`` count optimizer steps taken, undone ones included; the
data loader is not wrapped, so ``skip_batches`` means "the next N optimizer steps are computed but not applied"; with
``accumulate_grad_batches=N`` the judged loss is the sum of the N micro-batch losses as ``training_step`` returned them
divided by N (Lightning's normalisation), i.e. the loss whose gradient was applied, and "batches" in the guard's
options count optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone pytorch_lightning package has the same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "torchrewind.integrations.lightning needs PyTorch Lightning: pip install torchrewind[lightning]"
        ) from e

from ..errors import RewindError, RewindTypeError, RewindValueError
from ..policies import NonFiniteGuard, SpikeGuard
from ..rewind import Rewind
from ..trajectory import Trajectory
from ._common import check_guard_kwargs, check_rewind_args, history_capacity, init_state

__all__ = ["RewindCallback"]

GuardFactory = Callable[[Rewind], NonFiniteGuard]
_GUARDS: dict[str, type[NonFiniteGuard]] = {"spike": SpikeGuard, "nonfinite": NonFiniteGuard}
_OWN_REWIND_ARGS = ("model", "optimizer", "schedulers", "scaler", "capacity", "rng")


class RewindCallback(pl.Callback):
    """Guards every optimizer step of a Lightning ``Trainer`` (automatic optimization, one optimizer) with
    :class:`~torchrewind.SpikeGuard` or :class:`~torchrewind.NonFiniteGuard`, or just records each step for undo.

    Example::

        cb = RewindCallback("spike", rollback=2, skip_batches=4, lr_factor=0.5)
        Trainer(callbacks=[cb]).fit(model, loader)
        print(cb.log.counts())        # {'accepted': ..., 'rolled_back': ..., 'skipped': ...}

    Args:
        guard: ``"spike"`` (:class:`~torchrewind.SpikeGuard`), ``"nonfinite"`` (:class:`~torchrewind.NonFiniteGuard`),
            ``None`` (no guard: ``.rewind`` records every step, undo it from your own hooks), or a factory
            ``lambda rewind: SpikeGuard(rewind, rollback=2, ...)``.
        capacity: the Rewind's history (steps that can be undone). ``"spike"``: at least ``rollback + 1``, because the
            step just taken by Lightning occupies one slot (default ``rollback + 1``; with only ``capacity`` given,
            ``rollback = capacity - 1``). Otherwise default 1. Each slot is a copy of parameters, buffers and
            optimizer state.
        rng: passed to :class:`~torchrewind.Rewind` (``True``: an undo restores the torch RNGs, e.g. dropout's).
        log: the :class:`~torchrewind.Trajectory` to append decisions to (default: a new one, ``.log``).
        log_metrics: log ``rewind/rolled_back``, ``rewind/skipped``, ``rewind/undone`` (running totals) and, for
            SpikeGuard, ``rewind/lr_scale`` with ``pl_module.log`` at every optimizer step.
        rewind_kwargs: more :class:`~torchrewind.Rewind` options, e.g. ``{"storage": "host"}``.
        **guard_kwargs: the guard's options (``rollback``, ``skip_batches``, ``lr_factor``, ``cooldown``,
            ``detector``, ``max_consecutive``, ...); checked here, so a typo fails before training starts.

    Attributes: ``log`` (from the start); ``rewind`` and ``guard`` (built at ``on_train_start``, after any checkpoint
    was restored; their step hooks are removed at ``teardown``); ``last_step_stood``.
    """

    def __init__(
        self,
        guard: Union[str, GuardFactory, None] = "spike",
        capacity: int | None = None,
        *,
        rng: bool | str = True,
        log: Trajectory | None = None,
        log_metrics: bool = True,
        rewind_kwargs: dict[str, Any] | None = None,
        **guard_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if not (guard is None or guard in _GUARDS or (callable(guard) and not isinstance(guard, str))):
            raise RewindValueError(
                f"{name}: guard must be one of {sorted(_GUARDS)}, None, or a factory taking the Rewind and returning "
                f"a guard; got {guard!r}."
            )
        check_rewind_args(name, capacity, rewind_kwargs, _OWN_REWIND_ARGS)
        if not isinstance(guard, str) and guard_kwargs:
            raise RewindValueError(
                f"{name}: options {sorted(guard_kwargs)} need guard='spike' or 'nonfinite' (a factory builds its "
                "guard itself; guard=None has none)."
            )
        capacity = history_capacity(name, "Lightning", guard, capacity, guard_kwargs)
        if isinstance(guard, str):
            check_guard_kwargs(name, _GUARDS[guard], capacity, rng, guard_kwargs)
        self.guard_spec = guard
        self.log_metrics = log_metrics
        init_state(self, capacity, rng, log, rewind_kwargs, guard_kwargs)
        self.rewind: Rewind | None
        self.guard: NonFiniteGuard | None
        self._epoch_configs: list[Any] = []  # interval="epoch" scheduler configs that Lightning steps in the batch
        self._epoch_marks: list[tuple[Any, int]] = []
        self._window_open = False  # the first micro-batch of the coming optimizer step was recorded
        self._stepping = False  # on_before_optimizer_step ran in this batch: Lightning takes a step
        self._loss: torch.Tensor | None = None  # this optimizer step's loss, summed over micro-batches
        self._totals = {"rolled_back": 0, "skipped": 0, "undone": 0}

    @property
    def log(self) -> Trajectory:
        """The :class:`~torchrewind.Trajectory` of every decision."""
        return self._log

    @log.setter
    def log(self, value: Any) -> None:
        # Lightning's CallbackConnector assigns pl_module.log to every callback's ``.log`` (and ``.log_dict``) at
        # fit(); keep ours the decision log. Metrics go through pl_module.log_dict (see on_train_batch_end).
        if isinstance(value, Trajectory):
            self._log = value

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RewindError(
                f"{name} supports automatic optimization only; with manual optimization you call optimizer.step() "
                "yourself, so use torchrewind directly in training_step: rw = Rewind(self, opt); "
                "guard = SpikeGuard(rw); ...; self.manual_backward(loss); guard.step(loss)."
            )
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise RewindError(
                f"{name} does not support {type(trainer.strategy).__name__}: it accumulates gradients and steps the "
                "optimizer inside its engine, where no callback can make the step undoable."
            )

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # fail before configure_optimizers and before any checkpoint is restored
            self._check_trainer(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy.setup (optimizers, schedulers) and after a checkpoint's optimizer state was loaded.
        self._check_trainer(trainer, pl_module)
        opts = trainer.optimizers
        if len(opts) != 1:
            raise RewindError(
                f"{type(self).__name__} needs exactly one optimizer, the Trainer has {len(opts)}; with several, use "
                "manual optimization and a Rewind per optimizer."
            )
        (opt,) = opts
        configs = list(trainer.lr_scheduler_configs)
        for c in configs:
            last = getattr(c.scheduler, "last_epoch", None)
            if c.interval == "epoch" and not c.reduce_on_plateau and not isinstance(last, int):
                raise RewindError(
                    f"{type(self).__name__}: the interval='epoch' scheduler {type(c.scheduler).__name__} has no int "
                    "last_epoch, so the callback cannot tell whether Lightning stepped it at an undone step."
                )
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler: undone with the rest
        self.close()  # a second fit(): the optimizer and schedulers are new objects
        self.rewind = self.guard = None  # drop the old Rewind first: the new one adopts the tensors it held
        self.rewind = Rewind(
            pl_module,
            opt,
            schedulers=[c.scheduler for c in configs],
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            capacity=self.capacity,
            rng=self.rng,
            **self.rewind_kwargs,
        )
        spec = self.guard_spec
        if spec is None:
            self.guard = None
        elif isinstance(spec, str):
            self.guard = _GUARDS[spec](self.rewind, log=self.log, **self.guard_kwargs)
        else:
            try:
                self.guard = _from_factory(spec, self.rewind, type(self).__name__)
            except BaseException:
                self.close()  # leave the optimizer without our hooks
                self.rewind = None
                raise
            self.log = self.guard.log
        self._optimizer = opt
        self._epoch_configs = [c for c in configs if c.interval == "epoch" and not c.reduce_on_plateau]
        self._window_open = self._stepping = False
        self._loss, self.last_step_stood = None, None
        self._totals = dict.fromkeys(self._totals, 0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning steps on an epoch's last batch; an epoch cut short (on_train_batch_start returned -1) must not
        # leave a window open whose record would predate the epoch-end scheduler step.
        self._window_open = self._stepping = False
        self._loss = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.rewind is not None and not self._window_open:
            self.rewind.snapshot()  # the step's boundary; the pre-step hook then does not record again
            self._window_open = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Called only for batches that step (not for accumulating ones), inside the closure after backward.
        self._stepping = True
        self._epoch_marks = [(c, c.scheduler.last_epoch) for c in self._epoch_configs]
        if self.guard is not None:
            self.guard.before_step()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss = loss if self._loss is None else self._loss + loss  # on device: no sync per micro-batch
        if not self._stepping:
            return  # accumulating gradients: no optimizer step in this batch
        self._stepping = self._window_open = False
        loss, self._loss = self._loss, None
        if self.guard is None:
            return
        if loss is None:
            # training_step returned None for every micro-batch: no gradients, the step changed nothing to judge
            return
        stepped_epoch = [c for c, mark in self._epoch_marks if c.scheduler.last_epoch != mark]
        self._epoch_marks = []
        n = len(self.log)
        self.last_step_stood = self.guard.after_step(loss)  # grads still in .grad; undoes the scheduler steps too
        if not self.last_step_stood:
            for c in stepped_epoch:  # the epoch ended all the same: step its schedulers again, as Lightning did
                pl_module.lr_scheduler_step(c.scheduler, None)
        for e in self.log.events[n:]:
            if e.kind in ("rolled_back", "skipped"):
                self._totals[e.kind] += 1
            self._totals["undone"] += e.undone
        if self.log_metrics:
            metrics = {f"rewind/{k}": float(v) for k, v in self._totals.items()}
            if isinstance(self.guard, SpikeGuard):
                metrics["rewind/lr_scale"] = float(self.guard.lr_scale)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Remove the hooks this callback put on the optimizer (``.rewind`` and ``.guard`` stay for inspection; an
        ``undo()`` still works). Called at ``teardown`` and by the next ``on_train_start``."""
        if self.rewind is not None:
            self.rewind.close()
        if self.guard is not None:
            self.guard.close()


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The (detached) loss Lightning hands to ``on_train_batch_end``: ``outputs["loss"]``, already divided by
    ``accumulate_grad_batches``; None when ``training_step`` returned None."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, (int, float)) and not isinstance(outputs, bool):
        return torch.tensor(float(outputs))
    return None


def _from_factory(factory: GuardFactory, rewind: Rewind, name: str) -> NonFiniteGuard:
    guard = factory(rewind)
    if not isinstance(guard, NonFiniteGuard) or guard.rw is not rewind:
        raise RewindTypeError(
            f"{name}: the guard factory must return a NonFiniteGuard/SpikeGuard built on the Rewind it is given, got "
            f"{type(guard).__name__}."
        )
    if isinstance(guard, SpikeGuard) and rewind.capacity < guard.rollback + 1:
        raise RewindValueError(
            f"{name}: SpikeGuard(rollback={guard.rollback}) needs capacity >= {guard.rollback + 1} in Lightning (the "
            f"step just taken occupies one history slot); pass capacity={guard.rollback + 1} to {name}, or build the "
            f"guard with rollback={rewind.capacity - 1}."
        )
    return guard
