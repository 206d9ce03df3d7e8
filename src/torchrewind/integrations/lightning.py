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

from collections.abc import Mapping
from typing import Any

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

from ..errors import RewindError
from ..policies import SpikeGuard
from ..trajectory import Trajectory
from ._common import GuardedTraining, GuardSpec

__all__ = ["RewindCallback"]


class RewindCallback(GuardedTraining, pl.Callback):
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

    Resume: the guard's state (detector statistics, cool-down, roll-back budget, counters, the log) goes into
    Lightning's checkpoint through :meth:`state_dict`, and ``trainer.fit(model, ckpt_path=...)`` restores it into
    the guard built at ``on_train_start``; a checkpoint of another guard type or other guard settings is refused.
    """

    def __init__(
        self,
        guard: GuardSpec = "spike",
        capacity: int | None = None,
        *,
        rng: bool | str = True,
        log: Trajectory | None = None,
        log_metrics: bool = True,
        rewind_kwargs: dict[str, Any] | None = None,
        **guard_kwargs: Any,
    ) -> None:
        self._configure("Lightning", guard, capacity, rng, log, rewind_kwargs, guard_kwargs, factories=True)
        self.log_metrics = log_metrics
        self._epoch_configs: list[Any] = []  # interval="epoch" scheduler configs that Lightning steps in the batch
        self._epoch_marks: list[tuple[Any, int]] = []
        self._window_open = False  # the first micro-batch of the coming optimizer step was recorded
        self._stepping = False  # on_before_optimizer_step ran in this batch: Lightning takes a step
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
        # After strategy.setup (optimizers, schedulers) and after a checkpoint's state (ours included) was loaded.
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
        if self._resume is None:
            self._totals = dict.fromkeys(self._totals, 0)  # per fit(); a resumed fit continues the saved ones
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed's GradScaler: undone with the rest
        self._start(pl_module, opt, [c.scheduler for c in configs], scaler)
        self._epoch_configs = [c for c in configs if c.interval == "epoch" and not c.reduce_on_plateau]
        self._window_open = self._stepping = False

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
            self._add_loss(loss)
        if not self._stepping:
            return  # accumulating gradients: no optimizer step in this batch
        self._stepping = self._window_open = False
        loss = self._take_loss()
        if self.guard is None:
            return
        if loss is None:
            # training_step returned None for every micro-batch: no gradients, the step changed nothing to judge
            self.guard.cancel()
            return
        stepped_epoch = [c for c, mark in self._epoch_marks if c.scheduler.last_epoch != mark]
        self._epoch_marks = []
        n = len(self.log)
        if not self._judge(loss):  # grads still in .grad; undoes the scheduler steps too
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

    # -- state in Lightning's checkpoint (state_dict / load_state_dict: GuardedTraining) ---------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"totals": dict(self._totals)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        totals = state.get("totals")
        if isinstance(totals, dict) and set(totals) == set(self._totals):
            self._totals = {k: int(v) for k, v in totals.items()}


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
