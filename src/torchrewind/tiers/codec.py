"""Bitwise-lossless compression of snapshot buffers as deltas against a neighbouring snapshot.

Pipeline (encode; decode runs it backwards):

1. **XOR** with the reference snapshot's bytes (same layout, possibly shorter or longer: only the common prefix is
   XOR-ed). Between two training steps most float bits do not change — the sign, the exponent and the top of the
   mantissa — so the XOR is mostly zero bytes.
2. **Byte-plane shuffle** with ``itemsize`` (4 for float32 state): byte ``j`` of every element goes to plane ``j``,
   so the (near-)zero high bytes form long runs.
3. **zstd** (``zstandard``, level 1 by default): fast, and well kept.

XOR and the shuffle are integer array ops, so every bit pattern (NaN payloads, -0.0, denormals, any dtype) comes
back exactly.

Measured (``benchmarks/bench_delta.py`` histories: MLP 64-1024-1024-10 on digits, 100 steps after 200; each snapshot
against its newer neighbour; one core, best of 3 CPU time, MB/s of uncompressed input, XOR included):

=====================================  ==============  ==============
pipeline                               Adam (13.5 MB)  SGD+mom (9 MB)
=====================================  ==============  ==============
XOR+planes, zstd -1/-1/1/1 (this)      1.66x, ~480     1.51x, ~470
XOR+planes, zstd 1 on every plane      1.71x,  314     1.56x,  413
XOR+planes, zstd -1 on every plane     1.58x,  531     1.46x,  570
XOR+planes, lz4 block                  1.52x,  545     1.40x,  737
XOR+planes, zlib 1                     1.66x,   46     1.52x,   51
XOR, blosc2 zstd 1 + shuffle           1.71x,  460     1.56x,  435
XOR, blosc2 lz4 5 + shuffle            1.49x,  862     1.38x,  848
XOR, no shuffle, zstd 1                1.52x, ~360     1.41x, ~310
planes, no XOR, zstd 1                 1.20x           1.17x
=====================================  ==============  ==============

Only zstd (or blosc2's zstd) keeps SGD at >= 1.5x; lz4 is faster but misses the ratio; zlib is 10x too slow to be a
fallback, hence the hard ``RewindError`` without zstandard. Encode speed depends on how busy the machine is: the
table's runs shared the 2 cores (250-350 MB/s wall clock then); later quiet runs of ``bench_delta.py`` gave
719-867 MB/s (Adam) and 829-842 MB/s (SGD) encode, 1.3-1.6 GB/s decode. zstd's literal coding of the third plane
(bits 16-23) is the largest single cost (~30%); reusing the work arrays instead of allocating them per call measured
no gain (glibc reuses the freed blocks).

Example::

    enc = encode(new_words, ref=old_words)      # int64/uint8 CPU tensors
    assert torch.equal(decode(enc, ref=old_words), new_words)
    print(enc.nbytes / (new_words.numel() * 8))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the delta extra
    np = None

from ..errors import RewindError

LEVEL = 1


def _zstd():
    try:
        import zstandard

        if np is None:
            raise ImportError("numpy")
    except ImportError:
        raise RewindError(
            "compressed history needs the zstandard and numpy packages: pip install 'torchrewind[delta]' "
            "(or use HostArchive(compress=False))."
        ) from None
    return zstandard


@dataclass(frozen=True)
class Encoded:
    """One compressed buffer: a zstd frame per byte plane plus one for the tail, the original length and dtype."""

    frames: tuple[bytes, ...]
    length: int
    dtype: torch.dtype
    itemsize: int
    ref_length: int  # bytes XOR-ed with the reference (0: no reference)

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


def _bytes(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.device.type != "cpu" or not t.is_contiguous():
        raise RewindError(f"codec: {what} must be a 1-D contiguous CPU tensor, got {_describe(t)}.")
    return t.view(torch.uint8)


def _describe(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} shape {tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else " (non-contiguous)")


def _xor_prefix(dst: np.ndarray, ref: np.ndarray, n: int) -> None:
    """dst[:n] ^= ref[:n] on bytes, done on 8-byte words where possible (8x fewer elements)."""
    w = n // 8 * 8
    if w:
        np.bitwise_xor(dst[:w].view(np.uint64), ref[:w].view(np.uint64), out=dst[:w].view(np.uint64))
    if n > w:
        np.bitwise_xor(dst[w:n], ref[w:n], out=dst[w:n])


def _xored(b: np.ndarray, ref: np.ndarray, n: int) -> np.ndarray:
    """A new array: b with its first n bytes XOR-ed with ref's (one pass over the words)."""
    out = np.empty_like(b)
    w = n // 8 * 8
    if w:
        np.bitwise_xor(b[:w].view(np.uint64), ref[:w].view(np.uint64), out=out[:w].view(np.uint64))
    np.bitwise_xor(b[w:n], ref[w:n], out=out[w:n])
    out[n:] = b[n:]
    return out


