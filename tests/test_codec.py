"""The delta codec is bitwise lossless for any bytes, with or without a reference of any length."""

from __future__ import annotations

import struct

import pytest
import torch

pytest.importorskip("blosc2")
pytest.importorskip("numpy")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchrewind import RewindError  # noqa: E402
from torchrewind.tiers.codec import decode, encode  # noqa: E402


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def roundtrip(data: torch.Tensor, ref: torch.Tensor | None, itemsize: int = 4) -> None:
    enc = encode(data, ref, itemsize=itemsize)
    out = decode(enc, ref)
    assert out.dtype == data.dtype and out.shape == data.shape
    assert torch.equal(as_bytes(out), as_bytes(data))  # raw bits, never allclose
    buf = torch.empty_like(data)
    assert decode(enc, ref, out=buf) is buf and torch.equal(as_bytes(buf), as_bytes(data))


def adversarial_floats(dtype: torch.dtype) -> torch.Tensor:
    """NaNs with payloads (quiet and signalling), both infinities, -0.0, denormals, extremes, random values."""
    if dtype == torch.float32:
        bits = [0x7FC00001, 0x7F800001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF,
                0x7F7FFFFF, 0x00800000]  # fmt: skip
        special = torch.tensor([struct.unpack("<i", struct.pack("<I", b))[0] for b in bits], dtype=torch.int32)
        special = special.view(torch.float32)
    else:  # payload NaNs (quiet and signalling), +-inf, -0.0, smallest denormal, built from int bit patterns
        bits = {
            torch.float64: (torch.int64, [0x7FF0000000000001, 0xFFF8DEADBEEF0001 - (1 << 64), 0x7FF0000000000000,
                                          -(1 << 63), 1, 0x000FFFFFFFFFFFFF]),
            torch.float16: (torch.int16, [0x7C01, 0xFE37 - (1 << 16), 0x7C00, -(1 << 15), 1, 0x03FF]),
            torch.bfloat16: (torch.int16, [0x7F81, 0xFFC1 - (1 << 16), 0x7F80, -(1 << 15), 1, 0x007F]),
        }[dtype]  # fmt: skip
        special = torch.tensor(bits[1], dtype=bits[0]).view(dtype)
    return torch.cat([special, torch.randn(997).to(dtype)])


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ref_kind", ["none", "same", "shorter", "longer"])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_roundtrip_every_dtype_and_reference(dtype, ref_kind, itemsize):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        data = adversarial_floats(dtype)
    else:
        info = torch.iinfo(dtype)
        data = torch.randint(info.min, info.max, (1003,), dtype=dtype, generator=g)
    ref = {
        "none": None,
        "same": data.clone().view(torch.uint8)[torch.randperm(data.numel() * data.element_size(), generator=g)],
        "shorter": torch.randint(0, 255, (37,), dtype=torch.uint8, generator=g),
        "longer": torch.randint(0, 255, (data.numel() * data.element_size() + 101,), dtype=torch.uint8, generator=g),
    }[ref_kind]
    roundtrip(data, ref, itemsize)


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 63, 64, 65])
def test_odd_and_empty_lengths(n):
    data = torch.arange(n, dtype=torch.uint8)
    roundtrip(data, None)
    roundtrip(data, torch.full((n // 2,), 0xA5, dtype=torch.uint8))
    roundtrip(data, torch.full((n + 5,), 0x5A, dtype=torch.uint8))


def test_training_like_delta_compresses():
    torch.manual_seed(0)
    a = torch.randn(100_000)
    b = a + 1e-3 * torch.randn(100_000)  # a small step: sign and exponent bytes unchanged
    enc = encode(b, a)
    assert enc.nbytes < 0.8 * b.numel() * 4
    roundtrip(b, a)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    data=st.binary(max_size=300),
    ref=st.one_of(st.none(), st.binary(max_size=300)),
    itemsize=st.sampled_from([1, 2, 4, 8]),
)
def test_random_bytes(data, ref, itemsize):
    d = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    r = None
    if ref is not None:
        r = torch.frombuffer(bytearray(ref), dtype=torch.uint8) if ref else torch.empty(0, dtype=torch.uint8)
    roundtrip(d, r, itemsize)


def test_bad_input():
    x = torch.zeros(16)
    with pytest.raises(RewindError, match="1-D contiguous CPU tensor"):
        encode(torch.zeros(4, 4))
    with pytest.raises(RewindError, match="1-D contiguous CPU tensor"):
        encode(torch.zeros(32)[::2])
    with pytest.raises(RewindError, match="itemsize must be"):
        encode(x, itemsize=3)
    enc = encode(x, torch.ones(16))
    with pytest.raises(RewindError, match="pass the same ref"):
        decode(enc)
    with pytest.raises(RewindError, match="shorter than the reference"):
        decode(enc, torch.ones(3))
    with pytest.raises(RewindError, match="out holds"):
        decode(enc, torch.ones(16), out=torch.empty(15))


def test_bad_device_level_and_missing_library(monkeypatch):
    with pytest.raises(RewindError, match="1-D contiguous CPU tensor"):
        encode(torch.zeros(8), torch.zeros(8, device="meta"))  # any non-CPU device, as a CUDA ref would be
    with pytest.raises(RewindError, match="level must be"):
        encode(torch.zeros(8), level=99)
    monkeypatch.setitem(__import__("sys").modules, "blosc2", None)
    with pytest.raises(RewindError, match=r"pip install 'torchrewind\[delta\]'"):
        encode(torch.zeros(8))


def test_segments_threads_and_chunks():
    """Mixed element sizes (bf16 weights, fp32 moments, a stray odd tail), buffers larger than a chunk, several
    threads: still bitwise, and fp32 moments coded as fp32 compress better than as 16-bit halves."""
    from torchrewind.tiers.codec import CHUNK

    g = torch.Generator().manual_seed(1)
    w = torch.randn(CHUNK, generator=g).to(torch.bfloat16)  # 2 MiB: two chunks
    m = torch.randn(300_001, generator=g)
    data = torch.cat([w.view(torch.uint8), m.view(torch.uint8), torch.tensor([1, 2, 3], dtype=torch.uint8)])
    w2 = (w.float() + 1e-3 * torch.randn(w.shape, generator=g)).to(torch.bfloat16)
    m2 = m + 1e-4 * torch.randn(m.shape, generator=g)
    ref = torch.cat([w2.view(torch.uint8), m2.view(torch.uint8)])  # 3 bytes shorter than data
    segs = [(w.numel() * 2, 2), (m.numel() * 4 + 3, 4)]
    import blosc2

    blobs = {}
    for threads in (1, 3):
        enc = encode(data, ref, segments=segs, threads=threads)
        assert len(enc.chunks) >= 4 and {c.itemsize for c in enc.chunks} == {1, 2, 4}
        assert torch.equal(decode(enc, ref, threads=threads), data)
        blobs[threads] = enc.to_bytes()
        # threads turn blosc2's GIL release on for the call only: the process's setting is what it was
        assert blosc2.set_releasegil(False) is False
    assert blobs[1] == blobs[3]  # the bytes do not depend on the number of threads
    as_halves = encode(data, ref, itemsize=2)
    assert torch.equal(decode(as_halves, ref), data)
    assert enc.nbytes < 0.9 * as_halves.nbytes


def test_serialized_format_is_versioned_and_checked():
    from torchrewind.tiers.codec import FORMAT, from_bytes

    a = torch.randn(50_000)
    b = a + 1e-3 * torch.randn(50_000)
    blob = encode(b, a).to_bytes()
    assert torch.equal(decode(from_bytes(blob), a), b)
    old = bytearray(blob)
    old[4:6] = (FORMAT - 1).to_bytes(2, "little")  # what torchrewind 0.1 would have been
    with pytest.raises(RewindError, match=f"format version {FORMAT - 1}.*another torchrewind version"):
        from_bytes(bytes(old))
    for cut in (3, 30, len(blob) // 2, len(blob) - 1):
        with pytest.raises(RewindError, match="truncated or corrupt"):
            from_bytes(blob[:cut])
    with pytest.raises(RewindError, match="truncated or corrupt"):
        from_bytes(b"XXXX" + blob[4:])
    bad = bytearray(blob)
    bad[-100] ^= 0x10  # inside the compressed data: the CRC catches it, nothing decodes to wrong bits
    out = torch.full_like(b, 7.0)
    with pytest.raises(RewindError, match="fails its checksum"):
        decode(from_bytes(bytes(bad)), a, out=out)


def test_checksum_kinds_and_missing_xxhash(monkeypatch):
    """xxh3 per chunk where xxhash is installed, CRC-32 otherwise; a buffer names its checksum, survives
    serialization, and one checksummed with xxh3 is refused with the install hint when xxhash is missing."""
    import sys

    from torchrewind.tiers.codec import from_bytes

    pytest.importorskip("xxhash")
    a = torch.randn(70_000)
    b = a + 1e-3 * torch.randn(70_000)
    fast = encode(b, a)
    assert fast.checksum == "xxh3_64" and torch.equal(decode(from_bytes(fast.to_bytes()), a), b)
    monkeypatch.setitem(sys.modules, "xxhash", None)
    slow = encode(b, a)
    assert slow.checksum == "crc32" and torch.equal(decode(from_bytes(slow.to_bytes()), a), b)
    with pytest.raises(RewindError, match=r"xxh3, which needs xxhash: pip install 'torchrewind\[delta\]'"):
        decode(fast, a)


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_references_ending_anywhere_in_a_chunk(itemsize):
    """The reference may end inside a chunk, at a chunk boundary, or before the first element: the referenced part
    is differenced, the rest coded on its own, bit for bit."""
    from torchrewind.tiers.codec import CHUNK

    g = torch.Generator().manual_seed(itemsize)
    data = torch.randint(0, 256, (2 * CHUNK + 5 * 8 + 3,), dtype=torch.uint8, generator=g)
    for n in (0, itemsize - 1, 7, CHUNK - 3, CHUNK, CHUNK + 9, 2 * CHUNK, data.numel(), data.numel() + 9):
        ref = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        ref[: min(n, data.numel())] = data[: min(n, data.numel())] ^ 1  # small differences where it overlaps
        enc = encode(data, ref, itemsize=itemsize)
        assert enc.ref_length == min(n, data.numel())
        assert torch.equal(decode(enc, ref), data)
