"""PyTorch Lightning entry point for the LR range test that leaves no trace: :func:`lr_find`.

Usage::

    from torchrewind.integrations.lightning_tuners import lr_find
    res = lr_find(model, datamodule=dm, update_attr=True)     # model.lr = the suggestion, nothing else changed
    L.Trainer(max_epochs=5).fit(model, datamodule=dm)          # bit for bit the run without lr_find, at that lr

How it differs from Lightning's ``Tuner(trainer).lr_find``: the sweep runs in a throwaway ``Trainer`` (your trainer,
its callbacks, loggers and loop state are never touched), the start state is held in memory by a
:class:`~torchrewind.tuners.hold.StateHold` instead of a checkpoint file, and what a checkpoint does not hold is put
back too: the global RNGs (torch, Python, NumPy), the data loaders' generators, the modules' ``training`` flags and
``model.trainer``. The suggestion is applied after the restore (cf. Lightning PR #21068, where it was lost in it).

The optimizer the sweep uses comes from ``configure_optimizers`` and is thrown away afterwards, like the one of any
``fit`` (your next ``fit`` builds its own); its LR schedulers are overridden by the sweep's lr at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
except ImportError:  # pragma: no cover - the standalone pytorch_lightning package has the same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.parsing import lightning_hasattr, lightning_setattr  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "torchrewind.integrations.lightning_tuners needs PyTorch Lightning: pip install torchrewind[lightning]"
        ) from e

from .._checks import check_bool, check_choice, check_int, check_type
from ..errors import RewindError, RewindTypeError, RewindValueError
from ..tuners._common import set_hparam, to_float
from ..tuners.data import data_state
from ..tuners.hold import StateHold
from ..tuners.lr_find import LRFindResult, LRSweep
from ..tuners.suggest import RULES

__all__ = ["lr_find"]

_SWEEP_TRAINER_DEFAULTS = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1,
)  # fmt: skip


class _SweepCallback(pl.Callback):
    """Sets the sweep's lr right before each optimizer step and records the step's loss at the end of its batch."""

    def __init__(self, sweep: LRSweep) -> None:
        self.sweep = sweep
        self.steps = 0
        self._lr: float | None = None
        self._losses: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._lr = self.sweep.lr(self.steps)
        set_hparam(optimizer, "lr", self._lr)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._losses.append(to_float(loss) if loss is not None else float("nan"))
        if self._lr is None:
            return  # a micro-batch of gradient accumulation: the step comes with a later batch
        lr, self._lr = self._lr, None
        loss_value, self._losses = sum(self._losses) / len(self._losses), []
        self.steps += 1
        if not self.sweep.record(lr, loss_value) or self.steps >= self.sweep.num_steps:
            trainer.should_stop = True


def lr_find(
    model: pl.LightningModule,
    train_dataloaders: Any = None,
    datamodule: pl.LightningDataModule | None = None,
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
    update_attr: bool = False,
    attr_name: str = "",
    generators: Sequence[torch.Generator] = (),
    trainer_kwargs: dict[str, Any] | None = None,
) -> LRFindResult:
    """LR range test for a ``LightningModule``: ``num_steps`` real training steps in a throwaway ``Trainer`` with the
    lr rising from ``lr_min`` to ``lr_max``; afterwards the module, RNGs and data loaders are bitwise as before.

    Example::

        res = lr_find(model, datamodule=dm, update_attr=True)
        print(res.suggestion); res.plot("lr.png")
        trainer.fit(model, datamodule=dm)            # as without lr_find, at the suggested lr

    Args:
        model: the ``LightningModule`` (automatic optimization, one optimizer).
        train_dataloaders, datamodule: the training data, as for ``Trainer.fit``. The ``torch.Generator`` objects of
            a DataLoader given here (and of the datamodule's attributes) are put back; a datamodule that hands out
            a DataLoader with a generator it creates elsewhere: pass that generator in ``generators``.
        lr_min, lr_max, num_steps, mode, beta, diverge, rule, skip_start, skip_end: as for
            :func:`torchrewind.lr_find`.
        update_attr: after restoring, set the suggestion as the module's ``lr``/``learning_rate`` attribute (or
            ``attr_name``, in ``model`` or ``model.hparams``), where ``configure_optimizers`` reads it.
        trainer_kwargs: options for the sweep's ``Trainer`` (e.g. ``precision``, ``accelerator``,
            ``gradient_clip_val``, ``accumulate_grad_batches``: use your training's). Logging, checkpointing,
            validation and progress bars are off unless you set them.

    Returns: an :class:`~torchrewind.LRFindResult`.
    """
    who = "lightning_tuners.lr_find"
    check_type("model", model, pl.LightningModule, who, "a LightningModule")
    if not model.automatic_optimization:
        raise RewindError(f"{who}: the module uses manual optimization; call torchrewind.lr_find with your own step.")
    if (train_dataloaders is None) == (datamodule is None):
        raise RewindTypeError(f"{who}: give exactly one of train_dataloaders or datamodule.")
    sweep = LRSweep(lr_min, lr_max, num_steps, mode, beta, diverge, who)
    check_choice("rule", rule, RULES, who)
    check_int("skip_start", skip_start, 0, who)
    check_int("skip_end", skip_end, 0, who)
    check_bool("update_attr", update_attr, who)
    if update_attr:
        attr_name = _lr_attr(model, attr_name, who)
    kwargs = {**_SWEEP_TRAINER_DEFAULTS, **(trainer_kwargs or {})}
    for own in ("max_steps", "callbacks"):
        if own in (trainer_kwargs or {}):
            raise RewindValueError(f"{who}: trainer_kwargs cannot set {own!r}; the sweep sets it.")
    if str(kwargs.get("precision", "")).endswith("-true"):
        raise RewindValueError(
            f"{who}: precision={kwargs['precision']!r} converts the module's parameters to another dtype for good; "
            "the state could not be put back. Use a '-mixed' precision for the sweep."
        )
    gens = list(generators)
    for src in _data_sources(train_dataloaders, datamodule):
        gens += data_state(src)[0]
    params = [p for p in model.parameters()]
    if not params:
        raise RewindValueError(f"{who}: the module has no parameters to tune a learning rate for.")
    # the state to hold is the module's (the sweep's optimizer is created by configure_optimizers and discarded):
    # a placeholder optimizer that never steps gives the Rewind behind the hold the parameters to track
    placeholder = torch.optim.SGD(params, lr=0.0)
    try:
        old_trainer = model.trainer
    except RuntimeError:  # "not attached to a Trainer"
        old_trainer = None
    hold = StateHold(model, placeholder, generators=gens, steps=num_steps, who=who)
    cb = _SweepCallback(sweep)
    try:
        trainer = pl.Trainer(max_steps=num_steps, callbacks=[cb], **kwargs)
        trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
    finally:
        try:
            hold.restore()
        finally:
            hold.close()
            model.trainer = old_trainer
    res = sweep.result(rule, skip_start, skip_end)
    res.extra["steps"] = cb.steps
    if update_attr and res.suggestion is not None:
        lightning_setattr(model, attr_name, res.suggestion)
    return res


def _lr_attr(model: pl.LightningModule, attr_name: str, who: str) -> str:
    names = [attr_name] if attr_name else ["lr", "learning_rate"]
    for n in names:
        if lightning_hasattr(model, n):
            return n
    raise RewindValueError(
        f"{who}: update_attr=True needs the module (or model.hparams) to have {' or '.join(map(repr, names))}; "
        "set attr_name= to the attribute configure_optimizers reads."
    )


def _data_sources(train_dataloaders: Any, datamodule: Any) -> list[Any]:
    """DataLoaders given directly (one, a list, a dict) and the datamodule's attributes."""
    out: list[Any] = []
    if train_dataloaders is not None:
        if isinstance(train_dataloaders, dict):
            out += list(train_dataloaders.values())
        elif isinstance(train_dataloaders, (list, tuple)):
            out += list(train_dataloaders)
        else:
            out.append(train_dataloaders)
    if datamodule is not None:
        out += [v for v in vars(datamodule).values() if isinstance(v, (torch.Generator, torch.utils.data.DataLoader))]
    return out
