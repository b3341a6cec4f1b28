"""The lossless blob codec: bit-exact round trips on every bit pattern, and real compression."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard

from mergehub.storage import codec
from mergehub.storage.blob_format import sha256, unpack_blob
from mergehub.storage.codec import encode_lossless
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.lossy_blobs import decode_blob
from mergehub.storage.safetensors_format import SAFETENSORS_DTYPE


def _roundtrip(raw: bytes, dtype: str, ref: bytes | None = None) -> tuple[bytes, dict]:
    blob = encode_lossless(raw, dtype, sha256(raw), ("r" * 64, ref) if ref is not None else None)
    header, payload = unpack_blob(blob)
    assert header.nbytes == len(raw) and header.sha256 == sha256(raw)
    out = decode_blob(header, payload, ref if header.ref else None)
    return out, {"transform": header.params["transform"], "ratio": len(blob) / max(1, len(raw))}


def _specials(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny, -info.tiny,
            info.tiny / 4, -info.tiny / 8, info.max, -info.max, info.eps, 1.0, -1.0]
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_float_roundtrip_with_specials(dtype):
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(50_000, generator=gen) * 0.02).to(dtype)
    t = torch.cat([weights, _specials(dtype), weights[:7]])  # odd total length
    raw = t.view(torch.uint8).numpy().tobytes()
    name = SAFETENSORS_DTYPE[dtype]
    out, info = _roundtrip(raw, name)
    assert out == raw and info["transform"] == "exp"
    # against a reference that differs in half the values, specials included
    ref_t = t.clone()
    ref_t[::2] = (ref_t[::2].double() * 1.01).to(dtype)
    ref = ref_t.view(torch.uint8).numpy().tobytes()
    out, info = _roundtrip(raw, name, ref)
    assert out == raw and info["transform"] == "delta"


@pytest.mark.parametrize("width, dtype", [(2, "BF16"), (2, "F16")])
def test_every_16bit_pattern(width, dtype):
    x = np.arange(2**16, dtype=np.uint16)
    raw = x.tobytes()
    assert _roundtrip(raw, dtype)[0] == raw
    ref = np.random.default_rng(0).permutation(x).tobytes()  # deltas of every size and sign
    assert _roundtrip(raw, dtype, ref)[0] == raw


@pytest.mark.parametrize("dtype, npdtype", [("F32", np.uint32), ("F64", np.uint64),
                                            ("I64", np.int64), ("I32", np.int32),
                                            ("U8", np.uint8), ("BOOL", np.bool_)])
def test_random_bit_patterns(dtype, npdtype):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=8 * 4099, dtype=np.uint8).tobytes()
    ref = rng.integers(0, 256, size=len(raw), dtype=np.uint8).tobytes()
    out, info = _roundtrip(raw, dtype)
    assert out == raw and info["transform"] == "none"  # random bytes do not shrink: kept as is
    assert _roundtrip(raw, dtype, ref)[0] == raw


@pytest.mark.parametrize("dtype, npdtype", [("BF16", np.uint16), ("F16", np.uint16),
                                            ("F32", np.float32), ("F64", np.float64),
                                            ("I64", np.int64), ("I32", np.int32),
                                            ("U8", np.uint8)])
def test_roundtrip_across_decoding_blocks(dtype, npdtype):
    """Values are decoded a block at a time: tensors of several blocks and a partial one,
    coded as planes, exponents or deltas (compressible values, so nothing is kept as is)."""
    rng = np.random.default_rng(2)
    n = 3 * codec._BLOCK + 13
    if npdtype == np.uint16:  # half-precision bit patterns of small weights
        values = torch.from_numpy(rng.normal(0, 0.02, n)).to(
            torch.bfloat16 if dtype == "BF16" else torch.float16).view(torch.int16).numpy()
    elif np.issubdtype(npdtype, np.floating):
        values = rng.normal(0, 0.02, n).astype(npdtype)
    else:
        values = rng.integers(0, 50, n).astype(npdtype)
    raw = values.tobytes()
    out, info = _roundtrip(raw, dtype)
    assert out == raw and info["transform"] in ("exp", "planes")
    changed = values.copy()
    changed[::3] = np.roll(values, 1)[::3]  # a third of the values differ
    out, info = _roundtrip(raw, dtype, changed.tobytes())
    assert out == raw and info["transform"] == "delta"


def test_empty_and_unknown_dtype():
    assert _roundtrip(b"", "F32")[0] == b""
    raw = bytes(range(256)) * 3
    assert _roundtrip(raw, "F4_SOMETHING_NEW")[0] == raw


def test_compresses_weights_and_small_deltas():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(1_000_000, generator=gen) * 0.02).to(torch.bfloat16)
    ft = (w.float() + torch.randn(1_000_000, generator=gen) * 1e-3).to(torch.bfloat16)
    raw_w = w.view(torch.uint8).numpy().tobytes()
    raw_ft = ft.view(torch.uint8).numpy().tobytes()
    assert _roundtrip(raw_w, "BF16")[1]["ratio"] < 0.72  # exponent planes: ~0.68
    out, info = _roundtrip(raw_ft, "BF16", raw_w)
    assert out == raw_ft and info["ratio"] < 0.5  # zig-zag delta: ~0.46
    assert _roundtrip(raw_w, "BF16", raw_w)[1]["ratio"] < 0.01  # unchanged: almost nothing


def test_delta_needs_its_reference():
    raw = np.arange(1000, dtype=np.uint16).tobytes()
    ref = np.zeros(1000, dtype=np.uint16).tobytes()
    header, payload = unpack_blob(encode_lossless(raw, "BF16", sha256(raw), ("r" * 64, ref)))
    with pytest.raises(BlobFormatError, match="without its reference"):
        decode_blob(header, payload, None)


def test_malformed_blob():
    with pytest.raises(BlobFormatError, match="bad magic"):
        unpack_blob(b"nope" + b"\0" * 10)
    with pytest.raises(BlobFormatError, match="header"):
        unpack_blob(b"MHB1" + (5).to_bytes(4, "little") + b"{bad}")


# --- version 2 (chunked) and version 1 (whole-tensor planes) --------------------------------

def encode_v1(raw: bytes, dtype: str, raw_sha256: str, ref: tuple[str, bytes] | None = None) -> bytes:
    """A blob as mergehub wrote it before chunking (format version 1): mergehub's own
    ``encode_lossless`` of that time (commit 1a47d49), verbatim but for the names."""
    nbytes = len(raw)
    w = codec._width(dtype, nbytes)
    x = np.frombuffer(raw, codec._UINT[w])
    if ref is not None and len(ref[1]) == nbytes:
        transform, ref_id = "delta", ref[0]
        body = codec._planes(codec._zigzag_delta(x, np.frombuffer(ref[1], codec._UINT[w])))
    elif dtype in codec._FLOAT_BITS and w == codec.DTYPE_WIDTH[dtype]:
        transform, ref_id, body = "exp", None, codec._exp_split(x, *codec._FLOAT_BITS[dtype])
    else:
        transform, ref_id, body = "planes", None, codec._planes(x)
    compressor = zstandard.ZstdCompressor(level=1)
    frames = [compressor.compress(p) for p in body]
    payload = struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames)) + b"".join(frames)
    if len(payload) >= nbytes:
        transform, ref_id, payload = "none", None, bytes(raw)
    header = codec.BlobHeader("lossless", dtype, nbytes, raw_sha256, ref_id,
                              {"transform": transform, "width": w})
    return codec.pack_blob(header, payload)


def _weights(n: int, dtype: torch.dtype, seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.02).to(dtype).view(torch.uint8).numpy().tobytes()


def _pieces(header, payload, ref: bytes | None) -> list[bytes]:
    """The decoded pieces; decoding in place (``into``) must give the same bytes in each
    piece's place, every byte written (the buffer starts as 0xA5 everywhere)."""
    refs = (lambda: [ref] if ref is not None else None)
    pieces = [bytes(p) for p in codec.decode_lossless_chunks(header, codec.Payload(payload),
                                                             refs())]
    into = bytearray(b"\xa5" * header.nbytes)
    placed = [bytes(p) for p in codec.decode_lossless_chunks(
        header, codec.Payload(payload), refs(), memoryview(into))]
    assert placed == pieces and bytes(into) == b"".join(pieces)
    return pieces


