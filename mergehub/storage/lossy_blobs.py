"""Blobs of the lossy and multi-model codecs (:mod:`mergehub.storage.codecs`), encoded and
decoded whole in memory, and :func:`decode_blob`, which decodes a blob of any codec.

A lossy blob's ``ref`` is its base tensor's blob and its header keeps the codec's parameters,
among them the ``shape`` it decodes to (:func:`lossy_shape`, checked against the header's size
before a codec runs, so a codec allocates no more than the tensor) and, for a multi-model
codec's task blob, the shared blobs it ``needs`` (:func:`blob_needs`). Decoding is elementwise
and deterministic, so the sha256 of the decoded bytes, recorded when the blob is written,
checks every read as it does for lossless blobs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mergehub.storage import safetensors_format
from mergehub.storage.blob_format import BlobHeader, Buffer, is_count, pack_blob, sha256
from mergehub.storage.codec import decode_lossless
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.safetensors_format import DTYPE_WIDTH

if TYPE_CHECKING:
    import torch


def _tensor(raw: Buffer, dtype: str, share: bool = False) -> "torch.Tensor":
    """A flat tensor of ``raw``'s bytes: over a copy, or with ``share`` over a writable
    ``raw`` itself (for a caller that only reads the tensor)."""
    import torch

    torch_dtype = safetensors_format.TORCH_DTYPE[dtype]
    if not len(raw):
        return torch.empty(0, dtype=torch_dtype)
    writable = share and not memoryview(raw).readonly
    return torch.frombuffer(raw if writable else bytearray(raw), dtype=torch_dtype)


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


def _decoded_bytes(theta: "torch.Tensor", dtype: str) -> memoryview:
    """A decoded tensor's raw bytes in ``dtype``: a writable view of the converted tensor (not
    copied again)."""
    import torch

    out = theta.to(safetensors_format.TORCH_DTYPE[dtype]).contiguous().reshape(-1)
    return memoryview(out.view(torch.uint8).numpy())


def encode_task_blob(codec: str, code: dict[str, "torch.Tensor"], params: dict[str, Any],
                     shape: tuple[int, ...], dtype: str, ref: tuple[str, bytes],
                     shared: dict[str, tuple[str, "torch.Tensor"]]) -> bytes:
    """Task t's blob of an ``entries`` multi-model codec (:mod:`mergehub.storage.codecs.multi`)
    for one tensor: its ``code`` packed by the codec, a delta against the base tensor ``ref =
    (blob id, raw bytes)``, whose header names the shared tensors' blobs (``shared``: key ->
    (blob id, tensor)) in ``needs``; the header records the sha256 of the decoded bytes."""
    from mergehub.storage.codecs import LOSSY
    from mergehub.storage.codecs.multi import MULTI

    header_params, payload = MULTI[codec].pack(code, params, shape)
    header_params["needs"] = {key: blob for key, (blob, _) in shared.items()}
    base = _tensor(ref[1], dtype).reshape(shape)
    extras = {key: t.float() for key, (_, t) in shared.items()}
    decoded = _decoded_bytes(LOSSY[codec].decode(memoryview(payload), header_params, base, extras),
                             dtype)
    return pack_blob(BlobHeader(codec, dtype, len(decoded), sha256(decoded), ref[0],
                                header_params), payload)


def lossy_shape(header: BlobHeader) -> list[int]:
    """The shape a lossy blob decodes to, checked against its dtype and ``nbytes`` (which the
    store checks against the tensor's), so a codec allocates no more than the tensor."""
    shape = header.params.get("shape")
    if not (header.dtype in safetensors_format.FLOAT_DTYPES and isinstance(shape, list)
            and all(is_count(d) for d in shape)
            and math.prod(shape) * DTYPE_WIDTH[header.dtype] == header.nbytes):
        raise BlobFormatError(f"{header.codec} blob: shape {str(shape)[:80]} of {header.dtype} "
                              f"is not its {header.nbytes} bytes")
    return shape


def blob_needs(header: BlobHeader) -> dict[str, str]:
    """The other blobs a blob's decoding reads (TALL's τMTL), by key: ``params["needs"]``."""
    needs = header.params.get("needs") or {}
    if not (isinstance(needs, dict) and all(isinstance(v, str) for v in needs.values())):
        raise BlobFormatError(f"needs {str(needs)[:80]} is not a table of blob ids")
    return needs


def decode_blob(header: BlobHeader, payload: Buffer, ref_raw: Buffer | None,
                extras: dict[str, Buffer] | None = None) -> Buffer:
    """Decode any blob by its codec: ``lossless``, or a lossy codec of :data:`LOSSY` (which
    needs the base tensor's bytes, ``ref_raw``, and the raw float32 bytes of the blobs its
    header ``needs``, ``extras``), in memory."""
    if header.codec == "lossless":
        return decode_lossless(header, payload, ref_raw)
    from mergehub.storage.codecs import LOSSY

    lossy = LOSSY.get(header.codec)
    if lossy is None or header.version != 1:
        raise BlobFormatError(f"unknown codec {header.codec!r} version {header.version}")
    if ref_raw is None:
        raise BlobFormatError(f"{header.codec} blob decoded without its base tensor")
    shape = lossy_shape(header)
    if len(ref_raw) != header.nbytes:
        raise BlobFormatError(f"base tensor of {len(ref_raw)} bytes for {header.nbytes}")
    if any(len(v) != 4 * math.prod(shape) for v in (extras or {}).values()):
        raise BlobFormatError(f"a float32 tensor that {header.codec} needs is not {shape}")
    base = _tensor(ref_raw, header.dtype, share=True).reshape(shape)  # decoders only read it
    tensors = {k: _tensor(v, "F32", share=True) for k, v in (extras or {}).items()}
    return _decoded_bytes(lossy.decode(payload, header.params, base, tensors), header.dtype)
