"""Argument checks with one wording everywhere: a wrong type raises RewindTypeError, a bad value RewindValueError."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from .errors import RewindTypeError, RewindValueError


def _where(who: str) -> str:
    return f"{who}: " if who else ""


def check_int(name: str, value: Any, lo: int | None = None, who: str = "", hint: str = "") -> int:
    """``value`` as an int ``>= lo``. bool is refused (``True`` is not a count)."""
    want = f"an int >= {lo}" if lo is not None else "an int"
    if not isinstance(value, int) or isinstance(value, bool):
        raise RewindTypeError(f"{_where(who)}{name} must be {want}, got {type(value).__name__} ({value!r}).{hint}")
    if lo is not None and value < lo:
        raise RewindValueError(f"{_where(who)}{name} must be {want}, got {value!r}.{hint}")
    return value


def check_optional_int(name: str, value: Any, lo: int | None = None, who: str = "") -> int | None:
    return None if value is None else check_int(name, value, lo, who)


def check_number(
    name: str,
    value: Any,
    who: str = "",
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float in [lo, hi] (open ends with ``lo_open``/``hi_open``); bool is refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RewindTypeError(f"{_where(who)}{name} must be a number, got {type(value).__name__} ({value!r}).")
    v = float(value)
    bad = (finite and not math.isfinite(v)) or math.isnan(v)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        where = f" in {left or '(-inf'}, {right or 'inf)'}" if (lo is not None or hi is not None) else ""
        raise RewindValueError(f"{_where(who)}{name} must be a {'finite ' if finite else ''}number{where}, got {value!r}.")
    return v


def check_bool(name: str, value: Any, who: str = "") -> bool:
    if value is not True and value is not False:
        raise RewindTypeError(f"{_where(who)}{name} must be True or False, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any], who: str = "") -> Any:
    """``value`` must be one of ``choices`` (compared with ==, types included: True is not 1)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return value
    raise RewindValueError(f"{_where(who)}{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_type(name: str, value: Any, types: type | tuple[type, ...], who: str = "", what: str = "") -> Any:
    if not isinstance(value, types):
        if not what:
            ts = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in ts)
        raise RewindTypeError(f"{_where(who)}{name} must be {what}, got {type(value).__name__}.")
    return value
