"""BufferWatch: how far a model's floating-point buffers (BatchNorm running statistics, any running average a model
keeps) jumped in one iteration — the damage a bad batch can do that the loss never shows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .._checks import check_type
from ..distributed import local
from ..errors import RewindTypeError, RewindValueError

MAX_LOG = 700.0  # exp() of more overflows a float: a change this large is reported as this large


class BufferWatch:
    """Measures, per iteration, the largest factor by which the L2 norm of any watched buffer changed since the last
    accepted point — as its log, ``change()`` (0: nothing moved; ``nan``: a buffer is not finite).

    Why: in train mode BatchNorm normalises a batch of inputs x1e3 away, so the loss does not spike, but the running
    variance is pulled up ~1e5-fold, and with momentum 0.1 it needs ~100 steps to wash out; evaluated before that, the
    model is at chance. Feeding ``exp(change())`` to a :class:`SpikeDetector` (as :class:`SpikeGuard` does with
    ``buffers=``) rolls such a jump back like a loss spike.

    Watched: the floating-point buffers of the given module(s) as they are when the watch is built, or the given
    tensors. A buffer whose norm was exactly 0 at the reference (e.g. a running mean before its first update) has no
    scale to compare with: its change counts 0 until it is non-zero at an accepted point. One fused
    ``torch._foreach_norm`` per device and one host copy per iteration; no Python work per buffer.

    Example::

        watch = BufferWatch(model)
        c = watch.change()            # after the forward pass; 0.0 before the first accept()
        watch.accept()                # the step stands: these buffers are the new reference
    """

    def __init__(self, source: torch.nn.Module | Iterable[torch.nn.Module | torch.Tensor], who: str = "BufferWatch"):
        tensors = _float_buffers(source, who)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            t = local(t)
            by_device.setdefault(t.device, []).append(t)
        self.groups = list(by_device.values())
        self.count = len(tensors)
        self.ref: torch.Tensor | None = None  # norms at the last accepted point (float64, CPU)
        self._now: torch.Tensor | None = None  # norms measured by the last change()

    def norms(self) -> torch.Tensor:
        """The L2 norm of every watched buffer now (float64, on the CPU)."""
        if not self.groups:
            return torch.zeros(0, dtype=torch.float64)
        out = [torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)).to("cpu", torch.float64)
               for g in self.groups]  # fmt: skip
        return out[0] if len(out) == 1 else torch.cat(out)

    def change(self) -> float:
        """log of the largest factor (up or down) by which a watched buffer's norm changed since the reference; 0.0
        without a reference or buffers, ``nan`` if a buffer holds a non-finite value."""
        now = self.norms()
        self._now = now
        ref = self.ref
        if ref is None or not len(now):
            return 0.0
        if not bool(now.isfinite().all()):
            return math.nan
        tiny = torch.finfo(torch.float64).tiny
        d = torch.where(ref > 0, (now.clamp_min(tiny).log() - ref.clamp_min(tiny).log()).abs(), 0.0)
        return min(float(d.max()), MAX_LOG)

    def accept(self) -> None:
        """The buffers as last measured by :meth:`change` stand: they become the reference."""
        if self._now is not None and bool(self._now.isfinite().all()):
            self.ref = self._now
        self._now = None

    def rebase(self) -> None:
        """Measure the buffers now and make that the reference (after a roll-back put older buffers back)."""
        now = self.norms()
        self.ref = now if bool(now.isfinite().all()) else None
        self._now = None

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reference norms as a list of floats (None before the first accepted point)."""
        return {"ref": None if self.ref is None else self.ref.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` (one non-negative finite norm per watched buffer, or None)."""
        who = "BufferWatch.load_state_dict"
        check_type("state_dict", state_dict, dict, who, "a dict returned by BufferWatch.state_dict()")
        ref = state_dict.get("ref")
        if ref is not None:
            check_type("ref", ref, (list, tuple), who, "a list of norms")
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                     for v in ref)  # fmt: skip
            if len(ref) != self.count or not ok:
                raise RewindValueError(
                    f"{who}: expected {self.count} finite non-negative norms (one per watched buffer), got {ref!r}; "
                    "pass what state_dict() returned for a guard that watches the same buffers."
                )
            self.ref = torch.tensor([float(v) for v in ref], dtype=torch.float64)
        else:
            self.ref = None
        self._now = None


def _float_buffers(source: Any, who: str) -> list[torch.Tensor]:
    """The floating-point buffers of a module or of modules, or the given floating-point tensors."""
    if isinstance(source, torch.nn.Module):
        items: list[Any] = [source]
    elif isinstance(source, Iterable) and not isinstance(source, torch.Tensor):
        items = list(source)
    else:
        raise RewindTypeError(
            f"{who}: buffers must be an nn.Module, an iterable of nn.Modules, or an iterable of tensors; got "
            f"{type(source).__name__}."
        )
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for it in items:
        if isinstance(it, torch.nn.Module):
            cands = list(it.buffers())
        elif isinstance(it, torch.Tensor):
            if not it.is_floating_point():
                raise RewindValueError(f"{who}: buffers given as tensors must be floating-point, got {it.dtype}.")
            cands = [it]
        else:
            raise RewindTypeError(
                f"{who}: buffers must be an nn.Module, an iterable of nn.Modules, or an iterable of tensors; the "
                f"iterable holds a {type(it).__name__}."
            )
        for t in cands:
            if t.is_floating_point() and id(t) not in seen:  # num_batches_tracked and other counters are not
                seen.add(id(t))
                out.append(t)
    return out
