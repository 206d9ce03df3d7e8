"""Hugging Face ``Trainer`` integration: spike guard, non-finite guard and undo for ``trainer.train()``.

Usage::

    cb = RewindTrainerCallback("spike", rollback=2, skip_batches=4)      # or RewindTrainerCallback("nonfinite")
    trainer = RewindTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(); print(cb.log.counts())                             # every decision is in cb.log

Two pieces, because a ``TrainerCallback`` never sees the loss:

* :class:`RewindTrainerMixin` (or the ready-made :class:`RewindTrainer`) hands every micro-batch loss returned by
  ``Trainer.training_step`` to the callback. Mix it into your own ``Trainer`` subclass
  (``class MyTrainer(RewindTrainerMixin, SFTTrainer)``) to keep that subclass.
* :class:`RewindTrainerCallback` builds the :class:`~torchrewind.Rewind` and the guard at ``on_train_begin``, calls
  ``guard.before_step()`` at ``on_pre_optimizer_step`` and ``guard.after_step(loss)`` at ``on_optimizer_step``:
  gradients are still in ``.grad`` there and the LR scheduler has not stepped yet.

Semantics: exactly those of ``guard.step(loss)`` in a plain loop that runs ``if guard.step(loss): sched.step()``
(``tests/test_hf.py`` checks it bit for bit): a step that is not applied is undone, and so is the scheduler step the
``Trainer`` takes after it, so the LR schedule advances only with the steps that stand. ``max_steps`` and
``state.global_step`` still count iterations, undone ones included. The ``Trainer``'s data loader is not wrapped, so
``skip_batches`` means "the next N batches are computed but their steps are not applied".
"""

from __future__ import annotations

import copy
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torchrewind.integrations.hf needs Hugging Face transformers and accelerate: pip install torchrewind[hf]"
    ) from e

from ..errors import RewindError, RewindTypeError
from ..trajectory import Trajectory
from ._common import GuardedTraining, json_args

