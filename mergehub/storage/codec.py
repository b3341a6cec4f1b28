"""Blob format and the lossless tensor codec.

A blob is the unit of the content-addressed store: ``b"MHB1"`` + ``u32`` header length + a JSON
header + payload. The header makes every blob self-describing: codec and version, the dtype
and size of the decoded bytes, their sha256, the blob it is a delta against (``ref``), and the
codec parameters. A blob's id is the sha256 of the whole blob, so a tensor's bytes are stored
once whichever models share it, and both the payload and the header are checked on every read.

The ``lossless`` codec (sizes below measured by ``benchmarks/bench_store.py`` on synthetic
N(0, 0.02) bf16 weights and a fine-tune perturbed by 5% of each tensor's std; see
``benchmarks/RESULTS.md``):

* without a reference: for floats (f16, bf16, f32, f64) the exponent bits of every value go to
  byte planes of their own and sign + mantissa to others (``exp``); other dtypes are split into
  byte planes (``planes``); then each plane is zstd-compressed (level 1) in a frame of its own.
  Exponents of trained weights are low-entropy; sign and mantissa bits are close to random, so
  grouping like with like is what lets zstd compress (bf16 weights: ~0.68 of raw);
* against a reference tensor of the same size (a fine-tune's base): the integer difference of
  the bit patterns, zig-zag coded so small changes either way are small numbers, in byte planes,
  then zstd (``delta``). Unchanged values are zeros and a small change touches only the low
  bytes. This beat XOR of the bit patterns (0.46 vs 0.51 of raw on a bf16 fine-tune);
* a payload that would not shrink is stored as is (``none``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

import numpy as np
import zstandard

from mergehub.storage import safetensors_format
from mergehub.storage.safetensors_format import DTYPE_WIDTH

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # safetensors data is little-endian; the bit tricks assume it
    raise ImportError("mergehub's storage codecs require a little-endian machine")

MAGIC = b"MHB1"
ZSTD_LEVEL = 1  # measured: level 1 compresses bf16 planes better than 3 and 9, and fastest
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
#: (exponent bits, mantissa bits) of the IEEE-style float dtypes the ``exp`` transform splits.
_FLOAT_BITS = {"F16": (5, 10), "BF16": (8, 7), "F32": (8, 23), "F64": (11, 52)}


class BlobFormatError(ValueError):
    """The bytes are not a well-formed blob (the store turns this into an IntegrityError)."""


@dataclass(frozen=True)
class BlobHeader:
    """What a blob decodes to and how. ``sha256``/``nbytes`` describe the decoded bytes."""

    codec: str
    dtype: str
    nbytes: int
    sha256: str
    ref: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_json(self) -> bytes:
        return json.dumps({"codec": self.codec, "version": self.version, "dtype": self.dtype,
                           "nbytes": self.nbytes, "sha256": self.sha256, "ref": self.ref,
                           "params": self.params}, sort_keys=True, separators=(",", ":")).encode()


def pack_blob(header: BlobHeader, payload: bytes) -> bytes:
    """Serialize a blob; its id is ``sha256(result)``."""
    head = header.to_json()
    return b"".join((MAGIC, struct.pack("<I", len(head)), head, payload))


def unpack_blob(data: bytes | memoryview) -> tuple[BlobHeader, memoryview]:
    """Split a blob into header and payload; raises :class:`BlobFormatError` if malformed."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise BlobFormatError("not a mergehub blob (bad magic)")
    (n,) = struct.unpack("<I", view[4:8])
    try:
        obj = json.loads(bytes(view[8:8 + n]))
        header = BlobHeader(codec=obj["codec"], version=obj["version"], dtype=obj["dtype"],
                            nbytes=obj["nbytes"], sha256=obj["sha256"], ref=obj["ref"],
                            params=obj["params"])
    except (ValueError, KeyError, TypeError) as e:
        raise BlobFormatError(f"unreadable blob header: {e}") from e
    return header, view[8 + n:]


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --- byte-level transforms ------------------------------------------------------------------

def _planes(x: np.ndarray, keep: int | None = None) -> list[bytes]:
    """Byte planes of an unsigned array: all first bytes, all second bytes, ... (``keep`` first)."""
    w = x.dtype.itemsize
    if w == 1:
        return [x.tobytes()]
    cols = x.view(np.uint8).reshape(-1, w)
    return [np.ascontiguousarray(cols[:, i]).tobytes() for i in range(keep or w)]


