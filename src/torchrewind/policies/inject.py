"""A fault injector for tests and demos: flip a bit in, or scale, an activation or a gradient — through hooks, only
while armed, so the first run of an iteration is corrupted and its rerun is not (a transient fault), or every run is
(a persistent one).

Example::

    inj = FaultInjector(model[1])                 # the output of model[1] (an activation): flip its top exponent bit
    inj.arm()                                     # the next forward through model[1] is corrupted, then it disarms
    triage.step(loss_fn)                          # first run corrupted, rerun clean: diagnosed "transient"
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_choice, check_int, check_number, check_optional_int, check_type
from ..errors import RewindValueError
from .outcome import as_int_bits


def flip_bit(t: torch.Tensor, index: int = 0, bit: int | None = None) -> torch.Tensor:
    """A copy of ``t`` with one bit of element ``index`` (of the flattened tensor) flipped; ``bit`` counts from the
    least significant (default: the most significant exponent bit of a floating-point dtype, which multiplies a
    value below 2 by a huge power of two, or makes it inf/NaN).

    Example::

        flip_bit(torch.tensor([0.5]))        # tensor([1.7014e+38])
    """
    out = t.detach().clone(memory_format=torch.contiguous_format)
    ints = as_int_bits(out).reshape(-1)  # a view: flipping it flips ``out``
    width = ints.element_size() * 8
    if bit is None:
        if not (out.is_floating_point() or out.is_complex()):
            raise RewindValueError(f"flip_bit: pass bit= for a {out.dtype} tensor (no exponent bit).")
        bit = width - 2
    check_int("bit", bit, 0, "flip_bit")
    if bit >= width:
        raise RewindValueError(f"flip_bit: bit must be < {width} for {out.dtype}, got {bit}.")
    n = ints.numel()
    if not -n <= index < n:
        raise RewindValueError(f"flip_bit: index {index} is out of range for a tensor of {n} elements.")
    mask = -(1 << (width - 1)) if bit == width - 1 else 1 << bit  # the sign bit as a signed integer
    ints[index : index + 1].bitwise_xor_(torch.tensor(mask, dtype=ints.dtype, device=ints.device))
    return out


class FaultInjector:
    """Corrupts an activation or a gradient while armed, through a hook.

    ``target`` a module: its output (the first tensor of a tuple) is corrupted in the forward pass. ``target`` a
    parameter (or any leaf tensor that requires grad): its gradient is corrupted as backward computes it (before it
    is accumulated into ``.grad``, so under DDP before the all-reduce: one rank's fault reaches every replica).

    ``kind="bitflip"`` flips ``bit`` of element ``index`` (default: the top exponent bit; see :func:`flip_bit`);
    ``kind="scale"`` multiplies the whole tensor by ``factor`` (``float("nan")`` or ``math.inf`` make it non-finite).
    A flipped bit is only noticed if the check sees it: the top exponent bit of a value in [2, 4) makes it tiny, of
    a zero makes it 2 — silent corruptions, as on real hardware.

    :meth:`arm` makes the next ``times`` passes through the hook faulty (default 1: the first run of an iteration,
    not its rerun — a transient fault); ``times=None`` every pass until :meth:`disarm` (a persistent fault: the
    rerun sees it too). :attr:`fired` counts the corrupted passes. :meth:`remove` takes the hook off.

    Example::

        inj = FaultInjector(model[0].weight, kind="scale", factor=1e6)     # the gradient of model[0].weight
        inj.arm(); triage.step(loss_fn); assert inj.fired == 1
        inj.remove()
    """

    def __init__(
        self,
        target: torch.nn.Module | torch.Tensor,
        *,
        kind: str = "bitflip",
        bit: int | None = None,
        index: int = 0,
        factor: float = 1e4,
    ) -> None:
        who = "FaultInjector"
        check_type("target", target, (torch.nn.Module, torch.Tensor), who, "an nn.Module (its output) or a "
                   "parameter (its gradient)")  # fmt: skip
        self.kind = check_choice("kind", kind, ("bitflip", "scale"), who)
        self.bit = check_optional_int("bit", bit, 0, who)
        self.index = check_int("index", index, None, who)
        nan = isinstance(factor, float) and math.isnan(factor)  # a NaN factor is a fault like any other
        self.factor = factor if nan else check_number("factor", factor, who, finite=False)
        self.target = target
        self.where = "activation" if isinstance(target, torch.nn.Module) else "gradient"
        if self.where == "gradient" and not target.requires_grad:
            raise RewindValueError(f"{who}: the target tensor does not require grad, so it has no gradient to corrupt.")
        self.fired = 0
        self._left: int | None = 0  # passes still to corrupt (None: all until disarm)
        self._wait = 0  # passes to let through before that
        if isinstance(target, torch.nn.Module):
            self._handle = target.register_forward_hook(self._on_output)
        else:
            self._handle = target.register_hook(self._on_grad)

    # -- arming ------------------------------------------------------------------------------------------------
    def arm(self, times: int | None = 1, after: int = 0) -> FaultInjector:
        """Corrupt the next ``times`` passes (None: every pass until :meth:`disarm`), after letting ``after`` passes
        through untouched (``after=1``: the rerun of an iteration, not its first run). Returns the injector."""
        self._left = check_optional_int("times", times, 1, "FaultInjector.arm")
        self._wait = check_int("after", after, 0, "FaultInjector.arm")
        return self

    def disarm(self) -> None:
        self._left, self._wait = 0, 0

    @property
    def armed(self) -> bool:
        return self._left is None or self._left > 0

    def remove(self) -> None:
        """Take the hook off (the injector is inert afterwards)."""
        self.disarm()
        self._handle.remove()

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- the corruption ---------------------------------------------------------------------------------------
    def corrupt(self, t: torch.Tensor) -> torch.Tensor:
        """What a pass through the armed hook turns ``t`` into."""
        if self.kind == "scale":
            return t * self.factor
        flipped = flip_bit(t, self.index, self.bit)
        if not t.requires_grad:
            return flipped
        # an activation: keep the autograd graph (the flipped element gets no gradient, the others theirs)
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        mask[self.index] = True
        return torch.where(mask.view(t.shape), flipped, t)

    def _take(self) -> bool:
        if self._wait:
            self._wait -= 1
            return False
        if self._left is None:
            self.fired += 1
            return True
        if self._left > 0:
            self._left -= 1
            self.fired += 1
            return True
        return False

    def _on_output(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        if not self.armed:
            return None
        if isinstance(out, torch.Tensor):
            return self.corrupt(out) if self._take() else None
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self.corrupt(out[0]), *out[1:]) if self._take() else None
        raise RewindValueError(
            f"FaultInjector: {type(module).__name__} returns {type(out).__name__}; target a module whose output is a "
            "tensor (or a tuple starting with one)."
        )

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor | None:
        return self.corrupt(grad) if self.armed and self._take() else None

    def __repr__(self) -> str:
        what = f"bit {self.bit if self.bit is not None else 'top exponent'} of element {self.index}"
        how = what if self.kind == "bitflip" else f"x{self.factor:g}"
        return f"FaultInjector({self.where}, {self.kind} {how}, fired={self.fired}, armed={self.armed})"
