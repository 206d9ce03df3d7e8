"""Hugging Face ``Trainer`` integration of :class:`~torchrewind.FaultTriage`: a failed check in ``trainer.train()``
reruns ``Trainer.training_step`` on the same inputs from the exact state the step started from, and the diagnosis
decides (transient: continue with the rerun; reproducible: quarantine and skip the batch, or raise).

Usage::

    cb = TriageTrainerCallback(quarantine="quarantine.jsonl")
    TriageTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    print(cb.triage.faults)

Two pieces, because a ``TrainerCallback`` never sees the forward pass:

* :class:`TriageTrainerMixin` (or the ready-made :class:`TriageTrainer`) wraps ``Trainer.training_step``: the state
  is recorded before it (:meth:`FaultTriage.begin`), the loss and gradients are checked after it, and on a failure
  the state is restored and ``training_step`` called again on the same inputs. This happens before the ``Trainer``
  clips the gradients and steps, so a transient fault costs nothing but the rerun: the ``Trainer`` steps with the
  rerun's gradients.
* :class:`TriageTrainerCallback` builds the :class:`~torchrewind.Rewind` and the triage at ``on_train_begin`` and,
  at ``on_step_end``, undoes the step of a batch that must not stand (a reproducible fault, or a quarantined batch):
  the optimizer's step and the scheduler's, as a plain loop running ``if stood: sched.step()`` would have them.

Limits: ``gradient_accumulation_steps=1`` (a rerun recomputes one batch), no DeepSpeed. A quarantined batch is not
computed at all (``training_step`` returns a zero loss and no gradients). ``state.global_step`` and ``max_steps``
count every batch, skipped ones included. Do not combine with :class:`~torchrewind.integrations.hf.RewindTrainerCallback`
(both would own the optimizer's undo history).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torchrewind.integrations.hf_triage needs Hugging Face transformers and accelerate: pip install torchrewind[hf]"
    ) from e

from ..errors import RewindError
from ..policies import FaultTriage
from ..rewind import Rewind
from ._common import json_args
from ._triage import build_triage, check_callback_args
from .hf import _torch_optimizer

__all__ = ["TriageTrainer", "TriageTrainerCallback", "TriageTrainerMixin"]


class TriageTrainerCallback(TrainerCallback, ExportableState):
    """Runs a :class:`~torchrewind.FaultTriage` on every optimizer step of a Hugging Face ``Trainer``. Needs a
    ``Trainer`` with :class:`TriageTrainerMixin` (e.g. :class:`TriageTrainer`), which runs ``training_step`` through it.

    Example::

        cb = TriageTrainerCallback(quarantine="quarantine.jsonl", max_transient=3)
        TriageTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
        print(cb.triage.faults, cb.triage.log.counts())

    Args:
        batch_id: ``batch_id(inputs) -> id`` names a batch in the quarantine (default: the batch's index in the whole
            run, counting every batch drawn), e.g. ``lambda inputs: inputs["idx"].tolist()`` for sample ids.
        rng: passed to :class:`~torchrewind.Rewind` (``True``: the torch RNGs are restored for the rerun).
        rewind_kwargs: more :class:`~torchrewind.Rewind` options.
        **triage_kwargs: :class:`~torchrewind.FaultTriage`'s options (``detector``, ``check``, ``on_reproducible`` —
            ``"skip"`` or ``"raise"`` —, ``quarantine``, ``max_transient``, ``tolerance``, ``report_every``, ...).

    Attributes (set at ``on_train_begin``): ``rewind``, ``triage``. Resume: the triage's state goes into every
    checkpoint's ``trainer_state.json`` and ``trainer.train(resume_from_checkpoint=...)`` restores it.
    """

    def __init__(
        self,
        *,
        batch_id: Callable[[Any], Any] | None = None,
        rng: bool | str = True,
        rewind_kwargs: dict[str, Any] | None = None,
        **triage_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        checked = check_callback_args(name, batch_id, "(inputs)", rng, rewind_kwargs, triage_kwargs)
        self._args = json_args(rng=rng, rewind_kwargs=rewind_kwargs, **triage_kwargs)
        triage_kwargs = checked
        self.batch_id, self.rng = batch_id, rng
        self.rewind_kwargs = dict(rewind_kwargs or {})
        self.triage_kwargs = triage_kwargs
        self.rewind: Rewind | None = None
        self.triage: FaultTriage | None = None
        self._model: torch.nn.Module | None = None
        self._undo = False  # this step must not stand: undo it (and the scheduler's) at on_step_end
        self._global_step = 0

    # -- Trainer events ----------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        name = type(self).__name__
        if getattr(args, "deepspeed", None):
            raise RewindError(f"{name} does not support DeepSpeed: its engine steps the optimizer inside backward().")
        if args.gradient_accumulation_steps != 1:
            raise RewindError(
                f"{name} needs gradient_accumulation_steps=1 (got {args.gradient_accumulation_steps}): a rerun "
                "recomputes the step's batch, and the earlier micro-batches of an accumulated step are gone by then."
            )
        optimizer, scheduler, model = kwargs.get("optimizer"), kwargs.get("lr_scheduler"), kwargs.get("model")
        if optimizer is None or model is None:
            raise RewindError(f"{name}: the Trainer passed no optimizer or model to on_train_begin.")
        if self.rewind is not None:
            self.rewind.close()
        self.rewind = self.triage = None
        scaler = getattr(optimizer, "scaler", None)
        self.rewind = Rewind(model, _torch_optimizer(optimizer), schedulers=[scheduler] if scheduler is not None else [],
                             scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None, capacity=1,
                             rng=self.rng, **self.rewind_kwargs)  # fmt: skip
        self.triage = build_triage(self.rewind, self.triage_kwargs)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved.get("torchrewind") if isinstance(saved, dict) else None
        if saved and state.global_step and saved.get("global_step") == state.global_step:
            self.triage.load_state_dict(saved["state"])
        self._model, self._undo = model, False
        self._global_step = state.global_step

    def run_step(self, training_step: Callable[[], torch.Tensor], inputs: Any) -> torch.Tensor:
        """One ``Trainer.training_step`` under the triage (called by :class:`TriageTrainerMixin`): record, run,
        check; on a failure restore, run again on the same inputs, diagnose. Returns the loss of the run that
        stands."""
        if self.triage is None:
            raise RewindError(f"{type(self).__name__}: training_step before on_train_begin.")
        bid = self.batch_id(inputs) if self.batch_id is not None else None
        if not self.triage.begin(bid):
            self._undo = True  # quarantined: no forward, no gradients; the step and the scheduler's undone later
            return torch.zeros((), device=next(self._model.parameters()).device)
        loss = training_step()
        rerun_loss: list[torch.Tensor] = []

        def rerun() -> torch.Tensor:
            self._model.zero_grad(set_to_none=True)  # as the Trainer left them before this batch
            out = training_step()
            rerun_loss.append(out)
            return out

        stood = self.triage.judge(loss, rerun, framework="before_step")
        self._undo = not stood
        return rerun_loss[-1] if rerun_loss else loss

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._global_step = state.global_step
        if self._undo and self.rewind is not None:
            self._undo = False
            self.rewind.revert()  # the optimizer's step and the scheduler's: this batch's step does not stand

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.rewind is not None:
            self.rewind.close()

    # -- state in the Trainer's checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """For ``trainer_state.json`` (``ExportableState``): the triage's state, with the global step it belongs to."""
        sd = self.triage.state_dict() if self.triage is not None else None
        return {"args": self._args, "attributes": {},
                "torchrewind": {"global_step": self._global_step, "state": sd}}  # fmt: skip


class TriageTrainerMixin:
    """Mix into a ``Trainer`` (sub)class, before it, so that ``training_step`` runs under a
    :class:`TriageTrainerCallback`::

        class MyTrainer(TriageTrainerMixin, Trainer): ...
        MyTrainer(model=model, args=args, train_dataset=ds, callbacks=[TriageTrainerCallback()]).train()
    """

    def training_step(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        cbs = [cb for cb in self.callback_handler.callbacks if isinstance(cb, TriageTrainerCallback)]  # type: ignore[attr-defined]
        step = super().training_step  # type: ignore[misc]
        if not cbs:
            return step(model, inputs, *args, **kwargs)
        if len(cbs) > 1:
            raise RewindError("TriageTrainerMixin: more than one TriageTrainerCallback; use one per Trainer.")
        return cbs[0].run_step(lambda: step(model, inputs, *args, **kwargs), inputs)


class TriageTrainer(TriageTrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``training_step`` runs under a :class:`TriageTrainerCallback`::

        TriageTrainer(model=model, args=args, train_dataset=ds, callbacks=[TriageTrainerCallback()]).train()
    """
