"""The fast checksum both on-disk/in-memory formats use: xxh3 from ``xxhash`` where installed, CRC-32 otherwise.

xxh3 runs at ~15 GB/s, free next to decompression or a write; CRC-32 (zlib, always there) costs ~10% of a decode.
A format records which one it used, so a reader without ``xxhash`` refuses an xxh3-checksummed buffer clearly instead
of calling it corrupt.
"""

from __future__ import annotations

from typing import Any

from ..errors import RewindError


def have_xxhash() -> bool:
    try:
        import xxhash  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def xxhash_or_refuse(what: str, install: str) -> Any:
    """The ``xxhash`` module, or a :class:`RewindError` that says ``what`` needs it and how to install it."""
    try:
        import xxhash
    except ImportError:
        raise RewindError(f"{what} is checksummed with xxh3, which needs xxhash: {install}.") from None
    return xxhash