__all__ = ["RewindTrainer", "RewindTrainerCallback", "RewindTrainerMixin"]


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer: step hooks must go on the object whose ``step()`` really runs (accelerate's
    wrapper calls ``self.optimizer.step()``; with fp16 through ``GradScaler.step``)."""
    while True:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise RewindTypeError(
            f"RewindTrainerCallback: the Trainer's optimizer is a {type(opt).__name__}, not a torch optimizer."
        )
    return opt


class RewindTrainerCallback(GuardedTraining, TrainerCallback, ExportableState):
    """Guards every optimizer step of a Hugging Face ``Trainer`` with :class:`~torchrewind.SpikeGuard` or
    :class:`~torchrewind.NonFiniteGuard`. Needs a ``Trainer`` with :class:`RewindTrainerMixin` (e.g.
    :class:`RewindTrainer`), which gives it each step's loss.

    Example::

        cb = RewindTrainerCallback("spike", rollback=2, skip_batches=4)
        RewindTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
        print(cb.log.counts(), cb.guard.rollbacks)

    Args:
        guard: ``"spike"`` (:class:`~torchrewind.SpikeGuard`) or ``"nonfinite"`` (:class:`~torchrewind.NonFiniteGuard`).
        capacity: the Rewind's history (steps that can be undone). ``"spike"``: at least ``rollback + 1``, because the
            step just taken by the ``Trainer`` occupies one slot (default ``rollback + 1``; with only ``capacity``
            given, ``rollback = capacity - 1``). ``"nonfinite"``: default 1. Each slot holds a copy of parameters,
            buffers and optimizer state.
        rng: passed to :class:`~torchrewind.Rewind` (``True``: undo restores the torch RNGs, e.g. dropout's).
        log: the :class:`~torchrewind.Trajectory` to append decisions to (default: a new one, ``.log``).
        rewind_kwargs: more :class:`~torchrewind.Rewind` options, e.g. ``{"storage": "host"}`` to keep the history
            in pinned CPU memory.
        **guard_kwargs: the guard's options (``rollback``, ``skip_batches``, ``lr_factor``, ``cooldown``,
            ``detector``, ``max_consecutive``, ...). ``SpikeGuard``'s ``rollback`` defaults to 1 here.

    Attributes (set at ``on_train_begin``): ``rewind``, ``guard``; ``log`` exists from the start; ``last_step_stood``
    says whether the latest optimizer step stands.

    Resume: the guard's state goes into every checkpoint's ``trainer_state.json`` (the callback is an
    ``ExportableState``: ``stateful_callbacks``), and ``trainer.train(resume_from_checkpoint=...)`` restores it at
    ``on_train_begin``; a checkpoint of another guard type or other guard settings is refused.
    """

    def __init__(
        self,
        guard: str = "spike",
        capacity: int | None = None,
        *,
        rng: bool | str = True,
        log: Trajectory | None = None,
        rewind_kwargs: dict[str, Any] | None = None,
        **guard_kwargs: Any,
    ) -> None:
        if not all(hasattr(TrainerCallback, e) for e in ("on_pre_optimizer_step", "on_optimizer_step")):
            raise RewindError(  # older Trainers have no event between backward and the optimizer step
                "RewindTrainerCallback needs a transformers version whose TrainerCallback has on_pre_optimizer_step "
                "and on_optimizer_step: pip install -U transformers"
            )
        self._configure("the Trainer", guard, capacity, rng, log, rewind_kwargs, guard_kwargs, factories=False)
        self._scheduler: Any = None
        self._restore: tuple[dict[str, Any], list[Any]] | None = None  # scheduler + lrs to put back at on_step_end
        self._global_step = 0  # the Trainer's global_step after the latest optimizer step, saved with the state

    # -- fed by RewindTrainerMixin ----------------------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Add one micro-batch's loss, as ``Trainer.training_step`` returns it (already divided for gradient
        accumulation), so the sum is the optimizer step's loss. :class:`RewindTrainerMixin` calls this."""
        self._add_loss(loss)

    # -- Trainer events ----------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if getattr(args, "deepspeed", None):
            raise RewindError(
                "RewindTrainerCallback does not support DeepSpeed: its engine steps the optimizer inside backward(), "
                "where no callback can make the step undoable."
            )
        optimizer, scheduler, model = kwargs.get("optimizer"), kwargs.get("lr_scheduler"), kwargs.get("model")
        if optimizer is None:
            raise RewindError("RewindTrainerCallback: the Trainer passed no optimizer to on_train_begin.")
        saved = self._resumed_state(state)
        if saved is not None:
            self._resume = self._check_state(saved)  # applied to the guard _start builds
        elif isinstance(state.stateful_callbacks, dict):
            # resumed from a checkpoint saved without this callback: the Trainer's next save looks our entry up
            state.stateful_callbacks.setdefault(type(self).__name__, {})
        scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler (fp16): its state is undone too
        try:  # the scheduler drives the wrapper around the optimizer: accepted
            self._start(model, _torch_optimizer(optimizer), [scheduler] if scheduler is not None else [], scaler)
        except RewindError as e:
            if saved is None or not getattr(args, "restore_callback_states_from_checkpoint", False):
                raise
            raise type(e)(
                f"{e}\nWith restore_callback_states_from_checkpoint=True the Trainer replaced your "
                "RewindTrainerCallback by one rebuilt from the options saved with the checkpoint, where only "
                "JSON-able options survive (detector=SpikeDetector(...) falls back to the default); leave the flag "
                "False: the callback restores its own state from the checkpoint either way."
            ) from e
        self._scheduler, self._restore = scheduler, None
        self._global_step = state.global_step

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._loss = None  # first micro-batch of an optimizer step

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.guard is None:
            raise RewindError("RewindTrainerCallback: on_pre_optimizer_step before on_train_begin.")
        if self._loss is None:
            raise RewindError(
                "RewindTrainerCallback got no loss for this step: use RewindTrainer, or mix RewindTrainerMixin into "
                "your Trainer class (class MyTrainer(RewindTrainerMixin, Trainer)), so that training_step hands the "
                "loss over."
            )
        self.guard.before_step()  # records the state (gradients clipped already) and applies any cool-down lr

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loss = self._take_loss()
        assert self.guard is not None and loss is not None  # on_pre_optimizer_step checked both
        if not self._judge(loss):  # grads still present, scheduler not stepped yet
            # The Trainer steps the scheduler next, unconditionally; the step it follows did not happen, so put the
            # scheduler (and the lrs it writes into the param groups) back at on_step_end, as a plain loop running
            # `if guard.step(loss): sched.step()` would have them.
            opt = self._optimizer
            sd = copy.deepcopy(self._scheduler.state_dict()) if self._scheduler is not None else {}
            self._restore = (sd, [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                                  for g in opt.param_groups])  # fmt: skip

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._global_step = state.global_step  # a checkpoint saved after this step carries it
        if self._restore is None:
            return
        sd, lrs = self._restore
        self._restore = None
        if self._scheduler is not None:
            self._scheduler.load_state_dict(sd)
        for g, lr in zip(self._optimizer.param_groups, lrs):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].copy_(lr)  # tensor lrs (fused/capturable optimizers) stay the same tensor
            else:
                g["lr"] = lr

    # -- state in the Trainer's checkpoint (trainer_state.json, stateful_callbacks) -----------------------------
    def state(self) -> dict[str, Any]:
        """For the ``Trainer``'s checkpoint (``ExportableState``): the guard's state under ``"torchrewind"``, with
        the global step it belongs to. ``"args"`` lets ``restore_callback_states_from_checkpoint=True`` rebuild the
        callback (from the JSON-able options; a rebuilt callback that differs is refused at ``on_train_begin``)."""
        args = json_args(guard=self.guard_spec, capacity=self.capacity, rng=self.rng,
                         rewind_kwargs=self.rewind_kwargs, **self.guard_kwargs)  # fmt: skip
        return {"args": args, "attributes": {},
                "torchrewind": {"global_step": self._global_step, "state": self.state_dict()}}  # fmt: skip

    def _resumed_state(self, state: TrainerState) -> dict[str, Any] | None:
        """The state saved with the checkpoint the Trainer resumes from, if it does (its global_step is the
        checkpoint's; a fresh run starts at 0)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            raise RewindError("RewindTrainerCallback: the checkpoint holds several of them; use one per Trainer.")
        saved = saved.get("torchrewind") if isinstance(saved, dict) else None
        if not saved or state.global_step == 0 or saved.get("global_step") != state.global_step:
            return None
        return saved["state"]


class RewindTrainerMixin:
    """Mix into a ``Trainer`` (sub)class, before it, so that :class:`RewindTrainerCallback` receives each step's loss::

        class MyTrainer(RewindTrainerMixin, Trainer): ...
        MyTrainer(model=model, args=args, train_dataset=ds, callbacks=[RewindTrainerCallback("nonfinite")]).train()

    It overrides only ``training_step``: the loss it returns (per micro-batch, already divided for gradient
    accumulation, the same value the ``Trainer`` logs) is handed to every :class:`RewindTrainerCallback`.
    """

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, RewindTrainerCallback):
                cb.observe_loss(loss)
        return loss


class RewindTrainer(RewindTrainerMixin, Trainer):
    """``transformers.Trainer`` that feeds :class:`RewindTrainerCallback` (see :class:`RewindTrainerMixin`)::

        cb = RewindTrainerCallback("spike", rollback=2)
        RewindTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    """
