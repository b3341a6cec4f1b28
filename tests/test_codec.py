"""The lossless blob codec: bit-exact round trips on every bit pattern, and real compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergehub.storage.codec import (
    BlobFormatError, decode_blob, encode_lossless, sha256, unpack_blob)
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
