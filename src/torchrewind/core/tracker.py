"""Finding every piece of training state and keeping it bound to arena positions.

The tracker knows three kinds of values:

* **arena** tensors: plain dense tensors that own their storage (almost every parameter, buffer and
  optimizer-state tensor). They are re-homed into the per-device :class:`~torchrewind.core.arena.Arena` and
  captured/restored with one memcpy per device.
* **pinned** tensors: dense tensors that cannot be moved because they share storage with something else (views,
  tied storage) or are tensor subclasses. They are copied one by one, in place.
* **misc** values: everything else held in a tracked container (Python scalars, ``None``, lists of tensors as in
  LBFGS, sparse tensors). They are deep-copied by value.

Containers are the dicts that hold state: each module's ``_buffers`` and each ``optimizer.state[p]``. Which keys
each container held, and where each value lived, is a :class:`Structure`; restoring a snapshot taken with another
structure (e.g. before the optimizer lazily created its state) puts exactly the recorded keys back.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ..distributed import local
from ..errors import RewindError, RewindTypeError
from .arena import Arena, Entry, LiveArenas, owns_storage, rehome
from .budget import Budget, value_nbytes

ARENA, PINNED, MISC, ALIAS = "arena", "pinned", "misc", "alias"

# Optimizers whose step() updates existing state tensors in place and creates all of a parameter's state keys at
# once, when its state dict is empty. For these an O(1) check per snapshot is enough (see Tracker.fast_ok);
# anything else (LBFGS, user subclasses overriding step) is fully re-scanned at every snapshot and restore.
_TRUSTED_NAMES = (
    "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
    "RMSprop", "Rprop", "ASGD", "SparseAdam", "Adafactor", "Muon",
)  # fmt: skip
_TRUSTED_STEPS = {
    inspect.unwrap(getattr(torch.optim, n).step) for n in _TRUSTED_NAMES if hasattr(torch.optim, n)
}


def is_trusted(optimizer: torch.optim.Optimizer) -> bool:
    # unwrap: torch.optim patches each class's step with a profiling wrapper the first time one is constructed.
    return inspect.unwrap(type(optimizer).step) in _TRUSTED_STEPS


def _plain_dense(t: torch.Tensor) -> bool:
    """A plain (no subclass), dense, materialized tensor: one that could live in an arena."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.device.type != "meta"
        and not t.is_quantized
    )


def _movable(t: torch.Tensor, live: LiveArenas) -> bool:
    """A tensor we may re-home: plain, dense, non-empty, sole user of its storage, and not in a live arena."""
    return _plain_dense(t) and t.numel() > 0 and owns_storage(t) and not live.holds(t)


def _pinnable(t: torch.Tensor) -> bool:
    """Dense tensors we can copy in place even though we cannot move them."""
    return t.layout == torch.strided and t.device.type != "meta" and not t.is_quantized


class Structure:
    """Which keys every tracked container held at one moment, and where each value lived.

    Immutable once built; the tracker reuses the same object while nothing changes, so a snapshot whose
    structure ``is`` the live one needs no reconciliation on restore.
    """

    __slots__ = (
        "containers", "state_order", "signature", "misc_items", "pinned_items", "empties", "arena_entries",
    )  # fmt: skip

    def __init__(self, containers: list, state_order: list) -> None:
        # containers: [(dict, [(name, kind, ref, key), ...]), ...] where ref is an Entry (arena), the tensor
        # (pinned), the aliased key (alias) or None (misc).
        self.containers = tuple((c, tuple(items)) for c, items in containers)
        self.state_order = tuple(state_order)  # ((param, state_dict), ...) in optimizer.state order
        self.signature = (
            tuple(
                (id(c), tuple((n, k, ref if k == ALIAS else id(ref)) for n, k, ref, _ in items))
                for c, items in self.containers
            ),
            tuple((id(p), id(d)) for p, d in self.state_order),
        )
        flat = [(c, n, k, ref, key) for c, items in self.containers for n, k, ref, key in items]
        self.misc_items = tuple((c, n, key) for c, n, k, ref, key in flat if k == MISC)
        self.pinned_items = tuple((c, n, ref, key) for c, n, k, ref, key in flat if k == PINNED)
        self.arena_entries = tuple(ref for c, n, k, ref, key in flat if k == ARENA)
        self.empties = tuple(d for _, d in self.state_order if not d)


