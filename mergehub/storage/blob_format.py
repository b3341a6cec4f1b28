"""The blob format: what every blob of the store is, whatever its codec.

A blob is the unit of the content-addressed store: ``b"MHB1"`` + ``u32`` header length + a JSON
header + payload. The header makes every blob self-describing: codec and version, the dtype
and size of the decoded bytes, their sha256, the blob it is a delta against (``ref``), and the
codec parameters. A blob's id is the sha256 of the whole blob, so a tensor's bytes are stored
once whichever models share it, and both the payload and the header are checked on every read.

A payload is read in byte ranges (:class:`Payload`), from memory or from an open file a piece
at a time, never past its end; decoders hand their bytes on in pieces (:func:`rechunk`). The
codecs: ``lossless`` (:mod:`mergehub.storage.codec`), the lossy and multi-model ones
(:mod:`mergehub.storage.codecs`), a blob of either encoded or decoded whole by
:mod:`mergehub.storage.lossy_blobs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Union

from mergehub.storage.frames import BlobFormatError
from mergehub.storage.safetensors_format import read_range

MAGIC = b"MHB1"

Buffer = Union[bytes, bytearray, memoryview]


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

    def pack(self) -> bytes:
        """What a blob with this header starts with: magic, header length, header."""
        head = self.to_json()
        return b"".join((MAGIC, struct.pack("<I", len(head)), head))


def pack_blob(header: BlobHeader, payload: Buffer) -> bytes:
    """Serialize a blob; its id is ``sha256(result)``."""
    return header.pack() + payload


def is_count(value: object) -> bool:
    """Whether ``value`` is a JSON integer >= 0 (not a bool, not a float)."""
    return type(value) is int and value >= 0


def read_header(blob: Payload) -> tuple[BlobHeader, int]:
    """Parse the header at the start of a whole blob; returns it and where the payload starts.

    Raises :class:`BlobFormatError` for a bad magic, a header that is not JSON or fields of the
    wrong type (so later size arithmetic on them is safe).
    """
    if len(blob) < 8 or bytes(blob.read(0, 4)) != MAGIC:
        raise BlobFormatError("not a mergehub blob (bad magic)")
    (n,) = struct.unpack("<I", blob.read(4, 4))
    try:
        obj = json.loads(bytes(blob.read(8, n)))
        header = BlobHeader(codec=obj["codec"], version=obj["version"], dtype=obj["dtype"],
                            nbytes=obj["nbytes"], sha256=obj["sha256"], ref=obj["ref"],
                            params=obj["params"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise BlobFormatError(f"unreadable blob header: {e}") from e
    if not (isinstance(header.codec, str) and isinstance(header.dtype, str)
            and is_count(header.nbytes) and is_count(header.version)
            and isinstance(header.sha256, str) and isinstance(header.params, dict)
            and (header.ref is None or isinstance(header.ref, str))):
        raise BlobFormatError("unreadable blob header: a field has the wrong type")
    return header, 8 + n


def unpack_blob(data: Buffer) -> tuple[BlobHeader, memoryview]:
    """Split a blob held in memory into header and payload; raises :class:`BlobFormatError`
    if malformed."""
    view = memoryview(data).cast("B")
    header, start = read_header(Payload(view))
    return header, view[start:]


def sha256(data: Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


class _FileRange:
    """``read(n)`` over the bytes [start, start + size) of an open file, with ``pread`` (so
    several can read one file at once): the source of a zstd stream reader."""

    def __init__(self, file: BinaryIO, start: int, size: int):
        self._fd, self._pos, self._end = file.fileno(), start, start + size

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


class Payload:
    """Bytes of a blob, held in memory or read from an open file a piece at a time.

    Decoding asks for byte ranges (:meth:`read`) or for a stream over one (:meth:`stream`, the
    source of zstd's streaming decompressor). Both refuse ranges past the end before reading,
    so a size field of a damaged or hostile blob cannot make a read allocate more than there is.
    """

    def __init__(self, data: Buffer | None = None, *, file: BinaryIO | None = None,
                 start: int = 0, size: int = 0):
        self._view = memoryview(data).cast("B") if data is not None else None
        self._file, self._start = file, start
        self.size = len(self._view) if self._view is not None else size

    def __len__(self) -> int:
        return self.size

    def _check(self, offset: int, size: int) -> None:
        if size < 0 or offset + size > self.size:
            raise BlobFormatError(f"truncated: bytes {offset}..{offset + size} of a "
                                  f"{self.size}-byte payload")

    def read(self, offset: int, size: int) -> memoryview | bytearray:
        """Bytes [offset, offset + size)."""
        self._check(offset, size)
        if self._view is not None:
            return self._view[offset:offset + size]
        try:
            return read_range(self._file, self._start + offset, size)
        except OSError as e:
            raise BlobFormatError(f"cannot read bytes {offset}..{offset + size}: {e}") from e

    def stream(self, offset: int, size: int) -> memoryview | _FileRange:
        """A readable source of bytes [offset, offset + size) for a zstd stream reader."""
        self._check(offset, size)
        if self._view is not None:
            return self._view[offset:offset + size]
        return _FileRange(self._file, self._start + offset, size)

    def tail(self, offset: int) -> Payload:
        """The bytes from ``offset`` on, as a payload of their own."""
        self._check(offset, 0)
        if self._view is not None:
            return Payload(self._view[offset:])
        return Payload(file=self._file, start=self._start + offset, size=self.size - offset)


def rechunk(pieces: Iterable[Buffer], size: int, total: int) -> Iterator[memoryview]:
    """The ``total`` bytes ``pieces`` yields, cut again into consecutive pieces of ``size`` bytes
    (the last one shorter).

    The last piece comes only once ``pieces`` is exhausted, so checks a generator makes after
    its last item (a decoded sha256) have run when the consumer has all the bytes. More or fewer
    bytes than ``total`` is a :class:`BlobFormatError`.
    """
    buf = bytearray()
    done = 0
    last = None  # the last piece as it came (nothing to join it to), yielded at the end
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if not len(view):
            continue
        if last is not None or done + len(buf) + len(view) > total:
            raise BlobFormatError(f"more than the {total} bytes expected")
        if not buf and len(view) == size and done + size < total:
            done += size
            yield view  # already a piece of the right size
            continue
        if not buf and len(view) <= size and done + len(view) == total:
            last = view  # already the last piece (a tensor of at most a chunk: not copied)
            continue
        buf += view
        while len(buf) >= size and done + size < total:
            out = buf[:size]
            del buf[:size]
            done += size
            yield memoryview(out)
    if last is not None:
        buf = last
    if done + len(buf) != total:
        raise BlobFormatError(f"{done + len(buf)} bytes where {total} were expected")
    if buf:
        yield memoryview(buf)


def drain(items: Iterator[Any] | None) -> None:
    """Run an iterator to its end, so that checks its generator makes there run."""
    for _ in items or ():
        raise BlobFormatError("more bytes than expected")
