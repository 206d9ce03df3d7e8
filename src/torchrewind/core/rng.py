"""Capture and restore of random number generator states, so dropout and sampling repeat exactly after undo."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch


class RNGState:
    """Which generators to capture. ``torch`` covers the CPU generator and, once CUDA is initialised, every CUDA
    device's; ``python``/``numpy`` add the global ``random`` and ``numpy.random`` states; ``generators`` adds
    user-created ``torch.Generator`` objects (e.g. a DataLoader's)."""

    def __init__(
        self, torch_rng: bool, python: bool, numpy: bool, generators: Sequence[torch.Generator] = ()
    ) -> None:
        self.torch_rng = torch_rng
        self.python = python
        self.numpy = numpy
        self.generators = tuple(generators)
        for g in self.generators:
            if not isinstance(g, torch.Generator):
                from ..errors import RewindTypeError

                raise RewindTypeError(f"generators must be torch.Generator objects, got {type(g).__name__}.")
        if numpy:
            import numpy as np  # noqa: F401  (fail early, at construction, if numpy is missing)

    @property
    def active(self) -> bool:
        return bool(self.torch_rng or self.python or self.numpy or self.generators)

    def capture(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.torch_rng:
            out["cpu"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["cuda"] = torch.cuda.get_rng_state_all()
        if self.python:
            out["python"] = random.getstate()
        if self.numpy:
            import numpy as np

            out["numpy"] = np.random.get_state()
        if self.generators:
            out["generators"] = [g.get_state() for g in self.generators]
        return out

    def restore(self, saved: dict[str, Any]) -> None:
        if "cpu" in saved:
            torch.set_rng_state(saved["cpu"])
        if "cuda" in saved:
            torch.cuda.set_rng_state_all(saved["cuda"])
        if "python" in saved:
            random.setstate(saved["python"])
        if "numpy" in saved:
            import numpy as np

            np.random.set_state(saved["numpy"])
        for g, s in zip(self.generators, saved.get("generators", ())):
            g.set_state(s)