@pytest.mark.parametrize("dtype, torch_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16),
                                                ("F32", torch.float32), ("F64", torch.float64)])
def test_chunked_round_trip(monkeypatch, dtype, torch_dtype):
    """A tensor of several chunks (and a shorter last one) is coded chunk by chunk, decodes to
    the same bytes a chunk at a time, with and without a reference."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    raw = _weights(10_000 + 3, torch_dtype)  # not a multiple of the chunk
    ref = bytearray(raw)
    ref[::7] = bytes(len(ref[::7]))  # a reference that differs in some bytes
    for r in (None, bytes(ref)):
        blob = encode_lossless(raw, dtype, sha256(raw), ("r" * 64, r) if r is not None else None)
        header, payload = unpack_blob(blob)
        assert header.version == 2 and header.params["chunk"] == 4096
        assert header.params["transform"] == ("delta" if r is not None else "exp")
        pieces = _pieces(header, payload, r)
        assert [len(p) for p in pieces] == [4096] * (len(raw) // 4096) + [len(raw) % 4096]
        assert b"".join(pieces) == raw == decode_blob(header, payload, r)


def test_chunked_stores_a_chunk_that_does_not_shrink_as_is(monkeypatch):
    """Each chunk falls back to its bytes as they are on its own: a random chunk between two
    compressible ones is stored raw (frame count 0), and the blob still decodes."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    raw = bytes(4096) + noise + bytes(4096)
    header, payload = unpack_blob(encode_lossless(raw, "U8", sha256(raw)))
    assert header.params["transform"] == "planes"
    first = struct.unpack_from("<IQ", payload)
    second = struct.unpack_from("<I", payload, 12 + first[1])[0]
    assert first[0] == 1 and second == 0  # one zstd frame, then a chunk stored as is
    assert decode_blob(header, payload, None) == raw
    assert b"".join(_pieces(header, payload, None)) == raw
    # nothing shrinks: the blob is "none", without the reference it would not use
    header, payload = unpack_blob(encode_lossless(noise, "U8", sha256(noise), ("r" * 64, raw[:4096])))
    assert header.params["transform"] == "none" and header.ref is None
    assert decode_blob(header, payload, None) == noise


