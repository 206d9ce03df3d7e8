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
        # per device group: the log-norms at the last accepted point (float32, on the buffers' device; nan for a
        # norm of 0, which has no scale to compare with), or None before the first accepted point
        self._ref: list[torch.Tensor] | None = None
        self._now: list[torch.Tensor] | None = None  # log-norms measured by the last change() (None: non-finite)

    def _log_norms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for g in self.groups:
            n = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32))
            out.append((n, n.log()))
        return out

    def norms(self) -> torch.Tensor:
        """The L2 norm of every watched buffer now (float64, on the CPU)."""
        if not self.groups:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([n.to("cpu", torch.float64) for n, _ in self._log_norms()])

    def change(self) -> float:
        """log of the largest factor (up or down) by which a watched buffer's norm changed since the reference; 0.0
        without a reference or buffers, ``nan`` if a buffer holds a non-finite value. A few fused ops per device
        and one host sync, whatever the number of buffers."""
        self._now = None
        if not self.groups:
            return 0.0
        now = self._log_norms()
        ref = self._ref
        out = 0.0
        for k, (n, u) in enumerate(now):
            # a reference of nan (norm 0) gives nan: counted 0; a norm that fell to 0 gives inf: a collapse
            d = (u - ref[k]).abs().nan_to_num(0.0).max() if ref is not None else n.new_zeros(())
            big, total = torch.stack([d, n.sum()]).tolist()  # the sum is finite iff every norm is
            if not math.isfinite(total):
                return math.nan
            out = max(out, big)
        self._now = [u for _, u in now]
        return min(out, MAX_LOG) if ref is not None else 0.0

    def accept(self) -> None:
        """The buffers as last measured by :meth:`change` stand: they become the reference (unless non-finite)."""
        now, self._now = self._now, None
        if now is not None:
            self._ref = [u.masked_fill(u.isneginf(), math.nan) for u in now]

    def rebase(self) -> None:
        """Measure the buffers now and make that the reference (after a roll-back put older buffers back; unless
        non-finite)."""
        self._ref = None
        self.change()
        self.accept()

    @property
    def ref(self) -> torch.Tensor | None:
        """The norms at the last accepted point (float64, CPU; 0 for a norm of 0), or None before it."""
        if self._ref is None:
            return None
        return torch.cat([r.nan_to_num(-math.inf).exp().to("cpu", torch.float64) for r in self._ref])

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reference log-norms as a list of floats (None for a norm of 0; ``"ref": None`` before the first
        accepted point)."""
        if self._ref is None:
            return {"ref": None}
        return {"ref": [None if math.isnan(v) else v for r in self._ref for v in r.tolist()]}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict` (one finite log-norm or None per watched buffer; or ``"ref": None``)."""
        who = "BufferWatch.load_state_dict"
        check_type("state_dict", state_dict, dict, who, "a dict returned by BufferWatch.state_dict()")
        ref = state_dict.get("ref")
        if ref is not None:
            check_type("ref", ref, (list, tuple), who, "a list of log-norms")
            ok = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                     for v in ref)  # fmt: skip
            if len(ref) != self.count or not ok:
                raise RewindValueError(
                    f"{who}: expected {self.count} log-norms (one finite number or None per watched buffer), got "
                    f"{ref!r}; pass what state_dict() returned for a guard that watches the same buffers."
                )
            parts, k = [], 0
            for g in self.groups:
                vals = [math.nan if v is None else float(v) for v in ref[k : k + len(g)]]
                parts.append(torch.tensor(vals, dtype=torch.float32, device=g[0].device))
                k += len(g)
            self._ref = parts
        else:
            self._ref = None
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