def _plane_level(j: int, itemsize: int, level: int) -> int:
    # The low bytes of a float delta are mantissa noise (~1.1x at best): zstd's fast mode gets the same ratio 4x
    # faster there; the high bytes (sign, exponent, top of the mantissa) are where the ratio comes from.
    return -1 if itemsize > 1 and j < itemsize // 2 else level


def encode(data: torch.Tensor, ref: torch.Tensor | None = None, *, itemsize: int = 4, level: int = LEVEL) -> Encoded:
    """Compress ``data`` (1-D CPU tensor, any dtype: its raw bytes) as a difference against ``ref``."""
    if itemsize not in (1, 2, 4, 8):
        raise RewindError(f"codec: itemsize must be 1, 2, 4 or 8, got {itemsize!r}.")
    if not isinstance(level, int) or not -7 <= level <= 22:
        raise RewindError(f"codec: level must be an int from -7 (fastest) to 22 (smallest), got {level!r} (default 1).")
    zstd = _zstd()
    b = _bytes(data, "data").numpy()
    n = 0
    if ref is not None:
        r = _bytes(ref, "ref").numpy()
        n = min(r.size, b.size)
        b = _xored(b, r, n)
    body = b.size // itemsize * itemsize
    planes = np.ascontiguousarray(b[:body].reshape(-1, itemsize).T)  # byte j of every element together
    frames = [
        zstd.ZstdCompressor(level=_plane_level(j, itemsize, level)).compress(planes[j].data) for j in range(itemsize)
    ]
    frames.append(zstd.ZstdCompressor(level=level).compress(b[body:].tobytes()))
    return Encoded(tuple(frames), data.numel() * data.element_size(), data.dtype, itemsize, n)


def decode(enc: Encoded, ref: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The exact bytes that were encoded (as a tensor of the original dtype), written into ``out`` if given."""
    if enc.ref_length and ref is None:
        raise RewindError("codec: this buffer was encoded against a reference; pass the same ref to decode().")
    zstd = _zstd()
    if enc.ref_length:
        r = _bytes(ref, "ref").numpy()
        if r.size < enc.ref_length:
            raise RewindError("codec: ref is shorter than the reference this buffer was encoded against.")
    if out is None:
        out = torch.empty(enc.length // enc.dtype.itemsize, dtype=enc.dtype)
    elif out.numel() * out.element_size() != enc.length:
        raise RewindError(f"codec: out holds {out.numel() * out.element_size()} bytes, the buffer {enc.length}.")
    o = _bytes(out, "out").numpy()
    k = enc.itemsize
    body = enc.length // k * k
    d = zstd.ZstdDecompressor()
    if body:
        cols = o[:body].reshape(-1, k)
        for j in range(k):
            cols[:, j] = np.frombuffer(d.decompress(enc.frames[j], max_output_size=body // k), dtype=np.uint8)
    o[body:] = np.frombuffer(d.decompress(enc.frames[k], max_output_size=enc.length - body), dtype=np.uint8)
    if enc.ref_length:
        _xor_prefix(o, r, enc.ref_length)
    return out