@pytest.mark.parametrize("dtype, torch_dtype", [("BF16", torch.bfloat16), ("F64", torch.float64),
                                                ("I32", None), ("U8", None)])
def test_version_1_blobs_still_decode(monkeypatch, dtype, torch_dtype):
    """Blobs written by the encoder before chunking decode to the same bytes: whole, and a
    piece at a time (their planes decompressed as streams, in step), every transform."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    if torch_dtype is not None:
        raw = _weights(5_001, torch_dtype)
    else:
        raw = np.arange(20_004, dtype=np.uint8).tobytes() if dtype == "U8" else \
            (np.arange(5_001, dtype=np.int32) % 7).tobytes()
    noise = np.random.default_rng(1).integers(0, 256, len(raw), dtype=np.uint8).tobytes()
    ref = bytes(a ^ (b & 1) for a, b in zip(raw, noise))
    cases = [(raw, None), (raw, ref), (noise, None)]
    transforms = set()
    for data, r in cases:
        blob = encode_v1(data, dtype, sha256(data), ("r" * 64, r) if r is not None else None)
        header, payload = unpack_blob(blob)
        transforms.add(header.params["transform"])
        assert header.version == 1
        pieces = _pieces(header, payload, r if header.ref else None)
        assert max(map(len, pieces)) <= 4096 and b"".join(pieces) == data
        assert decode_blob(header, payload, r if header.ref else None) == data
    assert {"delta", "none"} <= transforms and transforms & {"exp", "planes"}


def test_rechunk_cuts_pieces_of_any_size_and_passes_a_whole_last_piece_as_it_came():
    """rechunk gives `total` bytes in pieces of `size` (the last shorter), from pieces of any
    size; a final piece that needs no joining (a delta's reference of at most a chunk) comes
    out as the same memory, not a copy, and only once its source is exhausted (so the checks
    the source makes after its last piece have run); more or fewer bytes raise."""
    from mergehub.storage.blob_format import rechunk

    data = bytes(range(256)) * 40  # 10240 bytes
    for cuts in ([10240], [1, 4095, 4096, 4048], [5000, 5240], [4096, 4096, 2048],
                 [3] * 3413 + [1], [0, 4096, 0, 6144, 0]):
        pieces, at = [], 0
        for c in cuts:
            pieces.append(data[at:at + c])
            at += c
        out = [bytes(p) for p in rechunk(pieces, 4096, len(data))]
        assert [len(p) for p in out] == [4096, 4096, 2048] and b"".join(out) == data, cuts
    whole = np.frombuffer(bytearray(data[:3000]), np.uint8)
    exhausted = []

    def source():
        yield memoryview(whole)
        exhausted.append(True)

    assert list(rechunk([b"", b""], 4096, 0)) == []
    (only,) = list(rechunk(source(), 4096, 3000))
    assert np.frombuffer(only, np.uint8).ctypes.data == whole.ctypes.data  # not copied
    stream = rechunk(source(), 4096, 3000)
    exhausted.clear()
    next(stream)
    assert exhausted == [True]  # the source ran to its end before the piece came out
    for pieces, total in (([data[:3000], b"x"], 3000), ([data[:3000]], 3001),
                          ([data[:5000]], 4999)):
        with pytest.raises(BlobFormatError):
            list(rechunk(pieces, 4096, total))