class Tracker:
    """Binds the live training state to arena positions and detects when it stops being bound."""

    def __init__(
        self,
        modules: list[torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        *,
        verify: bool,
        budget: Budget | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.modules = modules
        self.verify = verify or not is_trusted(optimizer)
        self._budget = budget  # asked before anything moves: admits, shrinks or refuses the history
        self.params: list[torch.Tensor] = []
        self._param_index: dict[int, int] = {}
        self._names: dict[int, str] = {}
        for mi, m in enumerate(modules):
            for name, p in m.named_parameters(remove_duplicate=False):
                self._names.setdefault(id(p), name if len(modules) == 1 else f"[{mi}].{name}")
                self._add_param(p)
        for g in optimizer.param_groups:
            for p in g["params"]:
                self._add_param(p)
        # (device, chunk number) -> Arena. Tensors found by one sync go into one new chunk per device, so
        # growing never copies (or doubles the memory of) what is already there: parameters and buffers live in
        # chunk 0, optimizer state created by the first step in chunk 1.
        self.arenas: dict[tuple[torch.device, int], Arena] = {}
        self.entries: dict[Any, Entry] = {}
        self.pinned_params: list[tuple[Any, torch.Tensor]] = []
        self.structure: Structure | None = None
        self._fingerprint: tuple = ()
        self.generation = 0  # bumped by every sync(): arenas and positions may have changed
        self._buffer_ranges: tuple[Structure | None, list] = (None, [])
        self.sync()

    # ------------------------------------------------------------------ discovery
    def _add_param(self, p: torch.Tensor) -> None:
        if id(p) not in self._param_index:
            self._param_index[id(p)] = len(self.params)
            self.params.append(p)

    def name_of(self, p: torch.Tensor) -> str:
        i = self._param_index.get(id(p))
        return self._names.get(id(p), f"optimizer parameter #{i}")

    def _containers(self) -> tuple[list, list]:
        """[(container, key_prefix)], and optimizer.state's (param, dict) pairs in order."""
        out: list = []
        seen: set[int] = set()
        for mi, m in enumerate(self.modules):
            for qual, sub in m.named_modules(remove_duplicate=False):
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                out.append((sub._buffers, ("buffer", mi, qual)))
        order = []
        for p, d in self.optimizer.state.items():
            if not isinstance(d, dict):
                raise RewindError(
                    f"optimizer.state[{self.name_of(p)}] is a {type(d).__name__}, not a dict; torchrewind "
                    "expects the torch.optim convention optimizer.state[param] = {name: value}."
                )
            if isinstance(p, torch.Tensor):
                self._add_param(p)
                key = ("state", self._param_index[id(p)])
            else:
                key = ("state", repr(p))
            out.append((d, key))
            order.append((p, d))
        return out, order

    # ------------------------------------------------------------------ checks
    def fingerprint(self) -> tuple:
        opt = self.optimizer
        groups = opt.param_groups
        return (
            id(opt.state), len(opt.state), id(groups), len(groups), sum(len(g["params"]) for g in groups)
        )

    def fast_ok(self) -> bool:
        """O(1)-ish: is every tracked tensor still where we put it? False means "run sync()".

        Moving a tensor out of an arena (``p.data = x``, ``model.to()``, replacing a container value) drops the
        arena storage's use count; new optimizer state shows in the fingerprint or in a formerly empty state dict.
        """
        if self.verify or self.fingerprint() != self._fingerprint:
            return False
        s = self.structure
        for d in s.empties:
            if d:
                return False
        for a in self.arenas.values():
            if a.changed():
                return False
        for c, name, t, _ in s.pinned_items:
            if c.get(name) is not t:
                return False
        return True

    def ensure(self) -> None:
        if not self.fast_ok():
            self.sync()

    def buffer_ranges(self) -> list[tuple[tuple, int, int]]:
        """(arena key, first word, end word) of the module buffers living in arenas, adjacent ones merged."""
        s = self.structure
        if self._buffer_ranges[0] is not s:
            key_of = {a.uid: k for k, a in self.arenas.items()}
            spans = sorted(
                (
                    (key_of[ref.arena.uid], ref.offset // 8, (ref.offset + ref.nbytes + 7) // 8)
                    for c, items in s.containers
                    for name, kind, ref, key in items
                    if kind == ARENA and key[0] == "buffer"
                ),
                key=lambda x: (str(x[0][0]), x[0][1], x[1]),
            )
            merged: list[list] = []
            for k, lo, hi in spans:
                if merged and merged[-1][0] == k and lo <= merged[-1][2]:
                    merged[-1][2] = max(merged[-1][2], hi)
                else:
                    merged.append([k, lo, hi])
            self._buffer_ranges = (s, [tuple(m) for m in merged])
        return self._buffer_ranges[1]

    # ------------------------------------------------------------------ sync
    _MAX_CHUNKS = 4  # past this many chunks on a device, new tensors grow the last chunk instead

    def _open_arena(self, device: torch.device, nbytes: int) -> Arena:
        """The arena that receives ``nbytes`` of new tensors on ``device``."""
        chunks = [k for k in self.arenas if k[0] == device]
        last = self.arenas[max(chunks, key=lambda k: k[1])] if chunks else None
        if last is not None and len(chunks) >= self._MAX_CHUNKS and not last.has_foreign_views():
            a = last  # grows by reallocating: safe only when no view of its tensors exists anywhere
        else:
            a = self.arenas[(device, len(chunks))] = Arena(device)
        a.reserve(nbytes)
        return a

    def _describe(self, t: torch.Tensor) -> str:
        return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)} on {t.device}"

    def sync(self) -> None:
        """Full scan: bind new tensors, re-bind replaced ones, rebuild the structure. Validates everything before
        changing anything, so a RewindError leaves the training state untouched."""
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                self._add_param(p)
        containers, order = self._containers()
        live = LiveArenas()

        moves: list[tuple[Entry | None, Any, torch.Tensor]] = []  # (existing entry or None, key, tensor)
        evict: list[torch.Tensor] = []
        pinned_params: list[tuple[Any, torch.Tensor]] = []
        seen: dict[int, Any] = {}
        for i, p in enumerate(self.params):
            key = ("param", i)
            seen[id(p)] = key
            e = self.entries.get(key)
            if e is not None:
                if e.is_home(p):
                    continue
                if not e.fits(p):
                    raise RewindError(
                        f"parameter '{self.name_of(p)}' changed from {str(e.dtype).replace('torch.', '')}"
                        f"{list(e.shape)} on {e.arena.device} to {self._describe(p)} since the Rewind was built "
                        "(e.g. by model.to(), .half() or resizing). Move or cast the model first, then build the "
                        "Rewind (call rw.close() on this one)."
                    )
                moves.append((e, key, p))
            elif _movable(p, live):
                moves.append((None, key, p))
            elif _pinnable(p):
                pinned_params.append((key, p))
            else:
                raise RewindError(
                    f"parameter '{self.name_of(p)}' ({type(p).__name__}, layout {p.layout}, device {p.device}) "
                    "cannot be snapshotted; materialize lazy modules and use dense parameters."
                )

        items_per: list = []
        claimed: set[int] = set()  # entries bound in this scan
        for c, prefix in containers:
            items = []
            for name, v in list(c.items()):
                key = prefix + (name,)
                if not isinstance(v, torch.Tensor):
                    items.append((name, MISC, None, key))
                    continue
                if id(v) in seen:
                    items.append((name, ALIAS, seen[id(v)], key))
                    continue
                seen[id(v)] = key
                e = self.entries.get(key)
                if e is not None and e.obj() is v and e.is_home(v):
                    items.append((name, ARENA, e, key))
                    claimed.add(id(e))
                elif _movable(v, live):
                    if e is not None and e.fits(v) and id(e) not in claimed:
                        old = e.obj()
                        if old is not None and old is not v:
                            evict.append(old)  # someone still holds the replaced tensor: give it its own memory
                        moves.append((e, key, v))
                        claimed.add(id(e))
                    else:
                        moves.append((None, key, v))
                    items.append((name, ARENA, None, key))  # Entry resolved below
                elif _pinnable(v):
                    items.append((name, PINNED, v, key))
                else:
                    items.append((name, MISC, None, key))
            items_per.append((c, items))

        # Allocate new positions: validate the memory budget before touching anything.
        extra: dict[torch.device, int] = {}
        for e, key, t in moves:
            if e is None:
                extra[t.device] = Arena.plan(t, extra.get(t.device, 0))
        if self._budget is not None and self._budget.max_bytes is not None:
            self._budget.admit(self._slot_bytes(extra, items_per, pinned_params))
        target = {dev: self._open_arena(dev, n) for dev, n in extra.items()}

        if moves or evict:
            self.generation += 1  # tensors moved (and arenas may have been reallocated)
        with torch.no_grad():
            for old in evict:
                old.data = old.detach().clone(memory_format=torch.preserve_format)  # not set_: keeps grad hooks
            placed = []
            for e, key, t in moves:
                if e is None:
                    e = target[t.device].add(key, t)
                    self.entries[key] = e
                placed.append((e, key, t, e.view()))
            if placed:  # every value into its new home in one call, then each tensor re-homed
                torch._foreach_copy_([home for *_, home in placed], [t for _, _, t, _ in placed])
            for e, key, t, home in placed:
                rehome(t, home)
                e.hold(t, strong=key[0] == "param")

        resolved = []
        for c, items in items_per:
            out = []
            for name, kind, ref, key in items:
                if kind == ARENA and ref is None:
                    ref = self.entries[key]
                out.append((name, kind, ref, key))
            resolved.append((c, out))

        new = Structure(resolved, order)
        old = self.structure
        if old is not None and old.signature == new.signature:
            new = old  # unchanged: keep the object so snapshots sharing it restore without reconciliation
        self._adopt(new)
        self.pinned_params = pinned_params

    def _slot_bytes(self, extra: dict[torch.device, int], items_per: list, pinned_params: list) -> int:
        """Bytes one snapshot of the state being bound will hold (see :mod:`.budget`)."""
        arena = sum(a.used for a in self.arenas.values()) + sum(extra.values())
        loose = sum(local(t).numel() * t.element_size() for _, t in pinned_params)
        for c, items in items_per:
            for name, kind, ref, key in items:
                if kind == PINNED:
                    loose += local(ref).numel() * ref.element_size()
                elif kind == MISC:
                    loose += value_nbytes(c[name])
        params = sum(local(p).numel() * p.element_size() for p in self.params)
        return self._budget.slot_bytes(arena, loose, params)

    def _adopt(self, s: Structure) -> None:
        """Make ``s`` the live structure: container-held tensors are referenced weakly, removed ones are parked."""
        live = {id(e) for e in s.arena_entries}
        for e in self.entries.values():
            if e.key[0] == "param":
                continue
            if id(e) in live:
                t = e.obj()
                if t is not None:
                    e.hold(t, strong=False)
            else:
                e.make_strong()
        self.structure = s
        self._fingerprint = self.fingerprint()
        for a in self.arenas.values():
            a.rebaseline()

    # ------------------------------------------------------------------ restore of structure
    def reconcile(self, target: Structure) -> None:
        """Put back exactly the containers, keys and tensor objects recorded in ``target``."""
        if target is self.structure:
            return
        S = self.optimizer.state
        if [(id(p), id(d)) for p, d in S.items()] != [(id(p), id(d)) for p, d in target.state_order]:
            S.clear()
            for p, d in target.state_order:
                S[p] = d
        objs: dict[Any, Any] = {("param", i): p for i, p in enumerate(self.params)}
        aliases = []
        for c, items in target.containers:
            new: dict[Any, Any] = {}
            for name, kind, ref, key in items:
                if kind == ARENA:
                    t = ref.obj()
                    if t is None:
                        t = ref.view()
                        ref.hold(t, strong=True)  # keep it alive until it is in its container
                elif kind == PINNED:
                    t = ref
                elif kind == MISC:
                    t = c.get(name)  # the value itself is restored by the caller
                else:
                    aliases.append((c, name, ref))
                    t = None
                new[name] = objs[key] = t
            if list(c.keys()) != list(new.keys()) or any(c[k] is not v for k, v in new.items()):
                c.clear()
                c.update(new)
        for c, name, key in aliases:
            c[name] = objs.get(key)
        self._adopt(target)


def iter_modules(model: Any) -> list[torch.nn.Module]:
    if model is None:
        return []
    if isinstance(model, torch.nn.Module):
        return [model]
    if isinstance(model, Iterable):
        mods = list(model)
        for m in mods:
            if not isinstance(m, torch.nn.Module):
                raise RewindTypeError(
                    f"model must be an nn.Module or an iterable of nn.Module, got an iterable containing "
                    f"{type(m).__name__}."
                )
        return mods
    raise RewindTypeError(f"model must be an nn.Module or an iterable of nn.Module, got {type(model).__name__}.")
