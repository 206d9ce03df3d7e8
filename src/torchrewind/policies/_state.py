"""The ``state_dict`` format every policy piece shares, in the torch convention: plain dicts, lists, numbers and
strings (``torch.save``-able, loadable with ``torch.load(weights_only=True)``, and JSON-able), headed by what saved
them and with which settings, loaded all or nothing.

A state looks like ``{"type": "SpikeGuard", "version": 1, "settings": {...}, <counters and statistics>}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._checks import check_type
from ..errors import RewindValueError

VERSION = 1


def header(obj: object, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The first keys of ``obj``'s state: its type, the format version and the settings it was built with."""
    return {"type": type(obj).__name__, "version": VERSION, "settings": dict(settings)}


def check_state(
    obj: object, state: Any, settings: Mapping[str, Any], keys: Iterable[str], strict: bool, who: str = ""
) -> Mapping[str, Any]:
    """Validate the header of a state for ``obj``: saved by the same type, in this format, with ``keys``; with
    ``strict`` also with the same ``settings``. Raises a RewindError that says what differs; changes nothing."""
    name = type(obj).__name__
    who = who or f"{name}.load_state_dict"
    check_type("state_dict", state, Mapping, who, f"a dict returned by {name}.state_dict()")
    kind = state.get("type")
    if kind != name:
        raise RewindValueError(
            f"{who}: this state was saved by a {kind!r}, not a {name!r}; load it into the kind of object that saved it."
        )
    if state.get("version") != VERSION:
        raise RewindValueError(
            f"{who}: the state has format version {state.get('version')!r}; this torchrewind reads version {VERSION}."
        )
    missing = [k for k in ("settings", *keys) if k not in state]
    if missing:
        raise RewindValueError(f"{who}: the state lacks {missing}; pass what {name}.state_dict() returned.")
    saved = state["settings"]
    check_type("state_dict['settings']", saved, Mapping, who, "a dict")
    if strict:
        diffs = [
            f"{k}: {saved[k]!r} saved, {v!r} here" if k in saved else f"{k}: not saved, {v!r} here"
            for k, v in settings.items()
            if k not in saved or saved[k] != v
        ]
        if diffs:
            raise RewindValueError(
                f"{who}: the state was saved with other settings ({'; '.join(diffs)}). Build the {name} with the "
                "saved settings, or load with strict=False to keep this one's settings and take only the saved "
                "statistics and counters."
            )
    return state


def load_all(parts: Iterable[tuple[Any, Any]], strict: bool) -> None:
    """``obj.load_state_dict(state, strict=strict)`` for each pair; if one refuses, the ones already loaded get their
    previous state back: all or nothing."""
    done: list[tuple[Any, Any]] = []
    try:
        for obj, state in parts:
            before = obj.state_dict()
            obj.load_state_dict(state, strict=strict)
            done.append((obj, before))
    except BaseException:
        for obj, before in reversed(done):
            obj.load_state_dict(before, strict=False)
        raise
