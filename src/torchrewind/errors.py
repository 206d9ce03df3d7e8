"""Exceptions raised by torchrewind."""

from __future__ import annotations


class RewindError(RuntimeError):
    """Bad input or an impossible request. Raised before anything is changed: the training state is untouched."""
