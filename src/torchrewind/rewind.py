"""The public entry point: :class:`Rewind` (undo/redo/snapshot/retry) and :class:`Trial` (transactions).

Rewind is a thin front over the core (:mod:`torchrewind.core`): a :class:`~.core.tracker.Tracker` keeps the training
state bound to arenas, a :class:`~.core.snapshot.Recorder` copies it into and out of slots, a
:class:`~.core.ring.Ring` says which slot holds which point, an optional
:class:`~.core.overlap.OverlappedRecorder` records in the background, and :class:`~.tiers.Tiers` keep older points.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ._checks import check_int
from .core.budget import Budget, value_nbytes
from .core.config import Config
from .core.overlap import OverlappedRecorder
from .core.ring import Ring
from .core.rng import RNGState
from .core.snapshot import Recorder, Slot
from .tiers.state import apply_tree, check_tree, state_tree
from .core.tracker import Tracker, iter_modules
from .distributed import resolve_group
from .errors import RewindError, RewindTypeError, RewindValueError
from .tiers import Checkpoint, Tiers, copy_images, restore_plan

# Where the live state is relative to optimizer steps (one explicit per-step state, as GradScaler keeps per optimizer):
_READY = "ready"  # no point recorded for the next step: its pre-step hook records one (auto=True)
_RECORDED = "recorded"  # a point was recorded since the last step: it stays the next step's boundary
_STEPPING = "stepping"  # inside optimizer.step(), between the pre- and post-step hooks


class Rewind:
    """Exact, bounded-memory undo/redo of a whole training state.

    Tracks parameters and buffers of ``model``, every tensor and Python value in ``optimizer.state``, the
    optimizer's ``param_groups`` (hyperparameters included), ``schedulers`` (anything with
    ``state_dict``/``load_state_dict``), a ``torch.amp.GradScaler`` and the RNGs. By default a step pre-hook records
    the state just before every ``optimizer.step()``; :meth:`undo` brings it back bit for bit.

    Example::

        rw = Rewind(model, optimizer, capacity=4)
        loss.backward(); optimizer.step()
        if worse: rw.retry(lr=lambda lr: lr / 2)   # undo, halve the lr, step again with the same gradients

    Args:
        model: an ``nn.Module``, an iterable of modules, or ``None``. The optimizer's parameters are always
            tracked, even those not in ``model``.
        optimizer: any ``torch.optim.Optimizer`` (including user subclasses).
        schedulers: objects with ``state_dict``/``load_state_dict`` (all of ``torch.optim.lr_scheduler``, data
            samplers, ...), restored together with the rest.
        scaler: a ``torch.amp.GradScaler`` (scale, growth tracker and per-step bookkeeping are restored).
        capacity: how many steps can be undone.
        rng: ``True`` restores the torch CPU and CUDA generators; ``"all"`` adds Python's ``random`` and NumPy's
            global generator; ``False`` leaves RNGs alone.
        grads: also record ``.grad`` so that :meth:`undo` brings gradients back (lets :meth:`retry` work after
            ``zero_grad()``).
        redo: keep the undone state so :meth:`redo` can return to it. Costs one extra copy per :meth:`undo` from
            a freshly stepped state, and one extra history slot of memory.
        auto: record automatically before every ``optimizer.step()``. With ``auto=False`` call :meth:`snapshot`
            yourself (steps are still noticed, so undo/redo bookkeeping stays right).
        max_bytes: a budget for the device history (ring snapshots) in bytes. Without a host tier, a larger
            history is refused with :class:`RewindError`; with one (``tiers=Tiers(host=HostArchive(...))``) the
            device tier keeps fewer undo points instead (a ``RuntimeWarning`` says how many) and older points stay
            reachable in the host tier through :meth:`rollback_to`.
        verify: re-scan every tracked tensor at each snapshot instead of the O(1) change check (slower; only
            needed if you replace optimizer-state tensors by hand while keeping references to the old ones).
        generators: extra ``torch.Generator`` objects to restore (e.g. a DataLoader's).
        storage: ``"device"`` keeps the ring's snapshots next to the state; ``"host"`` keeps those of CUDA tensors in
            pinned CPU memory (asynchronous device-to-host copies; frees GPU memory, restores cross PCIe).
        overlap: copy parameters and optimizer state for the next undo point in the background, from the end of
            one ``optimizer.step()`` to the start of the next (a worker thread on CPU, a side stream on CUDA), so
            the copy overlaps forward and backward; buffers, ``param_groups``, RNG and the rest are still recorded
            just before the step. Requires that between steps nothing but forward/backward touches parameters or
            optimizer state in place (no weight clamping or manual edits after ``step()``; do those before it).
            Costs one extra snapshot buffer (the copy's target until it is complete).
        group: the process group over which policies agree (losses averaged, gradient norms and "bad" flags
            reduced, so all ranks undo together): ``"auto"`` uses the default group when torch.distributed is
            initialized, ``None`` lets each rank decide alone. Snapshots are always of this rank's own tensors.
        shard: with replicated state (DDP), keep only this rank's 1/world of every snapshot's parameter, buffer and
            optimizer-state bytes: history memory drops by the group's size, and undo/redo/rollback rebuild the
            state with one broadcast per rank. Every rank of ``group`` must then undo/redo together (the policies
            do). Not for FSDP2, whose state is already sharded; not with ``overlap``.
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module] | None,
        optimizer: torch.optim.Optimizer,
        schedulers: Sequence[Any] | Any = (),
        scaler: torch.amp.GradScaler | None = None,
        capacity: int = 1,
        rng: bool | str = True,
        *,
        grads: bool = False,
        redo: bool = True,
        auto: bool = True,
        max_bytes: int | None = None,
        verify: bool = False,
        generators: Sequence[torch.Generator] = (),
        overlap: bool = False,
        tiers: Tiers | None = None,
        storage: str = "device",
        group: Any = "auto",
        shard: bool = False,
    ) -> None:
        group = resolve_group(group)
        cfg = Config.check(
            optimizer=optimizer, capacity=capacity, rng=rng, grads=grads, redo=redo, auto=auto, max_bytes=max_bytes,
            verify=verify, overlap=overlap, storage=storage, shard=shard, generators=generators, tiers=tiers,
            group=group,
        )  # fmt: skip
        objects = _check_schedulers(schedulers, optimizer)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise RewindTypeError(
                f"scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}; pass LR schedulers "
                "and other stateful objects through schedulers=."
            )
        modules = iter_modules(model)

        self.config = cfg
        self.optimizer = optimizer
        self.tiers = tiers or Tiers(device=cfg.capacity)
        self.group = group  # policies reduce what they decide on over this process group
        self._modules = modules
        self._scaler = scaler
        self._ring = Ring(cfg.capacity, cfg.redo)
        self._step = 0  # optimizer steps taken by the live state (restored by undo/redo)
        self._phase = _READY
        self._sandbox: Sandbox | None = None  # the active sandbox(), holding its entry state
        # The budget is a plain object (no reference back to this Rewind): the tracker asks it before moving
        # anything, and this Rewind applies its answer ("keep fewer device points") after the record in progress.
        self._budget = Budget(cfg.max_bytes, can_shrink=self.tiers.host is not None)
        self._shard = (dist.get_rank(group), dist.get_world_size(group), group) if cfg.shard else None
        self._budget.world = self._shard[1] if self._shard else 1
        self._budget.grads = cfg.grads
        rng_state = RNGState(torch_rng=bool(cfg.rng), python=cfg.rng == "all", numpy=cfg.rng == "all",
                             generators=cfg.generators)  # fmt: skip
        if cfg.max_bytes is not None:
            self._budget.fixed = value_nbytes([
                rng_state.capture(), [o.state_dict() for o in objects], vars(scaler) if scaler is not None else None,
                [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            ])  # fmt: skip
        self._shape_budget()
        self._tracker = Tracker(modules, optimizer, verify=cfg.verify, budget=self._budget)
        self._recorder = Recorder(self._tracker, optimizer, objects, scaler, rng_state, cfg.grads)
        self._recorder.host_slots = cfg.storage == "host"
        self._recorder.shard = self._shard
        self._overlap = OverlappedRecorder(self._recorder) if cfg.overlap else None
        self._apply_budget()  # the state may not fit max_bytes even before the first record
        if self.tiers.disk is not None:
            self.tiers.disk.bind_rank()  # one directory per rank once torch.distributed is up
        # Hooks never traced by torch.compile: they are Python bookkeeping around the step (a compiled
        # ``optimizer.step`` graph-breaks at them instead of guarding on their state and recompiling every step).
        self._hook = optimizer.register_step_pre_hook(torch.compiler.disable(self._pre_step))
        self._post_hook = optimizer.register_step_post_hook(torch.compiler.disable(self._post_step))

    # ------------------------------------------------------------------ hooks
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._sandbox is not None:  # nothing is recorded inside a sandbox
            self._phase = _STEPPING
            return
        if self.config.auto:
            self.ensure_recorded()
        self._phase = _STEPPING  # a framework callback inside step(closure) can tell the step is recorded
        self._ring.step_started()

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._step += 1
        self._phase = _READY
        if self._overlap is not None and self.config.auto and self._sandbox is None:
            # record the state the next step will be undone to in the background (completed before that step)
            self._overlap.start(self._ring.cur + 1)

    def _settle(self) -> None:
        """Wait for a background copy and drop it (before anything else reads or writes the arenas)."""
        if self._overlap is not None:
            self._overlap.settle()

    def _refuse_in_step(self, what: str) -> None:
        """Undo, redo, snapshot and roll-backs cannot run inside ``optimizer.step()`` (e.g. from an LBFGS
        closure): the step is half-done and its point is already recorded. A step that raised never reached its
        post-step hook; then the flag is stale, and the request (typically: undo the failed step) goes ahead.
        Nor inside :meth:`sandbox`, which records nothing."""
        if self._sandbox is not None:
            raise RewindError(
                f"{what} was called inside rw.sandbox(), which records nothing and restores its entry state on exit; "
                "leave the sandbox first."
            )
        if self._phase != _STEPPING:
            return
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name == "wrapper" and f.f_locals.get("self") is self.optimizer:
                raise RewindError(
                    f"{what} was called inside optimizer.step() (e.g. from its closure); the step is half-done. "
                    "Call it after the step returns."
                )
            f = f.f_back
        self._phase = _READY  # the last step raised: it is over

    def _apply_budget(self) -> None:
        """Apply the budget's answer: keep fewer device points (after the record in progress, if any)."""
        fit, self._budget.shrink_to = self._budget.shrink_to, None
        if fit is None or fit >= self._ring.capacity:
            return
        self._ring = self._ring.shrunk(fit)
        self._shape_budget()

    def _shape_budget(self) -> None:
        ring = self._ring
        self._budget.capacity = ring.capacity
        self._budget.redo_slot = ring.nslots > ring.capacity
        self._budget.extra_slots = ring.nslots - ring.capacity + (self.config.overlap is True)

    # ------------------------------------------------------------------ the interface policies build on
    def ensure_recorded(self) -> None:
        """Make sure the next optimizer step can be undone: record the live state now, unless a point was recorded
        since the last step (that point stays the step's boundary). Policies call it before they step, so they work
        with ``auto=False`` too. Inside ``optimizer.step()`` it does nothing: that step is already recorded.

        Example::

            rw = Rewind(model, opt, auto=False)
            rw.ensure_recorded(); opt.step()     # undoable
            rw.ensure_recorded()                 # records again: a step was taken since
        """
        if self._phase == _READY and self._sandbox is None:
            self.snapshot()

    def drop_pending(self) -> None:
        """Forget that a point was recorded for the next step, so the next step (or :meth:`ensure_recorded`) records
        afresh. For a point whose step never came (e.g. a GradScaler skipped it) while the state moved on since.

        Example::

            rw.ensure_recorded(); scaler.step(opt)       # may skip the step on inf gradients
            if rw.step == before: rw.drop_pending()
        """
        if self._phase == _RECORDED:
            self._phase = _READY

    @property
    def in_step(self) -> bool:
        """True while this optimizer's ``step()`` runs (between its pre- and post-step hooks), e.g. inside a
        ``step(closure)``: the pre-step hook has already recorded the point the step will be undone to."""
        return self._phase == _STEPPING

    def revert(self) -> None:
        """Restore the point the live state derives from: the last one recorded or restored. After a step that is
        :meth:`undo`; before one (say, a snapshot at the top of the iteration, then forward and backward) it throws
        away what happened since: BatchNorm statistics, RNG draws, edits.

        Example::

            rw.snapshot(); loss = model(x).sum(); loss.backward()
            if not torch.isfinite(loss): rw.revert()     # as if the forward pass never ran
        """
        self._refuse_in_step("revert()")
        if self._ring.cur < 0:
            raise RewindError("revert(): nothing has been recorded yet; take an optimizer step or call snapshot().")
        self._goto(self._ring.cur)

    @property
    def state_nbytes(self) -> int:
        """Bytes of live training state one snapshot copies in bulk (parameters, buffers, optimizer state)."""
        return sum(a.used for a in self._tracker.arenas.values())

    # ------------------------------------------------------------------ public API
    def snapshot(self) -> None:
        """Record the live state now, as the point the next step will be undone to.

        Example::

            rw = Rewind(model, opt, auto=False)
            rw.snapshot()                       # top of the iteration, before forward (captures RNG for dropout)
            loss = model(x).sum(); loss.backward(); opt.step()
        """
        self._refuse_in_step("snapshot()")
        ring = self._ring
        point = ring.live_point()
        slot = self._overlap.complete(point, ring.clean, self._step) if self._overlap is not None else None
        if slot is not None:
            self._overlap.staging = ring.swap(point, slot)  # the evicted ring slot becomes the next staging slot
        else:
            slot = ring.slot(point)
            self._tracker.ensure()
            self._recorder.prepare(slot)
            try:
                self._recorder.capture(slot)
            except BaseException:
                ring.forget(point)
                raise
            slot.step = self._step
        ring.record()
        self._phase = _RECORDED
        self._to_lower_tiers(slot)
        self._apply_budget()  # max_bytes was exceeded while recording (e.g. the optimizer state appeared)

    def undo(self, n: int = 1) -> None:
        """Go back ``n`` steps: the state just before the ``n``-th last recorded step, bit for bit.

        Example::

            optimizer.step()
            rw.undo()            # parameters, optimizer state, schedulers, scaler and RNG as before the step
            rw.redo()            # and forward again
        """
        self._refuse_in_step("undo()")
        recorded, target = self._ring.plan_undo(n)
        self._move(recorded, target)

    def redo(self, n: int = 1) -> None:
        """Go forward ``n`` undone steps (possible until the next step or snapshot).

        Example::

            rw.undo(2); rw.redo(); rw.redo()   # back where we started
        """
        self._refuse_in_step("redo()")
        target = self._ring.plan_redo(n)
        self._move(None, target)

    def retry(self, closure: Callable[[], Any] | None = None, **hparams: Any) -> Any:
        """Undo the last step, change hyperparameters in every param group, and step again.

        Each keyword is a param-group key (``lr``, ``momentum``, ``betas``, ``weight_decay``...) set to a value,
        or to a function of the old value. Uses the gradients present now (or those recorded with
        ``grads=True``); pass ``closure`` for optimizers that need one. Returns what ``optimizer.step`` returns.

        Example::

            loss.backward(); optimizer.step()
            if evaluate() > before:
                rw.retry(lr=lambda lr: lr * 0.5)
        """
        self._refuse_in_step("retry()")
        groups = self.optimizer.param_groups
        for k in hparams:
            if k == "params" or any(k not in g for g in groups):
                valid = sorted({k for g in groups for k in g if k != "params"})
                raise RewindValueError(f"retry({k}=...): not a hyperparameter of every param group; valid: {valid}.")
        if closure is None and not self.config.grads and all(p.grad is None for p in self._tracker.params):
            raise RewindError(
                "retry() needs gradients, but every .grad is None (zero_grad() ran?). Call retry before "
                "zero_grad(), build the Rewind with grads=True, or pass a closure that recomputes the loss."
            )
        self.undo()
        for g in groups:
            for k, v in hparams.items():
                new = v(g[k]) if callable(v) else v
                old = g[k]
                if isinstance(old, torch.Tensor) and not isinstance(new, torch.Tensor):
                    old.fill_(new)  # keep tensor hyperparameters (fused/capturable optimizers) as tensors
                else:
                    g[k] = new
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    @contextmanager
    def sandbox(self) -> Iterator[Sandbox]:
        """Run anything (steps, lr sweeps, trial branches, extra forward passes) and leave no trace: on exit, even
        by an exception, the training state is exactly what it was at entry — parameters, buffers, optimizer state,
        hyperparameters, schedulers, scaler, RNG and ``.grad`` — and so are the history and :attr:`step`. Inside,
        nothing is recorded (undo/redo/snapshot raise); ``box.restore()`` goes back to the entry state at any time.
        Costs one copy of the state while it lasts.

        Example::

            with rw.sandbox() as box:
                for lr in (1e-3, 1e-2): ...; box.restore()     # try things, each from the same start
            opt.step()                                          # as if the block never ran
        """
        self._refuse_in_step("sandbox()")
        self._settle()
        self._tracker.ensure()
        box = Sandbox(self)
        box._capture()
        self._sandbox = box
        try:
            yield box
        finally:
            self._sandbox = None
            box.restore()
            box._slot = None  # frees the copy

    def trial(self) -> Trial:
        """A transaction: record now; an exception inside the block, or :meth:`Trial.rollback`, restores it.

        Example::

            with rw.trial() as t:
                optimizer.step()
                if val_loss() > best: t.rollback()
        """
        return Trial(self)

    def track(self, obj: Any) -> None:
        """Also record and restore ``obj`` (anything with ``state_dict``/``load_state_dict``) from now on, e.g. a
        data sampler or a policy's statistics. Snapshots taken earlier leave it as it is.

        Example::

            rw = Rewind(model, opt)
            rw.track(sampler)            # undo() now also rewinds the sampler
        """
        (checked,) = _check_schedulers([obj], self.optimizer)
        if any(o is checked for o in self._recorder.objects):
            return
        self._recorder.objects.append(checked)

    def resync(self) -> None:
        """Re-scan the model and optimizer now (automatic in nearly all cases; see ``verify``)."""
        self._tracker.sync()
        self._apply_budget()

    def rollback_to(self, step: int) -> int:
        """Restore the newest recorded state at or before optimizer step ``step`` (see :attr:`step`), from
        whichever tier holds it (device ring, host archive, disk), and return the step it has.

        A restore from the host or disk tier starts a fresh device history there (nothing to undo or redo). In a
        fresh process on a ``DiskCheckpoints(resume=True)`` directory it goes forward to the earlier run's checkpoints:
        ``rw.rollback_to(ck.latest or 0)`` resumes after a crash, and :attr:`step` continues from there.

        Example::

            if spiked:
                got = rw.rollback_to(rw.step - 100)     # e.g. 96: the newest point kept at or before
        """
        check_int("step", step, None, "rollback_to")
        self._refuse_in_step("rollback_to()")
        self._settle()
        found = self.tiers.find(step, self._ring_points(), self._step, self.group, self.held_steps)
        if found.source == "ring":
            self._goto(found.handle)
        elif found.source == "host":
            devices = {k: a.device for k, a in self._tracker.arenas.items()}
            self._recorder.restore(self.tiers.host.materialize(found.handle, devices))
            self._restart_history(found.step)
        elif found.source == "disk":
            disk = self.tiers.disk
            read = getattr(disk, "read", None)  # a DiskCheckpoints: arena images can be copied back whole
            self._apply_tree(read(found.step, reuse_buffer=True) if read else disk.load(found.step, reuse_buffer=True))
            self.tiers.disk.loaded(found.step)  # from here on this run owns the directory's history
            # A fresh device history at the restored state, in the old ring's slots: their buffers are reused (a new
            # ring allocates every slot again: 1.2 s of page faults and frees for 0.3 GB, measured; the restart is
            # then one arena copy). The same belongs in Ring.restarted() for the host branch (for the lead).
            old, self._ring = self._ring, self._ring.restarted()
            for point in range(self._ring.nslots):
                self._ring.swap(point, old.slot(point))
            self._step = found.step
            self._phase = _READY
            self.snapshot()
        return found.step

    def held_steps(self) -> dict[str, list[int]]:
        """The steps (see :attr:`step`) of the recorded points each tier holds, ascending: what :meth:`rollback_to`
        can reach. ``{"device": [...], "host": [...], "disk": [...]}`` (tiers that exist).

        Example::

            oldest = min(min(v) for v in rw.held_steps().values() if v)
        """
        self._settle()
        have = {"device": sorted({s for s, _ in self._ring_points()})}
        if self.tiers.host is not None:
            have["host"] = self.tiers.host.steps()
        if self.tiers.disk is not None:
            self.tiers.disk.wait()
            have["disk"] = self.tiers.disk.steps()
        return have

    def _ring_points(self) -> list[tuple[int, int]]:
        """(step, point) of every point the device ring holds."""
        return self._ring.held()

    def _restart_history(self, step: int) -> None:
        """After a restore from a lower tier: a fresh device history that starts at the restored state."""
        self._step = step
        self._ring = self._ring.restarted()
        self._phase = _READY
        self.snapshot()

    def _to_lower_tiers(self, slot: Slot) -> None:
        """A point was recorded in the ring: copy it to the host and disk tiers when they want it."""
        self.tiers.record(slot, self._tracker.arenas, self._recorder.wait_for_host, self._state_tree)

    def _state_tree(self) -> dict[str, Any]:
        """The live state as plain state_dicts (what the disk tier writes and loads into)."""
        r = self._recorder
        return state_tree(self._modules, self.optimizer, r.objects, self._scaler, r.rng)

    def _apply_tree(self, loaded: dict[str, Any] | Checkpoint) -> None:
        """Load a state tree (or a verified :class:`Checkpoint`) into the live objects. A checkpoint whose arena images
        match the live arenas is copied back with one copy per arena; its tensors then load into themselves (free)."""
        r = self._recorder
        tree = loaded.tree if isinstance(loaded, Checkpoint) else loaded
        check_tree(tree, self._modules, self.optimizer, r.objects)  # before anything changes
        if isinstance(loaded, Checkpoint):
            self._tracker.ensure()
            plan = restore_plan(loaded, self._state_tree(), [a.words() for a in self._tracker.arenas.values()])
            if plan is not None:
                copies, tree = plan
                del plan
                copy_images(copies)  # the verified images into the arenas, one copy each
        apply_tree(tree, self._modules, self.optimizer, r.objects, self._scaler, r.rng)
        self._tracker.ensure()  # bind whatever load_state_dict replaced

    @property
    def nbytes_by_tier(self) -> dict[str, int]:
        """Bytes of history per tier: ``device`` (the ring), ``host`` (archive), ``disk`` (complete checkpoints)."""
        host, disk = self.tiers.host, self.tiers.disk
        return {
            "device": self.nbytes,
            "host": host.nbytes if host is not None else 0,
            "disk": disk.nbytes if disk is not None else 0,
        }

    def close(self) -> None:
        """Stop recording (removes the step hooks). Tensors stay where they are and keep their values; undo/redo
        still work. Drop the Rewind too and its arenas are freed as soon as no tensor lives in them (a new Rewind on
        the same tensors moves them into its own arenas)."""
        self._hook.remove()
        self._post_hook.remove()
        if self.tiers.host is not None:
            self.tiers.host.close()
        if self.tiers.disk is not None:
            self.tiers.disk.wait()
        if self._overlap is not None:
            self._overlap.close()

    def __len__(self) -> int:
        """How many steps can be undone now."""
        return self._ring.undo_depth()

    def __bool__(self) -> bool:
        # A Rewind is always truthy (``if rw:`` means "is there a Rewind"), even with nothing to undo yet.
        return True

    @property
    def capacity(self) -> int:
        """How many steps the device ring can undo (``capacity=``, or fewer if ``max_bytes`` made it shrink)."""
        return self._ring.capacity

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        """The modules whose parameters and buffers this Rewind restores (``model=``), e.g. for a policy that watches
        their buffers. Read-only: to track more state, use :meth:`track`."""
        return tuple(self._modules)

    @property
    def shard(self) -> bool:
        """Whether each rank keeps 1/world of every snapshot (``shard=True``, replicated state)."""
        return self.config.shard

    @property
    def max_bytes(self) -> int | None:
        return self.config.max_bytes

    @property
    def step(self) -> int:
        """How many optimizer steps the live state has taken since the Rewind was built (undo lowers it)."""
        return self._step

    @property
    def redo_depth(self) -> int:
        """How many undone steps :meth:`redo` can go forward."""
        return self._ring.redo_depth()

    @property
    def nbytes(self) -> int:
        """Bytes of history held (snapshot buffers), on top of the live training state."""
        return self._ring.nbytes + (self._overlap.staging.nbytes if self._overlap is not None else 0)

    def __repr__(self) -> str:
        return (
            f"Rewind(capacity={self.capacity}, undo={len(self)}, redo={self.redo_depth}, "
            f"nbytes={self.nbytes}, tensors={sum(len(a.entries) for a in self._tracker.arenas.values())})"
        )

    # ------------------------------------------------------------------ internals
    def _move(self, recorded: int | None, target: int) -> None:
        """Record the live state as point ``recorded`` (if not None), then restore point ``target``."""
        ring = self._ring
        done = None
        if recorded is not None and self._overlap is not None:
            done = self._overlap.complete(recorded, ring.clean, self._step)
            if done is not None:
                self._overlap.staging = ring.swap(recorded, done)
        self._settle()
        if recorded is not None and done is None:
            slot = ring.slot(recorded)
            self._tracker.ensure()
            self._recorder.prepare(slot)
        try:
            if recorded is not None and done is None:
                self._recorder.capture(slot)
                slot.step = self._step
            restored = ring.slot(target)
            self._recorder.restore(restored)
        except BaseException:
            if recorded is not None:
                ring.forget(recorded)
            raise
        ring.moved(recorded, target)
        self._step = restored.step
        self._phase = _READY
        self._apply_budget()

    def _goto(self, point: int) -> None:
        recorded, target = self._ring.plan_goto(point)
        self._move(recorded, target)


class Sandbox:
    """The handle of :meth:`Rewind.sandbox`: :meth:`restore` puts the entry state back (any number of times)."""

    def __init__(self, rewind: Rewind) -> None:
        self._rw = rewind
        self._slot: Slot | None = Slot()
        self._entry = (rewind._step, rewind._phase)

    def _with_grads(self, fn: Callable[[Slot], None]) -> None:
        rec = self._rw._recorder
        grads, rec.grads = rec.grads, True  # a sandbox gives .grad back too
        try:
            fn(self._slot)
        finally:
            rec.grads = grads

    def _capture(self) -> None:
        rec = self._rw._recorder
        rec.prepare(self._slot)
        self._with_grads(rec.capture)

    def restore(self) -> None:
        """Put the state back as it was when the sandbox was entered (``.grad``, RNG and step counter included)."""
        if self._slot is None:
            raise RewindError("Sandbox.restore() after the with-block ended: the entry state was released.")
        rw = self._rw
        rw._settle()
        self._with_grads(rw._recorder.restore)
        rw._step, rw._phase = self._entry


class Trial:
    """A transaction on a :class:`Rewind`. Use as ``with rw.trial() as t:``; see :meth:`Rewind.trial`."""

    def __init__(self, rewind: Rewind) -> None:
        self._rw = rewind
        self._point: int | None = None
        self.rolled_back = False

    def __enter__(self) -> Trial:
        self._rw.snapshot()
        self._point = self._rw._ring.cur
        return self

    def rollback(self) -> None:
        """Restore the state recorded when the block was entered."""
        if self._point is None:
            raise RewindError("rollback() outside of the with-block: use `with rw.trial() as t:`.")
        self._rw._refuse_in_step("Trial.rollback()")
        self._rw._goto(self._point)
        self.rolled_back = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not self.rolled_back:
            self.rollback()
        self._point = None


def _check_schedulers(schedulers: Any, optimizer: torch.optim.Optimizer) -> list[Any]:
    if schedulers is None:
        return []
    if hasattr(schedulers, "state_dict") and hasattr(schedulers, "load_state_dict"):
        schedulers = [schedulers]
    if isinstance(schedulers, torch.amp.GradScaler):
        raise RewindTypeError("a GradScaler was passed as schedulers; pass it as scaler= instead.")
    try:
        objects = list(schedulers)
    except TypeError:
        raise RewindTypeError(
            f"schedulers must be a sequence of objects with state_dict/load_state_dict, got "
            f"{type(schedulers).__name__}."
        ) from None
    for i, s in enumerate(objects):
        if isinstance(s, torch.amp.GradScaler):
            raise RewindTypeError(f"schedulers[{i}] is a GradScaler; pass it as scaler= instead.")
        if not (callable(getattr(s, "state_dict", None)) and callable(getattr(s, "load_state_dict", None))):
            raise RewindTypeError(
                f"schedulers[{i}] ({type(s).__name__}) has no state_dict()/load_state_dict(); only such objects "
                "can be restored."
            )
        opt = getattr(s, "optimizer", None)
        while opt is not optimizer and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer  # a wrapper around the optimizer (accelerate's AcceleratedOptimizer, ...)
        if isinstance(opt, torch.optim.Optimizer) and opt is not optimizer:
            raise RewindValueError(
                f"schedulers[{i}] ({type(s).__name__}) drives a different optimizer than the one given to Rewind."
            )
    return objects