def _unplanes(buf: bytes | memoryview, w: int, n: int) -> np.ndarray:
    """Inverse of :func:`_planes` for ``n`` values of width ``w`` (missing planes are zero)."""
    planes = np.frombuffer(buf, np.uint8).reshape(-1, n)
    if w == 1:
        return planes.reshape(-1).copy()
    out = np.zeros((n, w), np.uint8)
    out[:, :planes.shape[0]] = planes.T
    return out.view(_UINT[w]).reshape(-1)


def _exp_split(x: np.ndarray, e: int, m: int) -> list[bytes]:
    """Byte planes of the exponents, then byte planes of (sign, mantissa), of a float array."""
    t = x.dtype.type
    exp = (x >> t(m)) & t((1 << e) - 1)
    rest = ((x >> t(8 * x.dtype.itemsize - 1)) << t(m)) | (x & t((1 << m) - 1))
    return _planes(exp, keep=-(-e // 8)) + _planes(rest, keep=-(-(m + 1) // 8))


def _exp_join(buf: memoryview, w: int, n: int, e: int, m: int) -> np.ndarray:
    t = _UINT[w]
    split = -(-e // 8) * n
    exp, rest = _unplanes(buf[:split], w, n), _unplanes(buf[split:], w, n)
    return ((rest >> t(m)) << t(8 * w - 1)) | (exp << t(m)) | (rest & t((1 << m) - 1))


def _zigzag_delta(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    s = (x - ref).view(_INT[x.dtype.itemsize])  # wraps: exact for any bit patterns
    return ((s << 1) ^ (s >> (8 * x.dtype.itemsize - 1))).view(x.dtype)


def _unzigzag_delta(z: np.ndarray, ref: np.ndarray) -> np.ndarray:
    it = _INT[z.dtype.itemsize]
    s = (z >> z.dtype.type(1)).view(it) ^ -((z & z.dtype.type(1)).view(it))
    return ref + s.view(z.dtype)


def _width(dtype: str, nbytes: int) -> int:
    w = DTYPE_WIDTH.get(dtype, 1)
    return w if nbytes % w == 0 else 1


def _compress_planes(planes: list[bytes]) -> bytes:
    """One zstd frame per plane, so each gets entropy tables of its own.

    (In one frame, a 128 KiB block that mixes a low-entropy exponent plane with a near-random
    mantissa plane compresses to nothing: measured 1.01x on 50k fp16 weights vs 0.88x.)
    """
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    frames = [compressor.compress(p) for p in planes]
    return struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames)) + b"".join(frames)


def _decompress_planes(payload: memoryview, nbytes: int) -> memoryview:
    """Inverse of :func:`_compress_planes`; no plane may exceed ``nbytes`` (bounds a bad blob)."""
    (count,) = struct.unpack_from("<I", payload)
    sizes = struct.unpack_from(f"<{count}Q", payload, 4)
    pos = 4 + 8 * count
    out = bytearray()
    for size in sizes:
        out += zstandard.ZstdDecompressor().decompress(payload[pos:pos + size],
                                                       max_output_size=nbytes)
        pos += size
    if pos != len(payload):
        raise BlobFormatError("plane sizes do not add up")
    return memoryview(out)


# --- the lossless codec ---------------------------------------------------------------------

def encode_lossless(raw: bytes | memoryview, dtype: str, raw_sha256: str,
                    ref: tuple[str, bytes] | None = None) -> bytes:
    """Encode a tensor's raw bytes losslessly into a blob.

    Args:
        raw: the tensor's bytes as in the safetensors file.
        dtype: its safetensors dtype (chooses the element width and the transform).
        raw_sha256: ``sha256(raw)``, recorded so decoding can be verified end to end.
        ref: ``(blob id, raw bytes)`` of a same-sized reference tensor (the base's) to store a
            delta against, or ``None``.
    """
    nbytes = len(raw)
    w = _width(dtype, nbytes)
    x = np.frombuffer(raw, _UINT[w])
    if ref is not None and len(ref[1]) == nbytes:
        transform, ref_id = "delta", ref[0]
        body = _planes(_zigzag_delta(x, np.frombuffer(ref[1], _UINT[w])))
    elif dtype in _FLOAT_BITS and w == DTYPE_WIDTH[dtype]:
        transform, ref_id, body = "exp", None, _exp_split(x, *_FLOAT_BITS[dtype])
    else:
        transform, ref_id, body = "planes", None, _planes(x)
    payload = _compress_planes(body)
    if len(payload) >= nbytes:
        transform, ref_id, payload = "none", None, bytes(raw)
    header = BlobHeader("lossless", dtype, nbytes, raw_sha256, ref_id,
                        {"transform": transform, "width": w})
    return pack_blob(header, payload)


def decode_lossless(header: BlobHeader, payload: memoryview, ref_raw: bytes | None) -> bytes:
    """Decode a ``lossless`` blob's payload to the tensor's raw bytes (not yet verified)."""
    transform, w = header.params["transform"], header.params["width"]
    if transform == "none":
        return bytes(payload)
    body = _decompress_planes(payload, header.nbytes)
    n = header.nbytes // w
    if transform == "delta":
        if ref_raw is None or len(ref_raw) != header.nbytes:
            raise BlobFormatError("delta blob decoded without its reference")
        x = _unzigzag_delta(_unplanes(body, w, n), np.frombuffer(ref_raw, _UINT[w]))
    elif transform == "exp":
        x = _exp_join(body, w, n, *_FLOAT_BITS[header.dtype])
    elif transform == "planes":
        x = _unplanes(body, w, n)
    else:
        raise BlobFormatError(f"unknown lossless transform {transform!r}")
    return x.tobytes()


def _tensor(raw: bytes | bytearray, dtype: str) -> "torch.Tensor":
    import torch

    torch_dtype = safetensors_format.TORCH_DTYPE[dtype]
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype) if raw else \
        torch.empty(0, dtype=torch_dtype)


def encode_lossy(raw: bytes | bytearray, dtype: str, shape: tuple[int, ...], codec: str,
                 params: dict[str, Any], ref: tuple[str, bytes]) -> bytes:
    """Encode a fine-tune's tensor (raw bytes) with a lossy codec against its base tensor
    ``ref = (blob id, raw bytes)``; the header records the sha256 of the decoded bytes."""
    from mergehub.storage.codecs import LOSSY

    if dtype not in safetensors_format.FLOAT_DTYPES:
        raise BlobFormatError(f"lossy codecs need a float tensor, not {dtype}")
    lossy = LOSSY[codec]
    base = _tensor(ref[1], dtype).reshape(shape)
    header_params, payload = lossy.encode(_tensor(raw, dtype).reshape(shape), base, params)
    decoded = _decoded_bytes(lossy.decode(memoryview(payload), header_params, base), dtype)
    header = BlobHeader(codec, dtype, len(decoded), sha256(decoded), ref[0], header_params)
    return pack_blob(header, payload)


def _decoded_bytes(theta: "torch.Tensor", dtype: str) -> bytes:
    import torch

    out = theta.to(safetensors_format.TORCH_DTYPE[dtype]).contiguous().reshape(-1)
    return out.view(torch.uint8).numpy().tobytes()


def encode_tall_task(tau: "torch.Tensor", mtl: "torch.Tensor", dtype: str,
                     params: dict[str, Any], ref: tuple[str, bytes], mtl_blob: str) -> bytes:
    """Task t's ``tall`` blob for one tensor: its mask against the shared τMTL (blob
    ``mtl_blob``), a delta against the base tensor ``ref``."""
    from mergehub.storage.codecs import LOSSY, tall

    header_params, payload = tall.encode_task(tau, mtl, params, mtl_blob)
    base = _tensor(ref[1], dtype).reshape(tau.shape)
    decoded = _decoded_bytes(LOSSY["tall"].decode(memoryview(payload), header_params, base,
                                                  {"mtl": mtl.float()}), dtype)
    return pack_blob(BlobHeader("tall", dtype, len(decoded), sha256(decoded), ref[0],
                                header_params), payload)


def decode_blob(header: BlobHeader, payload: memoryview, ref_raw: bytes | None,
                extras: dict[str, bytes] | None = None) -> bytes:
    """Decode any blob by its codec: ``lossless``, or a lossy codec of :data:`LOSSY` (which
    needs the base tensor's bytes, ``ref_raw``, and the raw float32 bytes of the blobs its
    header ``needs``, ``extras``)."""
    if header.codec == "lossless" and header.version == 1:
        return decode_lossless(header, payload, ref_raw)
    from mergehub.storage.codecs import LOSSY

    lossy = LOSSY.get(header.codec)
    if lossy is None or header.version != 1:
        raise BlobFormatError(f"unknown codec {header.codec!r} version {header.version}")
    if ref_raw is None:
        raise BlobFormatError(f"{header.codec} blob decoded without its base tensor")
    base = _tensor(ref_raw, header.dtype).reshape(header.params["shape"])
    tensors = {k: _tensor(v, "F32") for k, v in (extras or {}).items()}
    return _decoded_bytes(lossy.decode(payload, header.params, base, tensors), header.dtype)
