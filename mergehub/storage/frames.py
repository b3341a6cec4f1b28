"""zstd frames as blobs hold them, checked before anything is inflated, and the error every
decoder raises for malformed bytes: the lowest piece of the blob format. The lossless codec
(:mod:`mergehub.storage.codec`) and the lossy ones (:mod:`mergehub.storage.codecs`) both
inflate through :func:`inflate`.
"""

from __future__ import annotations

import threading
from typing import Union

import zstandard

Buffer = Union[bytes, bytearray, memoryview]


class BlobFormatError(ValueError):
    """The bytes are not a well-formed blob (the store turns this into an IntegrityError)."""


def zstd_bound(size: int) -> int:
    """The most bytes a zstd frame of ``size`` bytes of content takes (ZSTD_COMPRESSBOUND, plus
    the frame header and checksum)."""
    return size + (size >> 8) + (((128 << 10) - size) >> 11 if size < 128 << 10 else 0) + 32


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor: making one takes ~15 us, inflating a small tensor's
    plane ~1 us (a decompressor is not to be used by two threads at once)."""
    decompressor = getattr(_LOCAL, "decompressor", None)
    if decompressor is None:
        decompressor = _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def inflate(frame: Buffer, size: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes.

    The frame header's content size is checked before anything is decompressed: zstd's
    ``max_output_size`` does not stop a frame that declares a larger size, and decompressing
    allocates what the frame declares.
    """
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != size:
            raise BlobFormatError(f"a zstd frame declares {declared} bytes (-1: unknown) where "
                                  f"{size} belong")
        out = _decompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as e:
        raise BlobFormatError(f"bad zstd frame: {e}") from e
    if len(out) != size:
        raise BlobFormatError(f"a zstd frame holds {len(out)} bytes, not {size}")
    return out
