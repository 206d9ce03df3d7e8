"""FaultTriage: when an iteration fails a check, run it again from its exact start and compare bit for bit — was it
the machine (a transient fault: silent data corruption, a flaky accelerator) or the data or the model (reproducible)?

At scale a NaN or a loss spike has two kinds of cause. Bad data, or a model that cannot take a batch, fail the same way
every time the iteration is computed; a transient hardware fault does not. Telling them apart needs the iteration
recomputed from *exactly* the state it started from — parameters, optimizer state, BatchNorm statistics and the RNG
draws of dropout — which is what a :class:`~torchrewind.Rewind` snapshot at the top of the iteration gives, in process
and at memcpy speed. (Megatron-LM's ``rerun_state_machine`` does this for Megatron, restarting the job from a
checkpoint to try another GPU; this is the plain-PyTorch, Lightning and Hugging Face version, without a restart.)

One iteration::

    snapshot ── forward, backward ── check ──ok──▶ step
                                      │ fails
                                      ▼
                      restore the snapshot, forward, backward again, compare (loss, gradient norm, checksum)
                       ├─ equal: reproducible ─▶ quarantine the batch; skip it / roll back (a SpikeGuard) / raise
                       └─ different: transient ─▶ rerun passes the check? step with it, log device/rank/host;
                                                  too many transients in a window ─▶ UnreliableDeviceError
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .._checks import check_bool, check_choice, check_int, check_number, check_type
from ..distributed import all_sum, world_size
from ..errors import RewindError, RewindTypeError, RewindValueError
from ..rewind import Rewind
from ..skipping import SkippableIterator
from ..trajectory import Event, Trajectory
from ._common import check_rewind
from ._state import check_state, header, load_all
from .detector import SpikeDetector
from .determinism import DeterminismReport, compare_grads, copy_grads
from .guard import Guard, nonfinite_reason
from .lr import lrs
from .outcome import Outcome, rel_diff, same_number
from .quarantine import Quarantine, plain_id

logger = logging.getLogger("torchrewind.triage")
T = TypeVar("T")

VERDICTS = ("reproducible", "transient", "inconsistent", "persistent")
ACTIONS = ("skip", "rollback", "raise")
FRAMEWORK = (None, "before_step", "after_step")


class TriageError(RewindError):
    """Raised by :class:`FaultTriage`; ``diagnosis`` holds the record of the fault (see :attr:`FaultTriage.faults`).
    The training state is back at the start of the iteration (as if it never ran)."""

    def __init__(self, message: str, diagnosis: dict[str, Any]) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


class ReproducibleFaultError(TriageError):
    """An iteration failed its check twice, identically (``on_reproducible="raise"``): the data or the model."""


class UnreliableDeviceError(TriageError):
    """Too many transient faults on one device within a window: the machine, not the training. Checkpoint and
    restart elsewhere (the message names the rank, host and device)."""


class FaultTriage:
    """Attributes a failed check to the machine (transient) or to the data/model (reproducible) by rerunning the
    iteration from its exact start, and acts on the diagnosis.

    Replaces the ``zero_grad / forward / backward / optimizer.step()`` lines of a plain loop:
    ``triage.step(loss_fn)`` records the state at the top of the iteration (a :meth:`Rewind.snapshot`: the only cost
    when nothing goes wrong), runs ``loss_fn()`` and backward, and checks the loss (averaged over ranks) and the
    global gradient norm. A check fails on a non-finite loss or gradient, a spike of ``detector`` (loss) or
    ``grad_detector`` (gradient norm), or when ``check(loss, grad_norm)`` returns a reason (a non-empty str or True).
    Then the state is restored — RNG and BatchNorm statistics included — and the iteration recomputed on the same
    batch. The two runs are compared bit for bit (``tolerance=0``; NaN equals NaN): this rank's loss, gradient norm
    and, with ``checksum=True``, a checksum of every gradient bit.

    * **equal — reproducible** (the data or the model): the batch id goes into the ``quarantine`` (a file a
      restarted run reads and skips) and ``on_reproducible`` acts: ``"skip"`` the batch (the state ends exactly as if
      it had never been drawn), ``"rollback"`` (hand it to ``guard``, a :class:`~torchrewind.SpikeGuard` on the same
      Rewind: it rolls back, skips data and cools the lr down as it would), or ``"raise"``
      (:class:`ReproducibleFaultError`). ``max_consecutive`` reproducible failures in a row raise: every batch
      failing points at the model (e.g. broken parameters), not the data.
    * **different — transient** (the machine): if the rerun passes the check, training continues with it (bitwise
      the fault-free run); the event is logged with rank, host and device. ``max_transient`` transient faults on one
      rank within ``window`` iterations raise :class:`UnreliableDeviceError`. A rerun that differs *and* fails again
      is ``"inconsistent"`` and handled as reproducible.

    Under torch.distributed (the Rewind's ``group``) every rank takes the same decision from one collective, and the
    diagnosis names the ranks whose loss did not reproduce (a gradient difference alone cannot be pinned on a rank:
    DDP has averaged the gradients). ``report_every=N`` reruns every N-th iteration as well and keeps, in
    :attr:`determinism`, the largest difference per quantity: 0 on CPU; on a GPU, the ``tolerance`` to use.

    Example::

        triage = FaultTriage(Rewind(model, opt), quarantine="quarantine.jsonl")
        for i, (x, y) in enumerate(loader):
            triage.step(lambda: F.cross_entropy(model(x), y), batch_id=i)
        print(triage.faults)        # one record per diagnosis: verdict, action, ranks, host, device

    Args:
        rewind: the :class:`~torchrewind.Rewind` on the model and optimizer (``capacity=1`` is enough for skip/raise).
        detector, grad_detector: :class:`~torchrewind.SpikeDetector` s on the loss / the gradient norm (default
            none: only non-finite values fail; a spike detector's false alarms would each cost a rerun and, being
            reproducible, quarantine a good batch).
        check: ``check(loss, grad_norm) -> str | bool``: a reason when the numbers look wrong.
        check_grads: measure the gradient norm (one reduction over the gradients per iteration).
        guard: a :class:`~torchrewind.policies.Guard` (e.g. ``SpikeGuard``) on the same Rewind: its decision is part
            of the check, it takes the steps, and ``on_reproducible="rollback"`` hands it reproducible faults.
        on_reproducible: ``"skip"``, ``"rollback"`` (needs ``guard``) or ``"raise"``.
        quarantine: a file path or a :class:`Quarantine` (default: none kept).
        max_transient, window: raise :class:`UnreliableDeviceError` at the ``max_transient``-th transient fault of one
            rank within ``window`` iterations.
        max_consecutive: raise after this many reproducible failures in a row.
        tolerance: relative difference that still counts as "reproduced" (0: bitwise; for GPUs with nondeterministic
            kernels, set it from a ``report_every`` run).
        checksum: also compare a checksum of all gradient bits (costs one pass over the gradients, on faults only).
        report_every: rerun every N-th iteration for :attr:`determinism` (0: never).
        cross_check: under DDP, when a failure reproduced, compute the failing rank's batch on another rank too
            (forward only, from the same replicated state and RNG; needs ``step(loss_fn, batch=...)``): a result
            that only its own device produces is a persistent device fault (:class:`UnreliableDeviceError`,
            verdict ``"persistent"``), not the data.
        log: the :class:`~torchrewind.Trajectory` of decisions (with ``guard``: the guard's log).
    """

    def __init__(
        self,
        rewind: Rewind,
        *,
        detector: SpikeDetector | None = None,
        grad_detector: SpikeDetector | None = None,
        check: Callable[[float, float | None], str | bool] | None = None,
        check_grads: bool = True,
        guard: Guard | None = None,
        on_reproducible: str = "skip",
        quarantine: str | os.PathLike[str] | Quarantine | None = None,
        max_transient: int = 3,
        window: int = 1000,
        max_consecutive: int = 5,
        tolerance: float = 0.0,
        checksum: bool = True,
        report_every: int = 0,
        cross_check: bool = False,
        log: Trajectory | None = None,
    ) -> None:
        who = "FaultTriage"
        self.rw = check_rewind(rewind, who)
        for name, det in (("detector", detector), ("grad_detector", grad_detector)):
            if det is not None:
                check_type(name, det, SpikeDetector, who, "a SpikeDetector")
        if check is not None and not callable(check):
            raise RewindTypeError(f"{who}: check must be a function (loss, grad_norm) -> reason, got {check!r}.")
        self.check_grads = check_bool("check_grads", check_grads, who)
        if grad_detector is not None and not check_grads:
            raise RewindValueError(f"{who}: grad_detector needs check_grads=True (the gradient norm it watches).")
        if guard is not None:
            check_type("guard", guard, Guard, who, "a torchrewind guard (SpikeGuard, NonFiniteGuard, ...)")
            if guard.rw is not rewind:
                raise RewindValueError(f"{who}: the guard must be built on the same Rewind as the triage.")
            if detector is not None or grad_detector is not None:
                raise RewindValueError(f"{who}: with a guard, give the detectors to the guard (it decides on spikes).")
            if log is not None and log is not guard.log:
                raise RewindValueError(f"{who}: with a guard the decisions go to the guard's log; pass log to it.")
        self.on_reproducible = check_choice("on_reproducible", on_reproducible, ACTIONS, who)
        if on_reproducible == "rollback" and guard is None:
            raise RewindValueError(
                f"{who}: on_reproducible='rollback' hands the fault to a guard that rolls back: pass "
                "guard=SpikeGuard(rewind, ...) built on the same Rewind (or use 'skip' or 'raise')."
            )
        if quarantine is not None and not isinstance(quarantine, Quarantine):
            check_type("quarantine", quarantine, (str, os.PathLike), who, "a file path or a Quarantine")
            quarantine = Quarantine(quarantine)
        self.max_transient = check_int("max_transient", max_transient, 1, who)
        self.window = check_int("window", window, 1, who)
        self.max_consecutive = check_int("max_consecutive", max_consecutive, 1, who)
        self.tolerance = check_number("tolerance", tolerance, who, lo=0.0)
        self.checksum = check_bool("checksum", checksum, who)
        self.report_every = check_int("report_every", report_every, 0, who)
        self.cross_check = check_bool("cross_check", cross_check, who)
        if log is not None:
            check_type("log", log, Trajectory, who, "a torchrewind.Trajectory")
        self.optimizer = self.rw.optimizer
        self.detector, self.grad_detector, self.check = detector, grad_detector, check
        self.guard = guard
        self.quarantine: Quarantine | None = quarantine
        self.log = guard.log if guard is not None else (log if log is not None else Trajectory())
        self.determinism = DeterminismReport()
        self.faults: list[dict[str, Any]] = []  # one record per diagnosis, plain data
        self.iteration = 0  # iterations begun (batches drawn), quarantined ones included
        self.steps = 0  # steps applied
        self.consecutive = 0  # reproducible failures in a row
        self.transient = 0
        self.reproducible = 0  # reproducible and inconsistent diagnoses
        self.reruns = 0  # iterations recomputed (faults and determinism reports)
        self.last: dict[str, Any] | None = None  # the latest iteration's diagnosis (None: it had none)
        self.reran = False  # the latest judged iteration was restored and recomputed
        self._transients: deque[tuple[int, int]] = deque()  # (iteration, suspect rank or -1) within the window
        self._places: list[dict[str, Any]] | None = None  # rank -> host and device, gathered at the first fault
        self._it: int | None = None  # the iteration begun and not yet judged
        self._batch: Any = None
        self._custom_id = False
        self._cross: tuple[Callable[[Any], Any], Any] | None = None  # (loss_fn, batch) of step(..., batch=...)
        self._loader: SkippableIterator[Any] | None = None  # the guard's wrapped iterator (see wrap())

    # -- the plain loop ---------------------------------------------------------------------------------------------
    def step(self, loss_fn: Callable[..., torch.Tensor], batch_id: Any = None, *, batch: Any = None) -> bool:
        """Run one iteration: snapshot, ``loss_fn()`` (forward: returns the loss), backward, check; on a failed check
        rerun and diagnose; step unless the batch is skipped. Returns whether a step was applied.

        ``batch_id`` names the batch in the quarantine (default: the batch's position in the stream: the iteration's
        index, or the position in :meth:`wrap`'s iterator). A quarantined batch is skipped without running
        ``loss_fn``. With ``batch`` (the iteration's inputs: tensors in lists, tuples and dicts) ``loss_fn(batch)`` is
        called instead of ``loss_fn()``, so that ``cross_check`` can compute the batch on another rank.

        Example::

            for i, (x, y) in enumerate(loader):
                triage.step(lambda: F.cross_entropy(model(x), y), batch_id=i)
        """
        who = f"{type(self).__name__}.step"
        if not callable(loss_fn):
            raise RewindTypeError(f"{who} takes a function that returns the loss, got {type(loss_fn).__name__}.")
        if not self.begin(batch_id):
            return False
        fn = loss_fn if batch is None else (lambda: loss_fn(batch))
        self._cross = (loss_fn, batch) if batch is not None else None
        try:
            loss = self._run(fn, who)
            return self.judge(loss, lambda: self._run(fn, who))
        finally:
            self._it, self._cross = None, None

    def wrap(self, iterable: Iterable[T]) -> Iterable[T]:
        """With a ``guard``: its :meth:`~torchrewind.policies.Guard.wrap` (so a roll-back can skip the next batches);
        the default batch id is then the batch's position in ``iterable``, skipped batches counted. Without a guard:
        ``iterable`` itself.

        Example::

            for x, y in triage.wrap(loader): triage.step(lambda: F.cross_entropy(model(x), y))
        """
        if self.guard is None:
            return iterable
        self._loader = self.guard.wrap(iterable)
        return self._loader

    def _run(self, loss_fn: Callable[[], torch.Tensor], who: str) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise RewindTypeError(f"{who}: loss_fn() must return the loss as a tensor that requires grad.")
        loss.backward()
        return loss.detach()

    # -- the protocol (plain loop and framework callbacks) ------------------------------------------------------------
    def begin(self, batch_id: Any = None) -> bool:
        """Start an iteration: record the state it starts from (the undo point of its step). Returns False when its
        batch is quarantined: then do not let its step stand (a plain loop skips it; a callback undoes it).

        Example (a loop that takes the step itself; :meth:`step` does all of this)::

            if triage.begin(i):
                loss = loss_fn(); loss.backward()
                if triage.judge(loss, rerun=lambda: ..., framework="before_step"): opt.step()
        """
        self.last, self.reran = None, False
        self._custom_id = batch_id is not None
        it = self.iteration
        pos = it if self._loader is None else self._loader.seen + self._loader.skipped - 1  # the batch just drawn
        self._batch = pos if batch_id is None else plain_id(batch_id, f"{type(self).__name__}.begin")
        self.iteration += 1
        self.rw.snapshot()
        if self._quarantined():
            self._it = None
            self.log.add(Event(it, self.steps, "skipped", None, None, lrs(self.optimizer),
                               f"quarantined batch {self._batch!r}", extra={"batch": self._batch}))  # fmt: skip
            return False
        self._it = it
        return True

    def judge(
        self, loss: torch.Tensor | float, rerun: Callable[[], torch.Tensor | float], *, framework: str | None = None
    ) -> bool:
        """Check the iteration begun with :meth:`begin`, after its backward; on a failed check restore its start, call
        ``rerun()`` (forward and backward again on the same batch; returns the loss) and diagnose. Returns whether the
        iteration's step stands.

        ``framework``: ``None`` — the triage takes the step (plain loop); ``"before_step"`` — judged before a
        framework's step: after a False the framework still steps, so undo that with ``rw.revert()`` after it;
        ``"after_step"`` — the framework already stepped (its step is undone and, after a rerun that passes, taken
        again here; see :attr:`reran`).

        Example::

            stood = triage.judge(loss, rerun=closure, framework="after_step")
        """
        who = f"{type(self).__name__}.judge"
        check_choice("framework", framework, FRAMEWORK, who)
        if self._it is None:
            raise RewindError(f"{who}: no iteration was begun (call begin() at its start, before forward).")
        if self.guard is not None and framework is not None:
            raise RewindValueError(f"{who}: a guard takes the steps itself; it works with step(loss_fn) only.")
        it, self._it = self._it, None
        first, v, gn = self._measure(loss, who)
        reason = self._check(v, gn)
        if not reason:
            if self.report_every and (it + 1) % self.report_every == 0:
                return self._report(first, rerun, framework, v, gn, it, who)
            return self._apply(loss, v, gn, it, take=framework is None)
        return self._triage(first, rerun, framework, v, gn, reason, it, who)

    def cancel(self) -> None:
        """Forget the iteration begun with :meth:`begin` without judging it (e.g. a framework took no step); its
        step, if any, stands."""
        self._it = None

    # -- measuring and checking -------------------------------------------------------------------------------------
    def _measure(self, loss: Any, who: str, checksum: bool = False) -> tuple[Outcome, float, float | None]:
        """This rank's outcome, and the loss averaged over ranks and the global gradient norm (one collective)."""
        o = Outcome.of(loss, self.optimizer, self.rw.group, grad_norm=self.check_grads, checksum=checksum, who=who)
        v, sq = self._agree([o.loss, o.grad_sq or 0.0])
        return o, v, (math.sqrt(sq) if self.check_grads else None)

    def _agree(self, values: list[float], rows: list[float] = ()) -> Any:
        """``values[0]`` averaged and ``values[1:]`` summed over the ranks, and ``rows`` (this rank's row of a
        table) gathered into a table indexed by rank — in one float64 all-reduce. Without a group: the local values
        (and a one-row table when ``rows`` is given)."""
        group = self.rw.group
        world = world_size(group)
        rank = dist.get_rank(group) if group is not None else 0
        n = len(rows)
        table = [0.0] * (world * n)
        table[rank * n : (rank + 1) * n] = rows
        out = all_sum(group, [values[0] / world, *values[1:], *table]) if group is not None else [*values, *table]
        sums, flat = out[: len(values)], out[len(values) :]
        if not n:
            return sums
        return sums, [flat[r * n : (r + 1) * n] for r in range(world)]

    def _check(self, v: float, gn: float | None) -> str:
        """Why this iteration's numbers fail the check ("" if they pass)."""
        if self.guard is not None:
            d = self.guard.decide(v, gn)
            reason = ""
            if d.action != "apply":
                reason = d.reason or f"{type(self.guard).__name__} would {d.action.replace('_', ' ')}"
        else:
            reason = nonfinite_reason(v, gn)
            if not reason and self.detector is not None and self.detector.is_spike(v):
                reason = f"loss spike (z={self.detector.score(v):.1f})"
            if not reason and self.grad_detector is not None and gn is not None and self.grad_detector.is_spike(gn):
                reason = f"gradient-norm spike (z={self.grad_detector.score(gn):.1f})"
        if not reason and self.check is not None:
            r = self.check(v, gn)
            if r:
                reason = r if isinstance(r, str) else "check(loss, grad_norm) failed"
        return reason

    def _quarantined(self) -> bool:
        q = self.quarantine
        if q is None or not len(q):
            return False
        hit = self._batch in q
        if self.rw.group is not None and self._custom_id:  # ids are this rank's own: skip if any rank's is quarantined
            hit = all_sum(self.rw.group, [1.0 if hit else 0.0])[0] > 0
        return hit

    # -- outcomes ---------------------------------------------------------------------------------------------------
    def _apply(
        self, loss: Any, v: float, gn: float | None, it: int, *, take: bool, diag: dict[str, Any] | None = None
    ) -> bool:
        """The step stands: take it (if ``take``), learn from its numbers, log it."""
        if take and self.guard is not None:
            return self._to_guard(loss, diag)
        if take:
            self.rw.ensure_recorded()  # a no-op: begin() or the rerun recorded (kept for a Rewind used meanwhile)
            self.optimizer.step()
        if self.detector is not None:
            self.detector.update(v)
        if self.grad_detector is not None and gn is not None:
            self.grad_detector.update(gn)
        self.steps += 1
        self.consecutive = 0
        reason, extra = "", {}
        if diag is not None:
            reason = f"{diag['verdict']} ({diag['check']}): rerun passed, continued with it"
            extra = _event_extra(diag)
        elif self.reran:
            reason, extra = "determinism report rerun", {"rerun": "report"}
        self.log.add(Event(it, self.steps, "accepted", v, None, lrs(self.optimizer), reason, extra=extra))
        return True

    def _to_guard(self, loss: Any, diag: dict[str, Any] | None) -> bool:
        """Let the guard take (or refuse) the step as it would; annotate its log entry with the diagnosis."""
        n = len(self.log)
        stood = self.guard.step(loss)
        if diag is not None and len(self.log) > n:
            self.log.events[-1].extra.update(_event_extra(diag))
        if stood:
            self.steps += 1
            self.consecutive = 0
        return stood

    def _triage(
        self, first: Outcome, rerun: Callable[[], Any], framework: str | None, v: float, gn: float | None, reason: str,
        it: int, who: str,
    ) -> bool:  # fmt: skip
        if self.checksum:
            first = first.with_checksum(self.optimizer)  # the first run's gradients are still in .grad
        second, loss2 = self._rerun(rerun, who)
        loss_diff, grad_diff = first.differs(second, self.tolerance)
        rows = [float(loss_diff), float(grad_diff), float(not math.isfinite(second.loss))]
        (v2, sq2), table = self._agree([second.loss, second.grad_sq or 0.0], rows)
        gn2 = math.sqrt(sq2) if self.check_grads else None
        ranks = {k: [r for r, row in enumerate(table) if row[i]] for i, k in enumerate(("loss", "grads", "bad"))}
        reason2 = self._check(v2, gn2)
        if not ranks["loss"] and not ranks["grads"]:
            verdict = "reproducible"
        else:
            verdict = "transient" if not reason2 else "inconsistent"
        diag = self._diagnosis(it, reason, verdict, (v, gn), (v2, gn2), ranks, reason2)
        if verdict == "transient":
            self.transient += 1
            self._count_transient(it, diag)  # raises at the max_transient-th within the window
            diag["action"] = "continued"
            self._record(diag)
            return self._apply(loss2, v2, gn2, it, take=framework != "before_step", diag=diag)
        if verdict == "reproducible" and self.cross_check and self._cross is not None and self.rw.group is not None:
            self._cross_check(diag, ranks["bad"], second.loss, it, who)  # raises on a persistent device fault
        self.reproducible += 1
        self._quarantine_batch(it, reason, ranks["bad"], diag)
        if self.on_reproducible == "raise":
            self.rw.revert()
            diag["action"] = "raised"
            self._record(diag)
            raise ReproducibleFaultError(
                f"{type(self).__name__}: iteration {it} failed its check ({reason}) and the rerun from the exact same "
                f"state {'failed again identically' if verdict == 'reproducible' else 'failed again'}: the data or "
                f"the model, not the machine. Batch {self._batch!r}"
                + (f" is quarantined in {self.quarantine.path}" if self.quarantine and self.quarantine.path else "")
                + ". The state is back at the start of the iteration.",
                diag,
            )
        if self.on_reproducible == "rollback" and self.guard.decide(v2, gn2).action != "apply":
            n = len(self.log)
            self._to_guard(loss2, diag)
            diag["action"] = self.log.events[-1].kind if len(self.log) > n else "skipped"
            self._record(diag)
            return False
        self.rw.revert()  # as if the batch had never been drawn
        diag["action"] = "skipped"
        self._record(diag)
        self.consecutive += 1
        self.log.add(Event(it, self.steps, "skipped", v2, None, lrs(self.optimizer),
                           f"{verdict} ({reason}): batch skipped", extra=_event_extra(diag)))  # fmt: skip
        if self.consecutive >= self.max_consecutive:
            raise TriageError(
                f"{type(self).__name__}: {self.consecutive} iterations in a row failed their check reproducibly "
                f"(max_consecutive={self.max_consecutive}): that is the model (e.g. non-finite parameters, an lr "
                "far too high), not the data. The quarantine now holds these batches too; remove them from it "
                "before restarting if the data is fine.",
                diag,
            )
        return False

    def _rerun(self, rerun: Callable[[], Any], who: str) -> tuple[Outcome, Any]:
        """Restore the iteration's start and compute it again."""
        self.rw.revert()
        # record it again: the step that may follow is undone to the iteration's start (not to the rerun's forward)
        self.rw.snapshot()
        self.reran = True
        self.reruns += 1
        loss2 = rerun()
        return self._outcome(loss2, who, self.checksum), loss2

    def _cross_check(self, diag: dict[str, Any], bad: list[int], own_loss: float, it: int, who: str) -> None:
        """A failure that reproduced on its own device may still be that device's (a persistent fault). The state is
        replicated (DDP), so every rank restores the iteration's start and computes, forward only, the batch of the
        rank before it with that rank's RNG state; a batch whose loss another device does not reproduce bit for bit
        (``tolerance``) is a persistent fault of its own device: raise. Otherwise the data is confirmed."""
        loss_fn, batch = self._cross
        group = self.rw.group
        world, rank = world_size(group), dist.get_rank(group)
        self.rw.revert()
        mine = (_to(batch, torch.device("cpu")), torch.get_rng_state(), _cuda_rng(), own_loss)
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine, group=group)
        owner = (rank - 1) % world
        theirs, rng, cuda_rng, their_loss = every[owner]
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        with torch.no_grad():  # forward only: nothing to accumulate, no all-reduce to wait for
            v = Outcome.of(loss_fn(_to(theirs, _device(self.optimizer))), self.optimizer, grad_norm=False, who=who).loss
        self.rw.revert()  # the state (BatchNorm statistics, RNG) as at the iteration's start
        self.rw.snapshot()
        (_,), table = self._agree([0.0], [0.0 if same_number(v, their_loss, self.tolerance) else 1.0])
        # checker c computed the batch of rank c - 1. Judged: the ranks whose own result failed — a non-finite loss,
        # else the highest loss (what made the average fail). A faulty device also spoils the batch it checks, so
        # judging every rank would blame its neighbour too.
        losses = [e[3] for e in every]
        judged = bad or [max(range(world), key=lambda r: losses[r] if not math.isnan(losses[r]) else math.inf)]
        persistent = sorted((c - 1) % world for c, row in enumerate(table) if row[0] and (c - 1) % world in judged)
        places = self._where()
        diag["cross_check"] = {str((c - 1) % world): c for c in range(world) if (c - 1) % world in judged}
        if not persistent:
            return
        diag["verdict"], diag["action"] = "persistent", "raised"
        diag["suspects"] = [dict(places[r], rank=r) for r in persistent]
        self._record(diag)
        who_ = "; ".join(f"rank {r} on {places[r]['host']} ({places[r]['device']})" for r in persistent)
        raise UnreliableDeviceError(
            f"{type(self).__name__}: iteration {it} failed its check ({diag['check']}) identically twice on {who_}, "
            f"but another rank computed the same batch from the same state normally: a persistent fault of that "
            "device. Save a checkpoint and restart without it (the state is back at the start of the iteration).",
            diag,
        )

    def _outcome(self, loss: Any, who: str, checksum: bool) -> Outcome:
        return Outcome.of(loss, self.optimizer, self.rw.group, grad_norm=self.check_grads, checksum=checksum, who=who)

    def _report(
        self, first: Outcome, rerun: Callable[[], Any], framework: str | None, v: float, gn: float | None, it: int,
        who: str,
    ) -> bool:  # fmt: skip
        """A determinism-report iteration: recompute it, record the differences, continue with the rerun."""
        saved = copy_grads(self.optimizer)
        second, loss2 = self._rerun(rerun, who)
        g_same, g_abs, g_rel = compare_grads(saved, self.optimizer)
        del saved
        l_abs = abs(first.loss - second.loss) if math.isfinite(first.loss - second.loss) else math.inf
        l_same = same_number(first.loss, second.loss)
        rows = [float(not l_same), l_abs, rel_diff(first.loss, second.loss), float(not g_same), g_abs, g_rel]
        (v2, sq2), table = self._agree([second.loss, second.grad_sq or 0.0], rows)
        gn2 = math.sqrt(sq2) if self.check_grads else None
        worst = [max(row[i] for row in table) for i in range(len(rows))]
        self.determinism.record_diff("loss", worst[0] == 0.0, worst[1], worst[2])
        if gn is not None and gn2 is not None:
            self.determinism.record("grad_norm", gn, gn2)
        self.determinism.record_diff("grads", worst[3] == 0.0, worst[4], worst[5])
        reason2 = self._check(v2, gn2)
        if reason2:  # the rerun is the faulty one: triage it against a third run
            return self._triage(second, rerun, framework, v2, gn2, reason2, it, who)
        return self._apply(loss2, v2, gn2, it, take=framework != "before_step")

    # -- diagnosis records ------------------------------------------------------------------------------------------
    def _diagnosis(
        self, it: int, reason: str, verdict: str, first: tuple[float, float | None], rerun: tuple[float, float | None],
        ranks: dict[str, list[int]], reason2: str,
    ) -> dict[str, Any]:  # fmt: skip
        places = self._where()
        suspects: list[int] = []
        if verdict != "reproducible":
            # the ranks whose own loss changed; else those whose gradients changed, unless that is every rank of
            # several (DDP averaged one rank's fault into all of them: it cannot be pinned)
            suspects = ranks["loss"] or (ranks["grads"] if len(ranks["grads"]) < len(places) or len(places) == 1
                                         else [])  # fmt: skip
        return {
            "iteration": it, "batch": self._batch, "check": reason, "verdict": verdict, "action": None,
            "first": {"loss": first[0], "grad_norm": first[1]}, "rerun": {"loss": rerun[0], "grad_norm": rerun[1]},
            "rerun_check": reason2, "loss_differs": ranks["loss"], "grads_differ": ranks["grads"],
            "suspects": [dict(places[r], rank=r) for r in suspects], "rank": _rank(), **places[_group_rank(self.rw)],
        }  # fmt: skip

    def _where(self) -> list[dict[str, Any]]:
        """Host and device of every rank of the group (gathered once, at the first fault: all ranks are there)."""
        if self._places is None:
            here = {"host": socket.gethostname(), "device": _device_name(self.optimizer)}
            group = self.rw.group
            if group is None:
                self._places = [here]
            else:
                out: list[Any] = [None] * world_size(group)
                dist.all_gather_object(out, here, group=group)
                self._places = out
        return self._places

    def _record(self, diag: dict[str, Any]) -> None:
        self.faults.append(diag)
        self.last = diag
        who = ", ".join(f"rank {s['rank']} on {s['host']} ({s['device']})" for s in diag["suspects"])
        where = f"; did not reproduce on {who}" if who else ""
        if diag["verdict"] == "transient" and not who:
            where = "; the gradients differed on every rank (the fault was in a backward pass or the all-reduce)"
        level = logging.WARNING if diag["action"] != "raised" else logging.ERROR
        logger.log(level, "iteration %d: %s; rerun: %s%s -> %s", diag["iteration"], diag["check"], diag["verdict"],
                   where, diag["action"])  # fmt: skip

    def _count_transient(self, it: int, diag: dict[str, Any]) -> None:
        for r in [s["rank"] for s in diag["suspects"]] or [-1]:
            self._transients.append((it, r))
        while self._transients and self._transients[0][0] <= it - self.window:
            self._transients.popleft()
        counts: dict[int, int] = {}
        for _, r in self._transients:
            counts[r] = counts.get(r, 0) + 1
        over = sorted(r for r, c in counts.items() if c >= self.max_transient)
        if not over:
            return
        self.rw.revert()  # leave the iteration undone: a checkpoint now is the state before it
        diag["action"] = "raised"
        self._record(diag)
        places = self._where()
        who = "; ".join(
            f"rank {r} on {places[r]['host']} ({places[r]['device']})" if r >= 0 else "an unidentified rank"
            for r in over
        )
        raise UnreliableDeviceError(
            f"{type(self).__name__}: {counts[over[0]]} transient faults within {self.window} iterations "
            f"(max_transient={self.max_transient}) on {who}: this device is unreliable. Results that do not "
            "reproduce from the same exact state are the machine's, not the training's: save a checkpoint and "
            "restart on other hardware (the state is back at the start of iteration "
            f"{it}).",
            diag,
        )

    def _quarantine_batch(self, it: int, reason: str, bad_ranks: list[int], diag: dict[str, Any]) -> None:
        q = self.quarantine
        if q is None:
            return
        group = self.rw.group
        if group is not None and self._custom_id:  # each rank its own batch: quarantine the bad ones (else all)
            ids: list[Any] = [None] * world_size(group)
            dist.all_gather_object(ids, self._batch, group=group)
            entries = [(ids[r], r) for r in (bad_ranks or range(len(ids)))]
        else:
            entries = [(self._batch, None)]
        for bid, r in entries:
            info = {"iteration": it, "reason": reason, "verdict": diag["verdict"]}
            q.add(bid, **(info if r is None else {**info, "rank": r}))
        diag["quarantined"] = [bid for bid, _ in entries]

    # -- state ------------------------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The settings a saved state must match (see :meth:`load_state_dict`)."""
        return {"check_grads": self.check_grads, "on_reproducible": self.on_reproducible,
                "max_transient": self.max_transient, "window": self.window, "max_consecutive": self.max_consecutive,
                "tolerance": self.tolerance, "checksum": self.checksum, "report_every": self.report_every,
                "cross_check": self.cross_check, "detector": self.detector is not None,
                "grad_detector": self.grad_detector is not None,
                "guard": type(self.guard).__name__ if self.guard is not None else None}  # fmt: skip

    _COUNTERS = ("iteration", "steps", "consecutive", "transient", "reproducible", "reruns")

    def _parts(self) -> dict[str, Any]:
        # the quarantine last: loading it only adds entries, so a later part that refuses cannot leave it half-done
        return {"detector": self.detector, "grad_detector": self.grad_detector, "guard": self.guard,
                "determinism": self.determinism, "log": self.log if self.guard is None else None,
                "quarantine": self.quarantine}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Settings, counters, the transient-fault window, every diagnosis record, the determinism report, the
        quarantined batches, the detectors' (or the guard's) state and the log, as plain data. Save it with the model
        and optimizer: a resumed run keeps counting transient faults in the same window and skips the same batches.

        Example::

            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "triage": triage.state_dict()}, path)
            triage.load_state_dict(torch.load(path)["triage"])
        """
        if self._it is not None:
            raise RewindError(f"{type(self).__name__}.state_dict() inside an iteration (after begin(), before "
                              "judge()); save between iterations.")  # fmt: skip
        parts = {k: (p.state_dict() if p is not None else None) for k, p in self._parts().items()}
        return {**header(self, self.settings()), **{k: getattr(self, k) for k in self._COUNTERS},
                "transients": [list(t) for t in self._transients], "faults": [dict(f) for f in self.faults],
                **parts}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` (same kind of object; with ``strict`` the same settings). The saved quarantine
        entries are added to those of the quarantine file. Refuses a malformed or mismatched state before changing
        anything."""
        who = f"{type(self).__name__}.load_state_dict"
        if self._it is not None:
            raise RewindError(f"{who} inside an iteration; load before it begins.")
        parts = self._parts()
        sd = check_state(self, state_dict, self.settings(), (*self._COUNTERS, "transients", "faults", *parts), strict,
                         who)  # fmt: skip
        counters = {k: check_int(k, sd[k], 0, who) for k in self._COUNTERS}
        window = check_type("transients", sd["transients"], (list, tuple), who, "a list of [iteration, rank]")
        if not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, int) for x in t) for t in window):
            raise RewindValueError(f"{who}: transients must be [iteration, rank] pairs.")
        faults = check_type("faults", sd["faults"], (list, tuple), who, "a list of diagnosis records")
        if not all(isinstance(f, dict) for f in faults):
            raise RewindValueError(f"{who}: faults must be diagnosis records (dicts).")
        load_all([(p, sd[k]) for k, p in parts.items() if p is not None and sd[k] is not None], strict)
        for k, v in counters.items():
            setattr(self, k, v)
        self._transients = deque((int(i), int(r)) for i, r in window)
        self.faults = [dict(f) for f in faults]


def _event_extra(diag: dict[str, Any]) -> dict[str, Any]:
    return {"diagnosis": diag["verdict"], "first_loss": diag["first"]["loss"], "batch": diag["batch"],
            "suspect_ranks": [s["rank"] for s in diag["suspects"]]}  # fmt: skip


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _group_rank(rw: Rewind) -> int:
    return dist.get_rank(rw.group) if rw.group is not None else 0


def _device(optimizer: torch.optim.Optimizer) -> torch.device:
    return next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))


def _to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in lists, tuples, dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _cuda_rng() -> torch.Tensor | None:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _device_name(optimizer: torch.optim.Optimizer) -> str:
    """The device the training runs on, as precisely as known (a GPU's name and UUID identify the physical board)."""
    dev = _device(optimizer)
    if dev.type != "cuda":
        return str(dev)
    props = torch.cuda.get_device_properties(dev)
    uuid = getattr(props, "uuid", None)
    return f"{dev} ({props.name}{f', {uuid}' if uuid is not None else ''})"
