"""Hugging Face ``Trainer`` entry point for the LR range test that leaves no trace: :func:`lr_find`.

Usage::

    from torchrewind.integrations.hf_tuners import lr_find
    res = lr_find(trainer, update_args=True)      # trainer.args.learning_rate = the suggestion, nothing else changed
    trainer.train()                               # bit for bit the run without lr_find, at that lr

The sweep is a short ``trainer.train()`` (so gradient accumulation, clipping, mixed precision and the data pipeline
are the ``Trainer``'s own) with ``max_steps=num_steps``, the lr set right before each optimizer step, and only the
``Trainer``'s flow callback active (yours — loggers, early stopping, torchrewind guards — are set aside for it).
Before it, the model, the optimizer and LR scheduler you passed (if any), every RNG and the modules' ``training``
flags are held in memory; afterwards they are put back bit for bit, and so are the ``Trainer``'s attributes the
sweep replaced (``args``, ``optimizer``, ``lr_scheduler``, ``state``, ``control``, ``model_wrapped``, the callback
list and the callback handler's references): the next ``train()`` builds its optimizer and schedule afresh, exactly
as it would have without ``lr_find``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "torchrewind.integrations.hf_tuners needs Hugging Face transformers and accelerate: pip install torchrewind[hf]"
    ) from e

from .._checks import check_bool, check_choice, check_int, check_type
from ..errors import RewindError, RewindValueError
from ..tuners._common import set_hparam, to_float
from ..tuners.hold import StateHold
from ..tuners.lr_find import LRFindResult, LRSweep
from ..tuners.suggest import RULES

__all__ = ["lr_find"]


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer (accelerate wraps it; the lr must be set on the one whose ``step`` runs)."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


class _SweepCallback(TrainerCallback):
    """Sets the sweep's lr before each optimizer step; records the step's loss (the sum of its micro-batch losses,
    which ``training_step`` returns already divided for accumulation) after it."""

    def __init__(self, sweep: LRSweep) -> None:
        self.sweep = sweep
        self.steps = 0
        self.loss: float = 0.0
        self._lr: float | None = None

    def observe(self, loss: Any) -> None:
        self.loss += to_float(loss)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        self._lr = self.sweep.lr(self.steps)
        set_hparam(_torch_optimizer(optimizer), "lr", self._lr)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        lr, loss, self.loss = self._lr, self.loss, 0.0
        self.steps += 1
        if not self.sweep.record(lr, loss) or self.steps >= self.sweep.num_steps:
            control.should_training_stop = True


def lr_find(
    trainer: Trainer,
    *,
    lr_min: float = 1e-7,
    lr_max: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    beta: float = 0.98,
    diverge: float | None = 4.0,
    rule: str = "valley",
    skip_start: int = 10,
    skip_end: int = 1,
    update_args: bool = False,
    generators: Sequence[torch.Generator] = (),
) -> LRFindResult:
    """LR range test on a Hugging Face ``Trainer``: ``num_steps`` real training steps with the lr rising from
    ``lr_min`` to ``lr_max``, then everything put back bit for bit.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        res = lr_find(trainer, update_args=True); res.plot("lr.png")
        trainer.train()                              # as without lr_find, at the suggested lr

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) with a ``train_dataset``; not one with ``model_init``
            (it builds a new model per ``train()``) nor DeepSpeed (its engine steps inside ``backward``).
        lr_min, lr_max, num_steps, mode, beta, diverge, rule, skip_start, skip_end: as for
            :func:`torchrewind.lr_find`.
        update_args: after restoring, set ``trainer.args.learning_rate`` to the suggestion (used by the optimizer
            the next ``train()`` creates; with your own optimizer, set its lr yourself).
        generators: more ``torch.Generator`` objects your data pipeline draws from, to put back.

    Returns: an :class:`~torchrewind.LRFindResult`.
    """
    who = "hf_tuners.lr_find"
    check_type("trainer", trainer, Trainer, who, "a transformers.Trainer")
    if trainer.model_init is not None:
        raise RewindError(f"{who}: the Trainer has model_init, which builds a new model in every train(); there is no "
                          "state to tune and restore. Build the model first and pass model=.")  # fmt: skip
    if getattr(trainer.args, "deepspeed", None):
        raise RewindError(f"{who}: DeepSpeed steps the optimizer inside backward(); not supported.")
    if trainer.train_dataset is None:
        raise RewindValueError(f"{who}: the Trainer has no train_dataset.")
    sweep = LRSweep(lr_min, lr_max, num_steps, mode, beta, diverge, who)
    check_choice("rule", rule, RULES, who)
    check_int("skip_start", skip_start, 0, who)
    check_int("skip_end", skip_end, 0, who)
    check_bool("update_args", update_args, who)
    model = trainer.model
    user_opt = trainer.optimizer  # an optimizer passed to the Trainer persists across train(): hold its state too
    if user_opt is not None:
        opt = _torch_optimizer(user_opt)
        scheds = [trainer.lr_scheduler] if trainer.lr_scheduler is not None else []
    else:  # the sweep's optimizer is created by train() and discarded: a placeholder lets the hold track the model
        opt, scheds = torch.optim.SGD([p for p in model.parameters()], lr=0.0), []
    handler = trainer.callback_handler
    saved = {
        "args": trainer.args, "optimizer": trainer.optimizer, "lr_scheduler": trainer.lr_scheduler,
        "state": trainer.state, "control": trainer.control, "model_wrapped": trainer.model_wrapped,
    }  # fmt: skip
    sweep_args = dict(
        max_steps=num_steps, save_strategy=SaveStrategy.NO, eval_strategy=IntervalStrategy.NO,
        logging_strategy=IntervalStrategy.NO, load_best_model_at_end=False, push_to_hub=False,
    )  # fmt: skip
    saved_args = {k: getattr(trainer.args, k) for k in sweep_args}
    saved_handler = {a: getattr(handler, a) for a in ("model", "optimizer", "lr_scheduler", "train_dataloader")}
    saved_callbacks = list(handler.callbacks)
    own_step = vars(trainer).get("training_step")  # an instance attribute of yours, if any, comes back
    cb = _SweepCallback(sweep)
    hold = StateHold(model, opt, schedulers=scheds, generators=generators, steps=num_steps, who=who)
    try:
        # edited in place and put back afterwards (a new TrainingArguments would reset accelerate's global state)
        for k, v in sweep_args.items():
            setattr(trainer.args, k, v)
        handler.callbacks = [c for c in saved_callbacks if isinstance(c, DefaultFlowCallback)] + [cb]
        inner = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = inner(*args, **kwargs)
            cb.observe(loss)
            return loss

        trainer.training_step = training_step  # the Trainer's callbacks never see the loss
        trainer.train()
    finally:
        try:
            hold.restore()
        finally:
            hold.close()
            for k, v in saved.items():
                setattr(trainer, k, v)
            for k, v in saved_args.items():
                setattr(trainer.args, k, v)
            for k, v in saved_handler.items():
                setattr(handler, k, v)
            handler.callbacks = saved_callbacks
            vars(trainer).pop("training_step", None)
            if own_step is not None:
                trainer.training_step = own_step
    res = sweep.result(rule, skip_start, skip_end)
    res.extra["steps"] = cb.steps
    if update_args and res.suggestion is not None:
        trainer.args.learning_rate = res.suggestion
    return res
