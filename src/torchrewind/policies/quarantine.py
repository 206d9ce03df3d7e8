"""The quarantine: batches whose failure reproduced (bad data, or a model that cannot take them), kept in a file so that
a restarted run skips them too.

The file is JSON Lines, one batch per line: ``{"batch": <id>, "iteration": ..., "reason": ..., ...}``. Ids are any
JSON value (an int such as the batch's position in the stream, a string, a list of sample ids; tensors are turned
into lists). Lines are appended and flushed to disk as batches are quarantined, so a crash right after still leaves
them there; a half-written last line (a crash in the middle of a write) is ignored when the file is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._checks import check_bool, check_type
from ..distributed import rank_and_world
from ..errors import RewindTypeError, RewindValueError


def batch_key(batch_id: Any, who: str = "Quarantine") -> str:
    """The canonical text of a batch id (tuples and lists alike, dict keys sorted), used to compare ids."""
    return json.dumps(plain_id(batch_id, who), sort_keys=True, separators=(",", ":"))


def plain_id(batch_id: Any, who: str = "Quarantine") -> Any:
    """A batch id as plain JSON data (tensors and tuples become lists)."""
    if isinstance(batch_id, torch.Tensor):
        batch_id = batch_id.tolist()
    try:
        return json.loads(json.dumps(batch_id, allow_nan=False))
    except (TypeError, ValueError):
        raise RewindTypeError(
            f"{who}: a batch id must be JSON data (an int, a str, a list of sample ids, a tensor of them), got "
            f"{type(batch_id).__name__}."
        ) from None


class Quarantine:
    """A set of batch ids, mirrored in a JSON Lines file (optional): :meth:`add` appends, ``batch_id in q`` tests.
    Built on an existing file it starts with the batches already there, so a restarted run skips them.

    Under torch.distributed only global rank 0 writes (``write=None``); every rank reads the file when it is built,
    so put it on storage all ranks see. Without a ``path`` it lives in memory (and in the owner's ``state_dict``).

    Example::

        q = Quarantine("quarantine.jsonl")       # reads the batches quarantined by earlier runs
        if 1234 in q: ...                        # skip batch 1234
        q.add(1234, iteration=1234, reason="non-finite loss, reproduced")
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, write: bool | None = None) -> None:
        who = "Quarantine"
        if path is not None:
            check_type("path", path, (str, os.PathLike), who, "a file path (str or Path) or None")
        if write is not None:
            check_bool("write", write, who)
        self.path = Path(path) if path is not None else None
        self._write = write
        self.entries: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        if self.path is not None and self.path.exists():
            self._read()

    def _read(self) -> None:
        assert self.path is not None
        text = self.path.read_text()
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                if n == len(lines) and not text.endswith("\n"):
                    continue  # a write cut short by a crash: that batch was never confirmed
                raise RewindValueError(f"Quarantine: line {n} of {self.path} is not JSON: {line[:80]!r}.") from None
            if not isinstance(entry, Mapping) or "batch" not in entry:
                raise RewindValueError(f"Quarantine: line {n} of {self.path} has no 'batch': {line[:80]!r}.")
            self._remember(dict(entry))

    def _remember(self, entry: dict[str, Any]) -> bool:
        key = batch_key(entry["batch"])
        if key in self._keys:
            return False
        self._keys.add(key)
        self.entries.append(entry)
        return True

    @property
    def write(self) -> bool:
        """Whether this process appends to the file: ``write=`` if given, else whether it is global rank 0 (asked
        when writing: a Quarantine built before torch.distributed is initialized still writes on rank 0 only)."""
        return (rank_and_world()[0] == 0) if self._write is None else self._write

    def __contains__(self, batch_id: Any) -> bool:
        return bool(self._keys) and batch_key(batch_id) in self._keys

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[Any]:
        """The quarantined batch ids, in the order they were added."""
        return [e["batch"] for e in self.entries]

    def add(self, batch_id: Any, **info: Any) -> bool:
        """Quarantine ``batch_id`` (with ``info``: iteration, reason, ...; JSON data). Returns False if it already
        was. Appends a line to the file (on the writing rank), flushed and synced."""
        entry = {"batch": plain_id(batch_id), **json.loads(json.dumps(info, default=str))}
        if not self._remember(entry):
            return False
        if self.path is not None and self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, allow_nan=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return True

    # -- state (the in-memory set, for a run without a file) ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Add the saved entries to those already known (from the file): a union, never a removal."""
        who = "Quarantine.load_state_dict"
        check_type("state_dict", state_dict, Mapping, who, "a dict returned by Quarantine.state_dict()")
        entries = check_type("entries", state_dict.get("entries"), (list, tuple), who, "a list of entries")
        for e in entries:
            if not isinstance(e, Mapping) or "batch" not in e:
                raise RewindValueError(f"{who}: not a quarantine entry: {e!r}.")
        for e in entries:
            self._remember(dict(e))

    def __repr__(self) -> str:
        return f"Quarantine({str(self.path) if self.path else 'in memory'}, {len(self)} batches)"
