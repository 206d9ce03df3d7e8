"""PyTorch Lightning integration of :class:`~torchrewind.FaultTriage`: a failed check in ``trainer.fit()`` is rerun
from the exact start of the batch and attributed to the machine (transient) or to the data/model (reproducible).

Usage::

    cb = TriageCallback(quarantine="quarantine.jsonl", detector=SpikeDetector())
    Trainer(callbacks=[cb]).fit(model, loader)
    print(cb.triage.faults)                       # verdict, action, rank/host/device of every diagnosis

How a rerun is faithful to Lightning 2.x's automatic optimization, per batch:

1. ``on_train_batch_start``: the state is recorded (:meth:`FaultTriage.begin`: parameters, buffers, optimizer,
   schedulers, RNG) before ``training_step``.
2. ``optimizer.step(closure)``: a step pre-hook keeps the closure Lightning passes to the optimizer — its precision
   plugin's wrapper around ``training_step``, ``zero_grad`` and backward, followed by ``on_before_optimizer_step`` and
   gradient clipping: the whole computation of the step's gradients.
3. ``on_train_batch_end``: the loss (``training_step``'s) and the gradients Lightning applied (after clipping) are
   checked. On a failure the state goes back to 1. (the step and the schedulers' steps are undone), the kept closure
   is called again — ``training_step`` on the same batch from the same state, same RNG — and the two runs compared.
   Transient: the optimizer steps with the rerun's gradients and the schedulers Lightning had stepped are stepped
   again (the run continues bit for bit as the fault-free one). Reproducible: the batch is quarantined and its step
   stays undone (``interval="step"`` schedules advance only with steps that stand; ``"epoch"`` ones stepped at the
   epoch's end are stepped again), or :class:`~torchrewind.ReproducibleFaultError` is raised.

Limits: one optimizer, automatic optimization, ``accumulate_grad_batches=1`` (a rerun recomputes one batch; the
earlier micro-batches of an accumulated step are gone), no ``GradScaler`` (``16-mixed`` calls the closure outside the
optimizer step), no optimizer that calls its closure several times (LBFGS). A rerun calls ``training_step`` again:
anything it logs with ``self.log`` is logged twice for that batch, and Lightning's ``zero_grad`` progress counters
count it. Under DDP every rank reruns together (the decision is agreed in one collective).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone pytorch_lightning package has the same API
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "torchrewind.integrations.lightning_triage needs PyTorch Lightning: pip install torchrewind[lightning]"
        ) from e

from .._checks import check_bool, check_type
from ..errors import RewindError
from ..policies import FaultTriage
from ..rewind import Rewind
from ._triage import build_triage, check_callback_args

__all__ = ["TriageCallback"]


class TriageCallback(pl.Callback):
    """Runs a :class:`~torchrewind.FaultTriage` on every optimizer step of a Lightning ``Trainer``: a failed check
    (non-finite loss or gradient, a ``SpikeDetector`` spike, your ``check``) reruns ``training_step`` on the same
    batch from the exact state the batch started from, and the diagnosis decides: transient — continue with the
    rerun; reproducible — quarantine and skip the batch, or raise.

    Example::

        cb = TriageCallback(quarantine="quarantine.jsonl", max_transient=3)
        Trainer(callbacks=[cb]).fit(model, loader)
        print(cb.triage.faults, cb.triage.log.counts())

    Args:
        batch_id: ``batch_id(batch, batch_idx) -> id`` names a batch in the quarantine (default: the batch's index
            in the whole run, counting every batch drawn).
        rng: passed to :class:`~torchrewind.Rewind` (``True``: the torch RNGs are restored for the rerun, so dropout
            draws the same masks; ``"all"`` adds Python's and NumPy's).
        log_metrics: log ``triage/transient`` and ``triage/reproducible`` (running totals) at every step.
        rewind_kwargs: more :class:`~torchrewind.Rewind` options (e.g. ``{"storage": "host"}``).
        **triage_kwargs: :class:`~torchrewind.FaultTriage`'s options (``detector``, ``grad_detector``, ``check``,
            ``on_reproducible`` — ``"skip"`` or ``"raise"`` —, ``quarantine``, ``max_transient``, ``window``,
            ``tolerance``, ``checksum``, ``report_every``, ...); checked here, before training starts.

    Attributes: ``rewind`` and ``triage`` (built at ``on_train_start``); ``last_step_stood``. Resume: the triage's
    state (counters, transient window, diagnoses, determinism report, quarantine, detectors, log) is saved in
    Lightning's checkpoint and restored by ``trainer.fit(..., ckpt_path=...)``.
    """

    def __init__(
        self,
        *,
        batch_id: Callable[[Any, int], Any] | None = None,
        rng: bool | str = True,
        log_metrics: bool = True,
        rewind_kwargs: dict[str, Any] | None = None,
        **triage_kwargs: Any,
    ) -> None:
        name = type(self).__name__
        self.log_metrics = check_bool("log_metrics", log_metrics, name)
        triage_kwargs = check_callback_args(name, batch_id, "(batch, batch_idx)", rng, rewind_kwargs, triage_kwargs)
        self.batch_id, self.rng = batch_id, rng
        self.rewind_kwargs = dict(rewind_kwargs or {})
        self.triage_kwargs = triage_kwargs
        self.rewind: Rewind | None = None
        self.triage: FaultTriage | None = None
        self.last_step_stood: bool | None = None
        self._resume: dict[str, Any] | None = None
        self._hook: Any = None
        self._closure: Callable[[], Any] | None = None  # the closure Lightning passed to this batch's step
        self._configs: list[Any] = []
        self._marks: list[tuple[Any, int]] = []  # (scheduler config, last_epoch) before this batch's step
        self._began = self._stepping = self._rerunning = self._quarantined = False

    # -- checks ----------------------------------------------------------------------------------------------------
    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RewindError(
                f"{name} supports automatic optimization only; with manual optimization call FaultTriage.step("
                "loss_fn) in training_step yourself."
            )
        if trainer.accumulate_grad_batches != 1:
            raise RewindError(
                f"{name} needs accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}): a rerun recomputes "
                "the step's batch, and the earlier micro-batches of an accumulated step are gone by then."
            )
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise RewindError(f"{name} does not support {type(trainer.strategy).__name__}, which steps the "
                              "optimizer inside its engine.")  # fmt: skip

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_trainer(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_trainer(trainer, pl_module)
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise RewindError(f"{name} needs exactly one optimizer, the Trainer has {len(trainer.optimizers)}.")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise RewindError(
                f"{name} does not support a GradScaler ('16-mixed'): Lightning then runs the closure outside "
                "optimizer.step(), where the callback cannot keep it for a rerun. Use 'bf16-mixed' or '32-true'."
            )
        (opt,) = trainer.optimizers
        self._configs = [c for c in trainer.lr_scheduler_configs if not c.reduce_on_plateau]
        self.close()
        self.rewind = self.triage = None  # drop an earlier fit's Rewind first: the new one adopts the tensors
        self.rewind = Rewind(pl_module, opt, schedulers=[c.scheduler for c in trainer.lr_scheduler_configs],
                             capacity=1, rng=self.rng, **self.rewind_kwargs)  # fmt: skip
        self.triage = build_triage(self.rewind, self.triage_kwargs)
        if self._resume is not None:
            self.triage.load_state_dict(self._resume)
            self._resume = None
        self._hook = opt.register_step_pre_hook(self._keep_closure)
        self._began = self._stepping = self._rerunning = False

    def _keep_closure(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is not None and not self._rerunning:
            self._closure = closure

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.triage is None:
            return
        bid = self.batch_id(batch, batch_idx) if self.batch_id is not None else None
        self._quarantined = not self.triage.begin(bid)
        self._began, self._stepping, self._closure = True, False, None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._rerunning:
            return  # the rerun's own pass through the closure
        self._stepping = True
        self._marks = [(c, c.scheduler.last_epoch) for c in self._configs]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.triage is None or not self._began:
            return
        self._began = False
        stepped = [c for c, mark in self._marks if c.scheduler.last_epoch != mark]
        self._marks = []
        loss = _loss_of(outputs)
        if self._quarantined:
            self.rewind.revert()  # computed (Lightning cannot skip it from a callback), never applied
            self._restep(pl_module, [c for c in stepped if c.interval == "epoch"])
            self.last_step_stood = False
            return
        if not self._stepping or loss is None or self._closure is None:
            self.triage.cancel()  # no step to judge (training_step returned None)
            return
        stood = self.triage.judge(loss, self._rerun, framework="after_step")
        self.last_step_stood = stood
        if stood and self.triage.reran:  # the restore undid the schedulers' steps with the optimizer's
            self._restep(pl_module, stepped)
        elif not stood:  # the epoch ended all the same
            self._restep(pl_module, [c for c in stepped if c.interval == "epoch"])
        if self.log_metrics:
            t = self.triage
            pl_module.log_dict({"triage/transient": float(t.transient), "triage/reproducible": float(t.reproducible)},
                               on_step=True, on_epoch=False, prog_bar=False)  # fmt: skip

    def _rerun(self) -> Any:
        """training_step, zero_grad and backward on the same batch again, then on_before_optimizer_step and
        gradient clipping: the closure Lightning passed to the optimizer, called once more."""
        assert self._closure is not None
        self._rerunning = True
        try:
            loss = self._closure()
        finally:
            self._rerunning = False
        if loss is None:
            raise RewindError(f"{type(self).__name__}: training_step returned None in the rerun; it must return the "
                              "loss for every batch.")  # fmt: skip
        return loss

    @staticmethod
    def _restep(pl_module: pl.LightningModule, configs: list[Any]) -> None:
        for c in configs:
            pl_module.lr_scheduler_step(c.scheduler, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Remove the hooks on the optimizer (``.rewind`` and ``.triage`` stay for inspection)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.rewind is not None:
            self.rewind.close()

    # -- state in Lightning's checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The triage's :meth:`~torchrewind.FaultTriage.state_dict` (or the loaded one, before training starts)."""
        if self.triage is not None:
            return {"triage": self.triage.state_dict()}
        return {"triage": self._resume}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_type("state_dict", state_dict, Mapping, f"{type(self).__name__}.load_state_dict", "a dict")
        sd = state_dict.get("triage")
        if sd is None:
            return
        if self.triage is not None and self.rewind is not None and self._hook is not None:
            self.triage.load_state_dict(sd)
        else:
            self._resume = sd  # applied when the triage is built at on_train_start


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    return None
