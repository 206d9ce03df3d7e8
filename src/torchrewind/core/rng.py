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


def rng_to_tree(saved: dict[str, Any]) -> dict[str, Any]:
    """A captured RNG state as plain tensors, numbers and tuples (what a checkpoint file can hold): NumPy's key
    array becomes an int64 tensor."""
    out = dict(saved)
    if "numpy" in out:
        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return out


def rng_from_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`rng_to_tree`, ready for :meth:`RNGState.restore`. Generator states are cloned: they
    may be views into a larger buffer, which ``set_rng_state``/``set_state`` do not accept."""
    out = dict(tree)
    if "cpu" in out:
        out["cpu"] = out["cpu"].clone()
    if "cuda" in out:
        out["cuda"] = [s.clone() for s in out["cuda"]]
    if "generators" in out:
        out["generators"] = [s.clone() for s in out["generators"]]
    if "numpy" in out:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    if "python" in out:
        version, state, gauss = out["python"]
        out["python"] = (version, tuple(state), gauss)
    return out
