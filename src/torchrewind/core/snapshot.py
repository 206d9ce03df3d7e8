"""One recorded training state (:class:`Slot`) and the code that fills it and writes it back (:class:`Recorder`).

A slot's buffers are allocated on first use and reused ever after, so steady-state snapshots allocate nothing
for arena tensors (and reuse same-shaped buffers for everything else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import broadcast_from, local
from ..errors import RewindError
from .rng import RNGState
from .tracker import Structure, Tracker
from .budget import value_nbytes
from .values import copy_tensor, copy_value, restore_value


@dataclass(slots=True, eq=False)
class Slot:
    """Storage for one recorded state. ``words[k]`` mirrors arena ``k`` (a (device, chunk) key) byte for byte; the
    other fields are "the rest": everything but the arenas."""

    words: dict[tuple, torch.Tensor] = field(default_factory=dict)
    used: dict[tuple, int] = field(default_factory=dict)
    views: dict[tuple, torch.Tensor] = field(default_factory=dict)  # words[:used], cached: no view per snapshot
    structure: Structure | None = None
    pinned: dict[Any, torch.Tensor] = field(default_factory=dict)
    misc: dict[Any, Any] = field(default_factory=dict)
    groups: list = field(default_factory=list)
    objects: list = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    grads: list | None = None
    step: int = 0  # optimizer steps the recorded state had taken (Rewind.step)

    def copy_rest(self, to_cpu: bool = False) -> Slot:
        """A new slot with a copy of everything but the arena words (the ring reuses its slots' buffers in place,
        so a lower tier keeping a point needs its own copy). ``to_cpu``: tensors copied to host memory."""
        dev = "cpu" if to_cpu else None
        return Slot(
            structure=self.structure,
            pinned={k: t.detach().to(dev or t.device, copy=True) for k, t in self.pinned.items()},
            misc=copy_value(self.misc),
            groups=[(g, plist, ptuple, copy_value(hp)) for g, plist, ptuple, hp in self.groups],
            objects=copy_value(self.objects),
            scaler=copy_value(self.scaler),
            rng=copy_value(self.rng),
            grads=None if self.grads is None else [None if g is None else g.detach().clone() for g in self.grads],
            step=self.step,
        )

    @property
    def nbytes(self) -> int:
        """Everything this slot holds: arena words, one-by-one tensors, gradients, and by-value state (Python values
        and the tensors inside them, RNG states, hyperparameters, schedulers' and the scaler's state)."""
        n = sum(w.numel() * 8 for w in self.words.values())
        n += sum(t.numel() * t.element_size() for t in self.pinned.values())
        if self.grads:
            n += sum(g.numel() * g.element_size() for g in self.grads if g is not None)
        if self.structure is not None:
            n += value_nbytes([self.misc, [hp for *_, hp in self.groups], self.objects, self.scaler, self.rng])
        return n


class Recorder:
    """Captures the whole training state into a :class:`Slot` and restores it from one."""

    def __init__(
        self,
        tracker: Tracker,
        optimizer: torch.optim.Optimizer,
        objects: Sequence[Any],
        scaler: Any,
        rng: RNGState,
        grads: bool,
    ) -> None:
        self.tracker = tracker
        self.optimizer = optimizer
        self.objects = list(objects)
        self.scaler = scaler
        self.rng = rng
        self.grads = grads
        self.host_slots = False  # Rewind(storage="host"): slots of CUDA arenas live in pinned host memory
        # Rewind(shard=True): (rank, world, group). Each slot keeps only this rank's 1/world of every arena's words
        # (replicated state, e.g. DDP); a restore copies its part back and broadcasts every rank's part.
        self.shard: tuple[int, int, Any] | None = None

    def _part(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The word range [lo, hi) of an ``n``-word arena that ``rank`` (default: this one) keeps."""
        if self.shard is None:
            return 0, n
        me, world, _ = self.shard
        chunk = -(-n // world)
        lo = min((me if rank is None else rank) * chunk, n)
        return lo, min(lo + chunk, n)

    def wait_for_host(self, slot: Slot) -> None:
        """Make a pinned slot's bytes readable by the CPU (its D2H copies are asynchronous)."""
        for k, v in slot.views.items():
            if v.device.type == "cpu" and k[0].type == "cuda":
                torch.cuda.synchronize(k[0])

    # ------------------------------------------------------------------ capture
    def prepare(self, slot: Slot) -> None:
        """Size the slot's buffers for the current arenas (allocating only when an arena grew)."""
        for k, a in self.tracker.arenas.items():
            lo, hi = self._part(a.used // 8)
            n = hi - lo
            w = slot.words.get(k)
            if w is None or w.numel() < n:
                if self.host_slots and a.device.type == "cuda":  # pinned: async D2H/H2D copies, device memory free
                    w = torch.empty(n, dtype=torch.int64, pin_memory=True)
                else:
                    w = torch.empty(n, dtype=torch.int64, device=a.device)
                slot.words[k] = w
                slot.views.pop(k, None)
            v = slot.views.get(k)
            if v is None or v.numel() != n:
                slot.views[k] = w[:n]

    def capture(self, slot: Slot) -> None:
        for dst, src in self.arena_pairs(slot):
            dst.copy_(src, non_blocking=True)
        self.capture_rest(slot)

    def arena_pairs(self, slot: Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(slot buffer, arena words) for every arena: the bulk of a capture (one copy each). Call prepare first."""
        pairs = []
        for k, a in self.tracker.arenas.items():
            words = a.words()
            if self.shard is not None:
                lo, hi = self._part(a.used // 8)
                words = words[lo:hi]
            pairs.append((slot.views[k], words))
            slot.used[k] = a.used
        return pairs

    def refresh_buffers(self, slot: Slot) -> None:
        """Re-copy the arena bytes of module buffers (which forward may have changed since :meth:`arena_pairs`
        was copied in the background)."""
        tr = self.tracker
        for k, lo, hi in tr.buffer_ranges():
            slot.views[k][lo:hi].copy_(tr.arenas[k].words()[lo:hi], non_blocking=True)

    def capture_rest(self, slot: Slot) -> None:
        """Everything but the arenas: loose tensors, Python values, param_groups, user objects, scaler, RNG."""
        tr = self.tracker
        s = tr.structure
        old_pinned = slot.pinned
        # DTensors (FSDP2 shards) are copied through their local tensors: no DTensor dispatch, buffers reused
        pinned = {key: copy_tensor(local(p), old_pinned.get(key)) for key, p in tr.pinned_params}
        for c, name, t, key in s.pinned_items:
            pinned[key] = copy_tensor(local(t), old_pinned.get(key))
        slot.pinned = pinned
        old_misc = slot.misc
        slot.misc = {key: copy_value(c[name], old_misc.get(key)) for c, name, key in s.misc_items}
        slot.structure = s
        slot.groups = self._capture_groups(slot.groups)
        slot.objects = [copy_value(o.state_dict()) for o in self.objects]
        if self.scaler is not None:
            slot.scaler = copy_value(vars(self.scaler), slot.scaler)
        slot.rng = self.rng.capture() if self.rng.active else {}
        if self.grads:
            old = slot.grads or []
            slot.grads = [
                None if p.grad is None else copy_tensor(p.grad, old[i] if i < len(old) else None)
                for i, p in enumerate(tr.params)
            ]

    def _capture_groups(self, old: list) -> list:
        out = []
        for i, g in enumerate(self.optimizer.param_groups):
            prev = old[i][3] if i < len(old) and old[i][0] is g else None
            hp = {k: copy_value(v, prev.get(k) if prev else None) for k, v in g.items() if k != "params"}
            out.append((g, g["params"], tuple(g["params"]), hp))
        return out

    # ------------------------------------------------------------------ restore
    def restore(self, slot: Slot) -> None:
        """Write ``slot`` back. Validates first and restores user objects (which may raise) before tensors, so an
        exception leaves the training state as it was."""
        if slot.structure is None:
            raise RewindError("internal error: restoring an empty slot")
        tr = self.tracker
        tr.ensure()
        for k, used in slot.used.items():
            a = tr.arenas.get(k)
            if a is None or a.used < used:
                raise RewindError("internal error: snapshot is larger than the live arena")
        self._restore_objects(slot.objects)

        for k, used in slot.used.items():
            live = tr.arenas[k].words()
            saved = slot.views[k]
            if used != live.numel() * 8:  # snapshot taken before this arena grew: its bytes are a prefix
                live = live[: used // 8]
            lo, hi = self._part(used // 8)
            live[lo:hi].copy_(saved[: hi - lo], non_blocking=True)
            del live
        if self.shard is not None:
            self._gather_parts(slot)
        with torch.no_grad():
            for key, p in tr.pinned_params:
                saved = slot.pinned.get(key)
                if saved is not None:
                    local(p).copy_(saved)
        tr.reconcile(slot.structure)
        s = tr.structure
        with torch.no_grad():
            for c, name, t, key in s.pinned_items:
                local(t).copy_(slot.pinned[key])
        misc = slot.misc
        for c, name, key in s.misc_items:
            c[name] = restore_value(c.get(name), misc[key])
        self._restore_groups(slot.groups)
        if self.scaler is not None and slot.scaler is not None:
            self._restore_attrs(self.scaler, slot.scaler)
        if slot.rng:
            self.rng.restore(slot.rng)
        if self.grads and slot.grads is not None:
            for p, g in zip(tr.params, slot.grads):
                p.grad = None if g is None else restore_value(p.grad, g)
        for a in tr.arenas.values():
            a.rebaseline()  # reconcile may have created views

    def _gather_parts(self, slot: Slot) -> None:
        """Shard mode: every rank wrote its own part of each arena; broadcast each rank's part to all others."""
        _, world, group = self.shard
        for k, used in slot.used.items():
            n = used // 8
            for r in range(world):
                lo, hi = self._part(n, r)
                if hi > lo:
                    part = self.tracker.arenas[k].words()[lo:hi]
                    broadcast_from(part, r, group)
                    del part  # no view may outlive the restore: the arena's use count is its change detector

    def _restore_objects(self, saved: list) -> None:
        before = [copy_value(o.state_dict()) for o in self.objects] if self.objects else []
        done = 0
        try:
            for o, sd in zip(self.objects, saved):
                o.load_state_dict(copy_value(sd))  # a copy: load_state_dict may consume its argument
                done += 1
        except BaseException:
            for o, sd in zip(self.objects[:done], before):  # put back what was already restored
                o.load_state_dict(sd)
            raise

    def _restore_groups(self, saved: list) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(saved) or any(g is not s[0] for g, s in zip(groups, saved)):
            groups[:] = [s[0] for s in saved]
        for g, plist, ptuple, hp in saved:
            if g["params"] is not plist:
                g["params"] = plist
            plist[:] = ptuple  # unconditionally: a C-level copy is cheaper than checking 1000s of items in Python
            for k in [k for k in g if k != "params" and k not in hp]:
                del g[k]
            for k, v in hp.items():
                g[k] = restore_value(g.get(k), v)

    @staticmethod
    def _restore_attrs(obj: Any, saved: dict[str, Any]) -> None:
        d = vars(obj)
        for k in [k for k in d if k not in saved]:
            del d[k]
        for k, v in saved.items():
            d[k] = restore_value(d.get(k), v)
