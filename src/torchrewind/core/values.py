"""Copying and restoring arbitrary "small" state: Python values, containers and loose tensors.

Everything that is not re-homed into an arena (optimizer hyperparameters, scheduler state, Python-valued
optimizer state, tensors nested in lists such as LBFGS's history) goes through :func:`copy_value` on capture
and :func:`restore_value` on restore. Both keep the stored copy pristine, so one snapshot can be restored
any number of times (undo, then redo, then undo again).
"""

from __future__ import annotations

import copy
import enum
from collections import OrderedDict, defaultdict
from typing import Any

import torch

# Values that can be shared between the live state and a snapshot because nothing can mutate them.
_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    type,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    enum.Enum,
)
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})  # exact types, for a cheap set lookup


def _is_plain_dense(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a.copy_(b)`` writes every element of ``a`` and keeps b's exact memory layout."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def copy_tensor(t: torch.Tensor, reuse: Any = None) -> torch.Tensor:
    """Copy ``t`` bit for bit, into ``reuse`` when it has the same shape, dtype, device and strides."""
    if (
        isinstance(reuse, torch.Tensor)
        and _is_plain_dense(t)
        and type(reuse) is torch.Tensor
        and _same_layout(reuse, t)
    ):
        with torch.no_grad():
            reuse.copy_(t)
        return reuse
    with torch.no_grad():
        # clone(preserve_format) keeps strides; detach() drops autograd history and Parameter-ness.
        if t.layout != torch.strided:
            return t.detach().clone()  # sparse etc.: preserve_format is not supported
        return t.detach().clone(memory_format=torch.preserve_format)


def copy_value(v: Any, reuse: Any = None) -> Any:
    """Deep-copy ``v``: tensors are cloned (into ``reuse``'s tensors where shapes match), containers rebuilt,
    immutable scalars shared. Unknown objects fall back to :func:`copy.deepcopy`."""
    if isinstance(v, _IMMUTABLE):
        return v
    if isinstance(v, torch.Tensor):
        return copy_tensor(v, reuse)
    tv = type(v)
    if (tv is list or tv is tuple) and all(type(x) in _SCALARS for x in v):
        return v.copy() if tv is list else v  # fast path for lists of numbers (e.g. a detector's window)
    if tv is list:
        r = reuse if type(reuse) is list and len(reuse) == len(v) else None
        return [copy_value(x, r[i] if r is not None else None) for i, x in enumerate(v)]
    if tv is tuple or (isinstance(v, tuple) and hasattr(v, "_fields")):
        r = reuse if type(reuse) is tv and len(reuse) == len(v) else None
        items = [copy_value(x, r[i] if r is not None else None) for i, x in enumerate(v)]
        return tv(items) if tv is tuple else tv._make(items)
    if tv in (dict, OrderedDict, defaultdict):
        r = reuse if type(reuse) is tv else None
        out = tv(v.default_factory) if tv is defaultdict else tv()
        for k, x in v.items():
            out[k] = copy_value(x, r.get(k) if r is not None else None)
        return out
    if tv is set or tv is frozenset:
        return tv(copy_value(x) for x in v)
    return copy.deepcopy(v)


def restore_value(live: Any, saved: Any) -> Any:
    """Return the value to put back in place of ``live`` so that it equals ``saved``.

    A top-level tensor is written into ``live`` in place when compatible (keeping object identity, which
    hooks and capturable/fused optimizers rely on); anything else gets a fresh copy of ``saved``.
    """
    if (
        isinstance(saved, torch.Tensor)
        and isinstance(live, torch.Tensor)
        and _is_plain_dense(live)
        and type(saved) is torch.Tensor
        and _same_layout(live, saved)
    ):
        with torch.no_grad():
            live.copy_(saved)
        return live
    return copy_value(saved)


def values_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two values as produced by :func:`copy_value` (tensors via ``torch.equal`` on bits)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return tensors_bitwise_equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same metadata and the same bits (NaN payloads and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or a.layout != b.layout:
        return False
    if a.layout != torch.strided:
        a, b = a.coalesce() if a.is_sparse else a, b.coalesce() if b.is_sparse else b
        return values_equal(a.indices(), b.indices()) and values_equal(a.values(), b.values())
    a, b = a.detach(), b.detach()
    if a.is_floating_point() or a.is_complex():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
        size = a.element_size()
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
            size //= 2
        return torch.equal(a.contiguous().view(bits[size]), b.contiguous().view(bits[size]))
    return torch.equal(a, b)
