"""Start a CPU process group's ranks for a test: ``spawn(fn, *args)`` runs ``fn(rank, world, port, *args)`` in each.

Ranks are forked on Linux, as many of torch's own distributed tests are (``MultiProcessTestCase._fork_processes``):
they start with torch and the test helpers already imported, ~6 s sooner per test than ``spawn``'s fresh interpreters
(the distributed tests were 140 s of the suite). Elsewhere (macOS, Windows) fork is unsafe or missing: they are
spawned."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` ranks; a rank's exception is re-raised here."""
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method=START_METHOD)
