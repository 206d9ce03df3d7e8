"""Exceptions raised by torchrewind.

Every error is a :class:`RewindError`. Bad arguments follow Python's conventions as well: an argument of the wrong
type raises :class:`RewindTypeError` (also a ``TypeError``), one of the right type with a bad value
:class:`RewindValueError` (also a ``ValueError``), so both ``except RewindError`` and ``except ValueError`` work.
"""

from __future__ import annotations


class RewindError(RuntimeError):
    """Bad input or an impossible request. Raised before anything is changed: the training state is untouched."""


class RewindTypeError(RewindError, TypeError):
    """An argument of the wrong type (a ``TypeError`` and a :class:`RewindError`)."""


class RewindValueError(RewindError, ValueError):
    """An argument of the right type with a value that cannot be used (a ``ValueError`` and a :class:`RewindError`)."""
